// Helpers shared by the tests of the messaging sections of lemsg.hpp:
// tests/message.cpp (section 8), tests/channel.cpp (9), tests/service.cpp (10)
// and tests/session.cpp (11).
//
// Most cases run a Service and async Sessions on one Loop in one process;
// a synchronous client, or a second server, is a forked child (fork without
// exec), because a synchronous call that only its own thread's loop could
// answer returns WouldDeadlock. Children report through their exit code (a
// failed check prints its line). Every wait is bounded. The fault tests
// (kill -9, pools held empty, peers that never read, 64 clients, no heap)
// are in faults.cpp.
//
// Everything here is in namespace msgtest, which each of those files brings
// into its TEST_SUITE with `using namespace msgtest;`. This header is
// included by several translation units: functions are inline (or
// templates) and constants inline constexpr, so each has one definition.
// Include it after <doctest/doctest.h>, which the .cpp includes first with
// DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS defined.
#pragma once

#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <utility>

namespace msgtest {

using lemsg::Loop;
using lemsg::Message;
using lemsg::Result;
using lemsg::Service;
using lemsg::Session;
using lemsg::SessionRef;

// Bound for waits that only a failure (or a very slow emulator) reaches.
inline constexpr int kWaitMs = 30000;

inline constexpr lemsg::Protocol kProto{"lemsg.test.messaging.v1", 64};
using SmallPool = lemsg::MessagePool<64, 32>;

// Async sessions a case may open to a Service on the same loop: each Service
// and Session takes a timer; the Service a watch plus one per session, each
// Session a watch.
inline constexpr int kLocalSessions =
    std::min({3, LEMSG_MAX_TIMERS - 1, (LEMSG_MAX_WATCHES - 1) / 2, LEMSG_MAX_SESSIONS});

// Every payload here is an operation and a value (testutil::Body).
using testutil::Body;
using testutil::die_with_parent;
using testutil::echo_of;
using testutil::set_body;
enum Op : std::uint32_t {
  OpEcho = 1,  // respond with echo_of(value)
  OpHold,      // the server keeps the request
  OpDrop,      // the server lets the request go unanswered
  OpFd,        // read the attached fd; respond with what was read and a pipe holding "pong"
  OpNote,      // one-way
};

inline Body body_of(const Message& m) {
  Body b{0, 0};
  if (m && m.size() >= sizeof b) std::memcpy(&b, m.payload(), sizeof b);
  return b;
}


inline bool fd_is_open(int fd) { return fcntl(fd, F_GETFD) >= 0; }

inline Result call(Session& s, std::uint32_t op, std::uint32_t value, Body& out, int timeout_ms = kWaitMs) {
  Message m;
  Result r = s.create_message(m);
  if (r != Result::Ok) return r;
  if (!set_body(m, op, value)) return Result::BadParameter;
  Message resp;
  r = s.request_sync(std::move(m), resp, timeout_ms);
  out = body_of(resp);
  return r;
}

struct Reply {
  int calls = 0;
  Result result = Result::Ok;
  Body body{0, 0};
  std::uint32_t size = 0;
  bool empty = true;  // the completion's message was empty
};

inline Result ask(Session& s, std::uint32_t op, std::uint32_t value, Reply& rep, std::uint32_t timeout_ms = 0) {
  Message m;
  Result r = s.create_message(m);
  if (r != Result::Ok) return r;
  if (!set_body(m, op, value)) return Result::BadParameter;
  return s.request(
      std::move(m),
      [&rep](Result res, Message& resp) {
        ++rep.calls;
        rep.result = res;
        rep.body = body_of(resp);
        rep.size = resp.size();
        rep.empty = !resp;
      },
      timeout_ms);
}

inline Result tell(Session& s, std::uint32_t value) {
  Message m;
  Result r = s.create_message(m);
  if (r != Result::Ok) return r;
  if (!set_body(m, OpNote, value)) return Result::BadParameter;
  return s.send(std::move(m));
}

inline int run_until_exit(Loop& loop, pid_t pid, int timeout_ms) {
  int code = -1;
  const bool done = testutil::run_until(
      loop,
      [&] {
        int st = 0;
        const pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        else if (r < 0) code = -2;
        return r != 0;
      },
      timeout_ms);
  if (!done) testutil::kill9(pid);
  return done ? code : -1;
}

inline bool pipe_says(testutil::Pipe& pipe, char c) { return pipe.get(0) == static_cast<unsigned char>(c); }

// A Service and what its handlers saw.
struct Server {
  Service svc;
  int opens = 0;
  int closes = 0;
  Result reason = Result::Ok;
  SessionRef opened;  // the last one
  SessionRef closed;
  void* context_at_close = nullptr;
  lemsg::Credentials creds;  // of the last session opened
  int received = 0;          // every frame
  int notes = 0;             // one-way frames
  bool notes_in_order = true;
  Message last_note;  // kept when keep_notes is set
  bool keep_notes = false;
  Message held[48];
  int nheld = 0;
  Result last_respond = Result::Ok;
  // A case's own handling; returns true when it took the message.
  lemsg::Callable<bool(Message&)> hook;

  Server(Loop& loop, lemsg::MessagePoolBase& pool, const lemsg::Protocol& proto = kProto)
      : svc(loop, proto, pool) {
    svc.set_open_handler([this](SessionRef s) {
      ++opens;
      opened = s;
      Result r = svc.credentials(s, creds);
      (void)r;
    });
    svc.set_close_handler([this](SessionRef s, Result why) {
      ++closes;
      closed = s;
      reason = why;
      context_at_close = svc.context(s);
    });
    svc.set_receive_handler([this](Message& m) { on_message(m); });
  }

  void reply(Message& m, std::uint32_t value) {
    const Body b = body_of(m);
    set_body(m, b.op, value);
    last_respond = svc.respond(std::move(m));
  }

  void on_message(Message& m) {
    ++received;
    if (hook && hook(m)) return;
    const Body b = body_of(m);
    if (!m.needs_response()) {
      if (b.value != static_cast<std::uint32_t>(notes)) notes_in_order = false;
      ++notes;
      if (keep_notes) last_note = m;
      return;
    }
    switch (b.op) {
      case OpEcho:
        reply(m, echo_of(b.value));
        break;
      case OpHold:
        if (nheld < 48) held[nheld++] = std::move(m);
        break;
      case OpFd: {
        char got[8] = {};
        const int fd = m.take_fd();
        ssize_t n = fd >= 0 ? read(fd, got, sizeof got) : -1;
        if (fd >= 0) close(fd);
        if (n < 0) n = 0;
        int p[2];
        if (pipe2(p, O_CLOEXEC) == 0) {
          ssize_t w = write(p[1], "pong", 4);
          (void)w;
          close(p[1]);
          if (m.set_fd(p[0]) != Result::Ok) close(p[0]);
        }
        Result r = m.assign(got, static_cast<std::uint32_t>(n));
        (void)r;
        last_respond = svc.respond(std::move(m));
        break;
      }
      default:
        break;  // OpDrop: released unanswered
    }
  }
};

// An async Session and what its handlers saw.
struct Client {
  Session s;
  int opens = 0;
  Result open_result = Result::Ok;
  int closes = 0;
  Result reason = Result::Ok;
  int received = 0;
  std::uint32_t got[16];

  Client(Loop& loop, lemsg::MessagePoolBase& pool, const lemsg::Protocol& proto = kProto) : s(loop, proto, pool) {
    s.set_close_handler([this](Result why) {
      ++closes;
      reason = why;
    });
    s.set_receive_handler([this](Message& m) {
      if (received < 16) got[received] = body_of(m).value;
      ++received;
    });
  }
  Result open(const char* name) {
    return s.open(name, [this](Result r) {
      ++opens;
      open_result = r;
    });
  }
};

// Advertises `name` on `srv` and opens `c` to it asynchronously.
inline bool connect(Loop& loop, Server& srv, Client& c, const char* name) {
  if (!srv.svc.is_advertised() && srv.svc.advertise(name) != Result::Ok) return false;
  const int opens = c.opens;
  const int sopens = srv.opens;
  if (c.open(name) != Result::Ok) return false;
  return testutil::run_until(loop, [&] { return c.opens == opens + 1 && srv.opens == sopens + 1; }, kWaitMs) &&
         c.open_result == Result::Ok;
}

// The address of a socket file; false when the path does not fit.
inline bool unix_address(const char* path, sockaddr_un& sa) {
  std::memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  const std::size_t n = std::strlen(path);
  if (n >= sizeof sa.sun_path) return false;
  std::memcpy(sa.sun_path, path, n);
  return true;
}

// A raw SOCK_SEQPACKET socket connected to `path` (-1 on failure).
inline int raw_connect(const char* path) {
  sockaddr_un sa;
  if (!unix_address(path, sa)) return -1;
  const int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, reinterpret_cast<const sockaddr*>(&sa), sizeof sa) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Sends a client's Hello for `proto` on a raw socket.
inline bool raw_hello(int fd, const lemsg::Protocol& proto) {
  unsigned char buf[lemsg::wire::header_size + 8 + LEMSG_MAX_PROTOCOL_ID];
  const std::uint32_t idlen = static_cast<std::uint32_t>(std::strlen(proto.id));
  lemsg::wire::encode(lemsg::wire::Header{lemsg::wire::FrameType::Hello, 0, 0, 8 + idlen}, buf);
  std::memcpy(buf + lemsg::wire::header_size, &proto.max_payload, 4);
  std::memcpy(buf + lemsg::wire::header_size + 4, &idlen, 4);
  std::memcpy(buf + lemsg::wire::header_size + 8, proto.id, idlen);
  const std::size_t n = lemsg::wire::header_size + 8 + idlen;
  return send(fd, buf, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n);
}

// Receives one datagram into buf, waiting at most timeout_ms. Returns its
// full length (which may exceed cap), or -1.
inline long raw_recv(int fd, void* buf, std::size_t cap, int timeout_ms) {
  struct pollfd p = {fd, POLLIN, 0};
  if (poll(&p, 1, timeout_ms) != 1) return -1;
  return static_cast<long>(recv(fd, buf, cap, MSG_TRUNC | MSG_DONTWAIT));
}

// -- handlers that destroy or close their own object --
//
// Legato code deletes a session in its close handler; any handler may destroy
// the object that called it. Cases in service.cpp and session.cpp destroy
// Services and Sessions from inside each kind of handler. The objects live on
// the heap (Doomed), so the ASan builds report any read of them after the
// handler returns. The memory is filled with bytes of 3 first, which read as
// a live, open object (and as garbage pointers), so the library goes on where
// it should stop: ASan then reports, and without ASan the run misbehaves.

// A heap object a handler may destroy. destroy() runs the destructor at most
// once: a second call (from a handler the destructor itself runs, as
// std::optional::reset and unique_ptr::reset behave) does nothing.
template <typename T>
struct Doomed {
  T* p = nullptr;
  template <typename... A>
  T& make(A&&... a) {
    p = ::new (::operator new(sizeof(T))) T(std::forward<A>(a)...);
    return *p;
  }
  void destroy() {
    T* q = p;
    if (!q) return;
    p = nullptr;
    q->~T();
    std::memset(static_cast<void*>(q), 3, sizeof(T));
    ::operator delete(static_cast<void*>(q));
  }
  ~Doomed() { destroy(); }
  T* operator->() const { return p; }
  T& operator*() const { return *p; }
  explicit operator bool() const { return p != nullptr; }
};

// Opens `s` to `name` and runs the loop until the open callback and the
// server's open handler ran.
inline bool open_doomed(Loop& loop, Server& srv, Session& s, const char* name) {
  const int before = srv.opens;
  int opened = 0;
  Result got = Result::Closed;
  if (s.open(name, [&opened, &got](Result r) {
        ++opened;
        got = r;
      }) != Result::Ok)
    return false;
  const bool ok = testutil::run_until(loop, [&] { return opened == 1 && srv.opens == before + 1; }, kWaitMs);
  // The callback captured locals: replace it before they go.
  return ok && got == Result::Ok;
}

inline bool send_note(Service& svc, SessionRef to, std::uint32_t value) {
  Message m;
  return svc.create_message(m) == Result::Ok && set_body(m, OpNote, value) && svc.send(to, std::move(m)) == Result::Ok;
}

// -- destruction order --

// Runs `mistake` in a child whose log lines go to a pipe; true when the
// child died with SIGABRT and one of its lines contains `words`.
template <typename F>
inline bool aborts_naming(F mistake, const char* words) {
  testutil::Pipe pipe;
  const pid_t child = testutil::spawn([&] {
    die_with_parent();
    signal(SIGABRT, SIG_DFL);  // not doctest's crash report: the parent judges
    pipe.close_read();
    lemsg::set_log_sink(
        [](lemsg::LogLevel, const char* line, void* ctx) {
          const int fd = *static_cast<int*>(ctx);
          ssize_t n = write(fd, line, std::strlen(line));
          n = write(fd, "\n", 1);
          (void)n;
        },
        &pipe.fd[1]);
    mistake();
    return 0;  // not stopped: the mistake went unnoticed
  });
  if (child <= 0) return false;
  pipe.close_write();
  char text[2048] = {};
  std::size_t used = 0;
  for (;;) {
    struct pollfd p = {pipe.fd[0], POLLIN, 0};
    if (poll(&p, 1, kWaitMs) != 1) break;
    const ssize_t n = read(pipe.fd[0], text + used, sizeof text - 1 - used);
    if (n <= 0) break;
    used += static_cast<std::size_t>(n);
    if (used == sizeof text - 1) break;
  }
  const int code = testutil::wait_exit(child, kWaitMs);
  INFO("child exit " << code << ", log: " << text);
  CHECK(code == 128 + SIGABRT);
  CHECK(std::strstr(text, words) != nullptr);
  return code == 128 + SIGABRT && std::strstr(text, words) != nullptr;
}

// -- diagnostics --

// Every line logged while it lives, at debug level.
struct LogLines {
  char lines[64][256];
  int count = 0;
  explicit LogLines() {
    lemsg::detail::log_state().env.store(-1);  // LEMSG_LOG in the test's environment must not interfere
    lemsg::set_log_sink(
        [](lemsg::LogLevel, const char* line, void* ctx) {
          LogLines* self = static_cast<LogLines*>(ctx);
          if (self->count < 64) std::snprintf(self->lines[self->count++], 256, "%s", line);
        },
        this);
    lemsg::set_log_level(lemsg::LogLevel::Debug);
  }
  ~LogLines() {
    lemsg::set_log_sink(nullptr, nullptr);
    lemsg::set_log_level(static_cast<lemsg::LogLevel>(LEMSG_LOG_LEVEL));
    lemsg::detail::log_state().env.store(-2);
  }
  // True when one line holds every one of the given pieces.
  bool has(const char* a, const char* b = "", const char* c = "") const {
    for (int i = 0; i < count; ++i)
      if (std::strstr(lines[i], a) && std::strstr(lines[i], b) && std::strstr(lines[i], c)) return true;
    return false;
  }
};

}  // namespace msgtest
