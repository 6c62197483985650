// Section 8 (messaging): Protocol, Message, MessagePool, Service, Session.
//
// Most cases run a Service and async Sessions on one Loop in one process;
// a synchronous client, or a second server, is a forked child (fork without
// exec), because a synchronous call that only its own thread's loop could
// answer returns WouldDeadlock. Children report through their exit code (a
// failed check prints its line). Every wait is bounded. The fault tests
// (kill -9, pools held empty, peers that never read, 64 clients, no heap)
// are in faults.cpp.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>


TEST_SUITE("messaging") {

using lemsg::Loop;
using lemsg::Message;
using lemsg::Result;
using lemsg::Service;
using lemsg::Session;
using lemsg::SessionRef;

namespace {

// Bound for waits that only a failure (or a very slow emulator) reaches.
constexpr int kWaitMs = 30000;

constexpr lemsg::Protocol kProto{"lemsg.test.messaging.v1", 64};
using SmallPool = lemsg::MessagePool<64, 32>;

// Async sessions a case may open to a Service on the same loop: each Service
// and Session takes a timer; the Service a watch plus one per session, each
// Session a watch.
constexpr int kLocalSessions =
    std::min({3, LEMSG_MAX_TIMERS - 1, (LEMSG_MAX_WATCHES - 1) / 2, LEMSG_MAX_SESSIONS});

// Every payload here is an operation and a value (testutil::Body).
using testutil::Body;
using testutil::die_with_parent;
using testutil::echo_of;
using testutil::set_body;
enum : std::uint32_t {
  OpEcho = 1,  // respond with echo_of(value)
  OpHold,      // the server keeps the request
  OpDrop,      // the server lets the request go unanswered
  OpFd,        // read the attached fd; respond with what was read and a pipe holding "pong"
  OpNote,      // one-way
};

Body body_of(const Message& m) {
  Body b{0, 0};
  if (m && m.size() >= sizeof b) std::memcpy(&b, m.payload(), sizeof b);
  return b;
}


bool fd_is_open(int fd) { return fcntl(fd, F_GETFD) >= 0; }

Result call(Session& s, std::uint32_t op, std::uint32_t value, Body& out, int timeout_ms = kWaitMs) {
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

Result ask(Session& s, std::uint32_t op, std::uint32_t value, Reply& rep, std::uint32_t timeout_ms = 0) {
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

Result tell(Session& s, std::uint32_t value) {
  Message m;
  Result r = s.create_message(m);
  if (r != Result::Ok) return r;
  if (!set_body(m, OpNote, value)) return Result::BadParameter;
  return s.send(std::move(m));
}

int run_until_exit(Loop& loop, pid_t pid, int timeout_ms) {
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

bool pipe_says(testutil::Pipe& pipe, char c) { return pipe.get(0) == static_cast<unsigned char>(c); }

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
bool connect(Loop& loop, Server& srv, Client& c, const char* name) {
  if (!srv.svc.is_advertised() && srv.svc.advertise(name) != Result::Ok) return false;
  const int opens = c.opens;
  const int sopens = srv.opens;
  if (c.open(name) != Result::Ok) return false;
  return testutil::run_until(loop, [&] { return c.opens == opens + 1 && srv.opens == sopens + 1; }, kWaitMs) &&
         c.open_result == Result::Ok;
}

// The address of a socket file; false when the path does not fit.
bool unix_address(const char* path, sockaddr_un& sa) {
  std::memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  const std::size_t n = std::strlen(path);
  if (n >= sizeof sa.sun_path) return false;
  std::memcpy(sa.sun_path, path, n);
  return true;
}

// A raw SOCK_SEQPACKET socket connected to `path` (-1 on failure).
int raw_connect(const char* path) {
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
bool raw_hello(int fd, const lemsg::Protocol& proto) {
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
long raw_recv(int fd, void* buf, std::size_t cap, int timeout_ms) {
  struct pollfd p = {fd, POLLIN, 0};
  if (poll(&p, 1, timeout_ms) != 1) return -1;
  return static_cast<long>(recv(fd, buf, cap, MSG_TRUNC | MSG_DONTWAIT));
}

}  // namespace

// ---- Service: advertise, hide, names ----------------------------------------

TEST_CASE("messaging: advertising a service twice returns Busy") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Service svc(loop, kProto, pool);
  REQUIRE(svc.status() == Result::Ok);
  CHECK(!svc.is_advertised());
  CHECK(svc.advertise("twice") == Result::Ok);
  CHECK(svc.is_advertised());
  CHECK(svc.advertise("twice") == Result::Busy);
  CHECK(svc.advertise("other-name") == Result::Busy);
  char path[256];
  dir.socket("twice", path);
  struct stat st;
  CHECK(stat(path, &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  dir.socket("other-name", path);
  CHECK(stat(path, &st) != 0);
}

TEST_CASE("messaging: a second service for a name that is served returns Duplicate, in this process or another") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server first(loop, pool);
  REQUIRE(first.svc.advertise("dup") == Result::Ok);

  // Same process, same loop.
  Service second(loop, kProto, pool);
  CHECK(second.advertise("dup") == Result::Duplicate);
  CHECK(!second.is_advertised());
  // Same process, another loop.
  Loop loop2;
  Service third(loop2, kProto, pool);
  CHECK(third.advertise("dup") == Result::Duplicate);

  // Another process: it finds a live server behind the socket file.
  const pid_t child = testutil::spawn([] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Service other(cl, kProto, cp);
    CHILD_CHECK(other.advertise("dup") == Result::Duplicate);
    CHILD_CHECK(!other.is_advertised());
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  // Its probe was no session: no handler ran and nothing is left.
  CHECK(testutil::run_until(loop, [&] { return first.svc.session_count() == 0; }, kWaitMs));
  CHECK(first.opens == 0);
  CHECK(first.closes == 0);

  // The first one still serves.
  Client c(loop, pool);
  CHECK(connect(loop, first, c, "dup"));
  c.s.close();

  // Once it hides, the name is free.
  CHECK(first.svc.hide() == Result::Ok);
  CHECK(second.advertise("dup") == Result::Ok);
  CHECK(third.advertise("dup") == Result::Duplicate);
}

TEST_CASE("messaging: hide removes the socket file; new clients get NotFound while open sessions go on") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client c(loop, pool);
  REQUIRE(connect(loop, srv, c, "hidden"));
  char path[256];
  dir.socket("hidden", path);
  struct stat st;
  CHECK(stat(path, &st) == 0);

  CHECK(srv.svc.hide() == Result::Ok);
  CHECK(!srv.svc.is_advertised());
  CHECK(stat(path, &st) != 0);
  CHECK(srv.svc.hide() == Result::NotFound);

  const pid_t child = testutil::spawn([] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.try_open("hidden") == Result::NotFound);
    CHILD_CHECK(!s.is_open());
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);

  // The open session still works.
  Reply rep;
  CHECK(ask(c.s, OpEcho, 11, rep) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
  CHECK(rep.result == Result::Ok);
  CHECK(rep.body.value == echo_of(11));
  CHECK(srv.svc.session_count() == 1);
  CHECK(srv.closes == 0);
  c.s.close();
  CHECK(testutil::run_until(loop, [&] { return srv.svc.session_count() == 0; }, kWaitMs));

  // An async open waits for the service instead of failing, and connects
  // when it is advertised again.
  Client later(loop, pool);
  CHECK(later.open("hidden") == Result::Ok);
  testutil::run_until(loop, [] { return false; }, 100);
  CHECK(later.opens == 0);
  CHECK(srv.svc.advertise("hidden") == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return later.opens == 1; }, kWaitMs));
  CHECK(later.open_result == Result::Ok);
  CHECK(srv.svc.session_count() == 1);
  later.s.close();
}

TEST_CASE("messaging: bad service names are refused with BadParameter") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Service svc(loop, kProto, pool);
  Session s(loop, kProto, pool);
  char too_long[LEMSG_MAX_NAME + 2];
  std::memset(too_long, 'n', LEMSG_MAX_NAME + 1);
  too_long[LEMSG_MAX_NAME + 1] = '\0';
  const char* const bad[] = {nullptr, "",    ".hidden",     "..", "a/b",   "/abs",
                             "a b",   "tab\t", "caf\xc3\xa9", "x*", too_long};
  for (const char* name : bad) {
    CAPTURE(name ? name : "(null)");
    CHECK(svc.advertise(name) == Result::BadParameter);
    CHECK(s.open(name, [](Result) {}) == Result::BadParameter);
    CHECK(s.open_sync(name, 100) == Result::BadParameter);
    CHECK(s.try_open(name) == Result::BadParameter);
  }
  CHECK(!svc.is_advertised());
  CHECK(!s.is_open());

  // The longest name is fine; so are dots, dashes and underscores inside.
  char longest[LEMSG_MAX_NAME + 1];
  std::memset(longest, 'n', LEMSG_MAX_NAME);
  longest[LEMSG_MAX_NAME] = '\0';
  CHECK(svc.advertise(longest) == Result::Ok);
  CHECK(svc.hide() == Result::Ok);
  CHECK(svc.advertise("a.b-c_D9") == Result::Ok);
  CHECK(svc.hide() == Result::Ok);

  // A runtime dir so long that the path cannot fit in sun_path.
  char long_dir[200];
  std::memset(long_dir, 'd', sizeof long_dir - 1);
  long_dir[0] = '/';
  long_dir[sizeof long_dir - 1] = '\0';
  setenv("LEMSG_RUNTIME_DIR", long_dir, 1);
  CHECK(svc.advertise("x") == Result::BadParameter);
  CHECK(s.try_open("x") == Result::BadParameter);
  setenv("LEMSG_RUNTIME_DIR", dir.path, 1);

  // A zero or negative timeout is a bad parameter too.
  CHECK(s.open_sync("x", 0) == Result::BadParameter);
  CHECK(s.open_sync("x", -1) == Result::BadParameter);
}

TEST_CASE("messaging: a protocol with an empty or too long id, or a payload above the pool's, makes status() BadParameter") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  char long_id[LEMSG_MAX_PROTOCOL_ID + 2];
  std::memset(long_id, 'p', LEMSG_MAX_PROTOCOL_ID + 1);
  long_id[LEMSG_MAX_PROTOCOL_ID + 1] = '\0';
  const lemsg::Protocol bad[] = {
      {nullptr, 16},
      {"", 16},
      {long_id, 16},
      {"lemsg.test.big", 65},  // the pool holds 64
  };
  const std::size_t timers = loop.timer_count();
  for (const lemsg::Protocol& p : bad) {
    CAPTURE(p.max_payload);
    Service svc(loop, p, pool);
    CHECK(svc.status() == Result::BadParameter);
    CHECK(svc.advertise("bad-protocol") == Result::BadParameter);
    Message m;
    CHECK(svc.create_message(m) == Result::BadParameter);
    CHECK(!m);
    lemsg::RefMap<int, 2> map;
    CHECK(svc.track(map, [](void*, std::uint32_t) {}) == Result::BadParameter);
    Session s(loop, p, pool);
    CHECK(s.status() == Result::BadParameter);
    CHECK(s.open("bad-protocol", [](Result) {}) == Result::BadParameter);
    CHECK(s.open_sync("bad-protocol", 100) == Result::BadParameter);
    CHECK(s.try_open("bad-protocol") == Result::BadParameter);
    CHECK(s.create_message(m) == Result::BadParameter);
    CHECK(loop.timer_count() == timers);  // nothing was taken from the loop
  }
  char path[256];
  dir.socket("bad-protocol", path);
  struct stat st;
  CHECK(stat(path, &st) != 0);

  // The limits themselves are fine.
  char longest[LEMSG_MAX_PROTOCOL_ID + 1];
  std::memset(longest, 'p', LEMSG_MAX_PROTOCOL_ID);
  longest[LEMSG_MAX_PROTOCOL_ID] = '\0';
  const lemsg::Protocol edge{longest, 64};
  Service svc(loop, edge, pool);
  CHECK(svc.status() == Result::Ok);
  Session s(loop, edge, pool);
  CHECK(s.status() == Result::Ok);
  CHECK(svc.advertise("edge") == Result::Ok);
  bool opened = false;
  CHECK(s.open("edge", [&opened](Result r) { opened = r == Result::Ok; }) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return opened; }, kWaitMs));
}

TEST_CASE("messaging: a client with another protocol id or payload size is refused at open") {
  testutil::RuntimeDir dir;
  testutil::LogCapture log;  // each refusal is a warning on both sides
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("mismatch") == Result::Ok);
  const lemsg::Protocol other_id{"lemsg.test.someone-else", 64};
  const lemsg::Protocol other_size{kProto.id, 32};
  Client a(loop, pool, other_id);
  Client b(loop, pool, other_size);
  CHECK(a.open("mismatch") == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return a.opens == 1; }, kWaitMs));
  CHECK(b.open("mismatch") == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return b.opens == 1; }, kWaitMs));
  CHECK(a.open_result == Result::ProtocolMismatch);
  CHECK(b.open_result == Result::SizeMismatch);
  CHECK(!a.s.is_open());
  CHECK(!b.s.is_open());
  // The attempt ended: no retry opens them later.
  testutil::run_until(loop, [] { return false; }, 100);
  CHECK(a.opens == 1);
  CHECK(b.opens == 1);
  CHECK(srv.opens == 0);
  CHECK(srv.svc.session_count() == 0);
  CHECK(log.count[static_cast<int>(lemsg::LogLevel::Warning)] >= 4);

  const pid_t child = testutil::spawn([] {
    die_with_parent();
    testutil::LogCapture quiet;
    Loop cl;
    SmallPool cp;
    Session s(cl, lemsg::Protocol{"lemsg.test.someone-else", 64}, cp);
    CHILD_CHECK(s.try_open("mismatch") == Result::ProtocolMismatch);
    Session t(cl, lemsg::Protocol{kProto.id, 32}, cp);
    CHILD_CHECK(t.open_sync("mismatch", kWaitMs) == Result::SizeMismatch);
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  CHECK(srv.opens == 0);
}

TEST_CASE("messaging: a service's allow-list lets listed uids or gids in and refuses others with NotPermitted") {
  testutil::RuntimeDir dir;
  testutil::LogCapture log;
  Loop loop;
  SmallPool pool;
  const uid_t stranger = getuid() == 4242 ? 4243 : 4242;
  const gid_t our_gid = getgid();
  {
    Server srv(loop, pool);
    lemsg::ServiceOptions bad;
    bad.uid_count = 1;  // but no array
    CHECK(srv.svc.advertise("guarded", bad) == Result::BadParameter);
    lemsg::ServiceOptions only_stranger;
    only_stranger.uids = &stranger;
    only_stranger.uid_count = 1;
    REQUIRE(srv.svc.advertise("guarded", only_stranger) == Result::Ok);
    Client c(loop, pool);
    CHECK(c.open("guarded") == Result::Ok);
    CHECK(testutil::run_until(loop, [&] { return c.opens == 1; }, kWaitMs));
    CHECK(c.open_result == Result::NotPermitted);
    CHECK(!c.s.is_open());
    CHECK(srv.opens == 0);
    CHECK(log.warnings() >= 1);
  }
  {
    Server srv(loop, pool);
    lemsg::ServiceOptions our_group;
    our_group.uids = &stranger;
    our_group.uid_count = 1;
    our_group.gids = &our_gid;
    our_group.gid_count = 1;
    REQUIRE(srv.svc.advertise("guarded", our_group) == Result::Ok);
    Client c(loop, pool);
    CHECK(connect(loop, srv, c, "guarded"));
    c.s.close();
  }
}

// ---- Service: sessions, context, credentials, send, close -------------------

TEST_CASE("messaging: a client that opens before its server exists connects when the server advertises") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Client c(loop, pool);
  CHECK(c.open("not-yet") == Result::Ok);
  CHECK(c.open("not-yet") == Result::Busy);  // already opening
  testutil::run_until(loop, [] { return false; }, 100);
  CHECK(c.opens == 0);
  CHECK(!c.s.is_open());
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("not-yet") == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return c.opens == 1; }, kWaitMs));
  CHECK(c.open_result == Result::Ok);
  CHECK(c.s.is_open());
  CHECK(c.open("not-yet") == Result::Busy);  // already open
  c.s.close();
}

TEST_CASE("messaging: per-session context is set, read back and seen by the close handler") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client a(loop, pool);
  REQUIRE(connect(loop, srv, a, "context"));
  const SessionRef ra = srv.opened;
  CHECK(srv.svc.context(ra) == nullptr);
  int x = 1;
  CHECK(srv.svc.set_context(ra, &x) == Result::Ok);
  CHECK(srv.svc.context(ra) == &x);
  CHECK(srv.svc.context(SessionRef{}) == nullptr);
  CHECK(srv.svc.set_context(SessionRef{}, &x) == Result::NotFound);
  CHECK(srv.svc.set_context(SessionRef{ra.value ^ 0x5a5a5a5au}, &x) == Result::NotFound);
  if (kLocalSessions >= 2) {
    Client b(loop, pool);
    REQUIRE(connect(loop, srv, b, "context"));
    const SessionRef rb = srv.opened;
    CHECK(rb != ra);
    int y = 2;
    CHECK(srv.svc.set_context(rb, &y) == Result::Ok);
    CHECK(srv.svc.context(ra) == &x);
    CHECK(srv.svc.context(rb) == &y);
    b.s.close();
    CHECK(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
    CHECK(srv.context_at_close == &y);
  }
  a.s.close();
  CHECK(testutil::run_until(loop, [&] { return srv.svc.session_count() == 0; }, kWaitMs));
  CHECK(srv.context_at_close == &x);
  // A closed session's context is gone, and its ref stays dead.
  CHECK(srv.svc.context(ra) == nullptr);
  CHECK(srv.svc.set_context(ra, &x) == Result::NotFound);
  Client again(loop, pool);
  REQUIRE(connect(loop, srv, again, "context"));
  CHECK(srv.opened != ra);
  CHECK(srv.svc.context(srv.opened) == nullptr);  // a new session starts with none
  again.s.close();
}

TEST_CASE("messaging: credentials give the client's pid, uid and gid, and the client sees the server's") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("creds") == Result::Ok);
  const pid_t server_pid = getpid();
  const pid_t child = testutil::spawn([server_pid] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    lemsg::Credentials c;
    CHILD_CHECK(s.server_credentials(c) == Result::Closed);  // not open yet
    CHILD_CHECK(s.open_sync("creds", kWaitMs) == Result::Ok);
    CHILD_CHECK(s.server_credentials(c) == Result::Ok);
    CHILD_CHECK(c.pid == server_pid);
    CHILD_CHECK(c.uid == getuid());
    CHILD_CHECK(c.gid == getgid());
    Body b{0, 0};
    CHILD_CHECK(call(s, OpEcho, 1, b) == Result::Ok);
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  CHECK(srv.opens == 1);
  CHECK(srv.creds.pid == child);
  CHECK(srv.creds.uid == getuid());
  CHECK(srv.creds.gid == getgid());
  lemsg::Credentials none;
  CHECK(srv.svc.credentials(SessionRef{}, none) == Result::NotFound);
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  CHECK(srv.svc.credentials(srv.opened, none) == Result::NotFound);
}

TEST_CASE("messaging: session_count and for_each_session see every open session") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client c0(loop, pool), c1(loop, pool), c2(loop, pool);
  Client* clients[3] = {&c0, &c1, &c2};
  SessionRef refs[3];
  CHECK(srv.svc.session_count() == 0);
  for (int i = 0; i < kLocalSessions; ++i) {
    REQUIRE(connect(loop, srv, *clients[i], "counted"));
    refs[i] = srv.opened;
    CHECK(srv.svc.session_count() == static_cast<std::size_t>(i + 1));
  }
  auto visits = [&](SessionRef r) {
    int n = 0;
    srv.svc.for_each_session([&](SessionRef s) { n += s == r; });
    return n;
  };
  int total = 0;
  srv.svc.for_each_session([&](SessionRef) { ++total; });
  CHECK(total == kLocalSessions);
  for (int i = 0; i < kLocalSessions; ++i) CHECK(visits(refs[i]) == 1);

  clients[0]->s.close();
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  CHECK(srv.svc.session_count() == static_cast<std::size_t>(kLocalSessions - 1));
  CHECK(visits(refs[0]) == 0);
  for (int i = 1; i < kLocalSessions; ++i) CHECK(visits(refs[i]) == 1);
  for (int i = 1; i < kLocalSessions; ++i) clients[i]->s.close();
  CHECK(testutil::run_until(loop, [&] { return srv.svc.session_count() == 0; }, kWaitMs));
  total = 0;
  srv.svc.for_each_session([&](SessionRef) { ++total; });
  CHECK(total == 0);
}

TEST_CASE("messaging: Service::send delivers unsolicited messages to the client's receive handler in order") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client c(loop, pool);
  REQUIRE(connect(loop, srv, c, "unsolicited"));
  const SessionRef s = srv.opened;
  for (std::uint32_t v = 1; v <= 3; ++v) {
    Message m;
    REQUIRE(srv.svc.create_message(m) == Result::Ok);
    REQUIRE(set_body(m, OpNote, v));
    CHECK(srv.svc.send(s, std::move(m)) == Result::Ok);
    CHECK(!m);  // consumed
  }
  CHECK(testutil::run_until(loop, [&] { return c.received == 3; }, kWaitMs));
  CHECK(c.got[0] == 1);
  CHECK(c.got[1] == 2);
  CHECK(c.got[2] == 3);

  // Refusals leave the message with the caller.
  Message m;
  REQUIRE(srv.svc.create_message(m) == Result::Ok);
  REQUIRE(set_body(m, OpNote, 9));
  CHECK(srv.svc.send(SessionRef{}, std::move(m)) == Result::NotFound);
  CHECK(srv.svc.send(SessionRef{s.value ^ 1u}, std::move(m)) == Result::NotFound);
  CHECK(static_cast<bool>(m));
  Message copy = m;
  CHECK(srv.svc.send(s, std::move(m)) == Result::BadParameter);  // shared
  CHECK(static_cast<bool>(m));
  copy.release();
  Message empty;
  CHECK(srv.svc.send(s, std::move(empty)) == Result::BadParameter);
  CHECK(srv.svc.send(s, std::move(m)) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return c.received == 4; }, kWaitMs));
  CHECK(c.got[3] == 9);

  // A message the server received cannot be sent on as if it were new.
  srv.keep_notes = true;
  CHECK(tell(c.s, 0) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return srv.notes == 1; }, kWaitMs));
  REQUIRE(srv.last_note);
  CHECK(srv.svc.send(s, std::move(srv.last_note)) == Result::BadParameter);
  srv.last_note.release();
  c.s.close();
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  REQUIRE(srv.svc.create_message(m) == Result::Ok);
  CHECK(srv.svc.send(s, std::move(m)) == Result::NotFound);  // closed
  CHECK(static_cast<bool>(m));
}

TEST_CASE("messaging: a message larger than the protocol's maximum is refused with TooLarge on either side") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;  // 64-byte blocks for a 32-byte protocol
  const lemsg::Protocol small{"lemsg.test.small", 32};
  Server srv(loop, pool, small);
  Client c(loop, pool, small);
  REQUIRE(connect(loop, srv, c, "small"));
  Message m;
  REQUIRE(c.s.create_message(m) == Result::Ok);
  CHECK(m.capacity() == 64);  // the pool's block
  REQUIRE(m.set_size(33) == Result::Ok);
  CHECK(c.s.send(std::move(m)) == Result::TooLarge);
  CHECK(static_cast<bool>(m));
  CHECK(c.s.request(std::move(m), [](Result, Message&) {}) == Result::TooLarge);
  CHECK(static_cast<bool>(m));
  CHECK(c.s.pending_count() == 0);
  Message n;
  REQUIRE(srv.svc.create_message(n) == Result::Ok);
  REQUIRE(n.set_size(33) == Result::Ok);
  CHECK(srv.svc.send(srv.opened, std::move(n)) == Result::TooLarge);
  CHECK(static_cast<bool>(n));
  REQUIRE(n.set_size(32) == Result::Ok);
  CHECK(srv.svc.send(srv.opened, std::move(n)) == Result::Ok);
  REQUIRE(m.set_size(32) == Result::Ok);
  CHECK(c.s.send(std::move(m)) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return c.received == 1 && srv.received == 1; }, kWaitMs));

  // A response that grew past the maximum is refused and stays the server's.
  srv.hook = [&srv](Message& req) {
    if (!req.needs_response()) return false;
    Result r = req.set_size(40);
    (void)r;
    srv.last_respond = srv.svc.respond(std::move(req));
    if (srv.last_respond == Result::TooLarge && req.needs_response()) {
      r = req.set_size(8);
      srv.last_respond = srv.svc.respond(std::move(req));
    }
    return true;
  };
  Reply rep;
  CHECK(ask(c.s, OpEcho, 1, rep) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
  CHECK(srv.last_respond == Result::Ok);
  CHECK(rep.result == Result::Ok);
  CHECK(rep.size == 8);
  c.s.close();
}

// A frame above the socket's default send buffer (net.core.wmem_default,
// about 208 KiB) used to fail with EMSGSIZE: the request was lost and, with
// no timeout, never completed. Each side now raises its sockets' buffers.
TEST_CASE("messaging: a payload above the socket's default send buffer travels both ways at the protocol's maximum") {
  testutil::RuntimeDir dir;
  constexpr std::uint32_t kBig = 300 * 1024;
  const lemsg::Protocol big{"lemsg.test.big", kBig};
  static lemsg::MessagePool<kBig, 4> pool;
  Loop loop;
  Server srv(loop, pool, big);
  Client c(loop, pool, big);
  REQUIRE(srv.svc.status() == Result::Ok);
  REQUIRE(c.s.status() == Result::Ok);
  REQUIRE(connect(loop, srv, c, "big"));
  bool request_intact = false;
  srv.hook = [&](Message& req) {
    const unsigned char* p = static_cast<const unsigned char*>(req.payload());
    request_intact = req.size() == kBig;
    for (std::uint32_t i = 0; request_intact && i < kBig; ++i) request_intact = p[i] == static_cast<unsigned char>(i * 7);
    unsigned char* q = static_cast<unsigned char*>(req.payload());
    for (std::uint32_t i = 0; i < kBig; ++i) q[i] = static_cast<unsigned char>(i * 13);
    srv.last_respond = srv.svc.respond(std::move(req));
    return true;
  };
  Message m;
  REQUIRE(c.s.create_message(m) == Result::Ok);
  REQUIRE(m.set_size(kBig) == Result::Ok);
  unsigned char* p = static_cast<unsigned char*>(m.payload());
  for (std::uint32_t i = 0; i < kBig; ++i) p[i] = static_cast<unsigned char>(i * 7);
  int calls = 0;
  Result result = Result::BadParameter;
  bool response_intact = false;
  CHECK(c.s.request(std::move(m), [&](Result r, Message& resp) {
    ++calls;
    result = r;
    const unsigned char* q = static_cast<const unsigned char*>(resp.payload());
    response_intact = resp.size() == kBig;
    for (std::uint32_t i = 0; response_intact && i < kBig; ++i) response_intact = q[i] == static_cast<unsigned char>(i * 13);
  }) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return calls == 1; }, kWaitMs));
  CHECK(request_intact);
  CHECK(srv.last_respond == Result::Ok);
  CHECK(result == Result::Ok);
  CHECK(response_intact);
  c.s.close();
}

// The socket refuses one response (here: its buffer was lowered under the
// service after the session opened): the request still completes, with the
// reason, and the session goes on.
TEST_CASE("messaging: a response the socket refuses completes the client's request with the reason, and the session goes on") {
  testutil::RuntimeDir dir;
  constexpr std::uint32_t kBig = 300 * 1024;
  const lemsg::Protocol big{"lemsg.test.big", kBig};
  static lemsg::MessagePool<kBig, 4> pool;
  Loop loop;
  Server srv(loop, pool, big);
  REQUIRE(srv.svc.advertise("refused") == Result::Ok);
  srv.hook = [&](Message& req) {
    if (body_of(req).op == OpHold) {
      Result r = req.set_size(kBig);  // a full-size answer
      (void)r;
    }
    srv.last_respond = srv.svc.respond(std::move(req));
    return true;
  };
  testutil::Pipe opened, lowered;
  const pid_t child = testutil::spawn([&] {
    die_with_parent();
    Loop cl;
    static lemsg::MessagePool<kBig, 4> cp;
    Session s(cl, big, cp);
    CHILD_CHECK(s.open_sync("refused", kWaitMs) == Result::Ok);
    opened.put('o');
    CHILD_CHECK(lowered.get(kWaitMs) == 'l');
    Message m, resp;
    CHILD_CHECK(s.create_message(m) == Result::Ok);
    CHILD_CHECK(set_body(m, OpHold, 1));
    CHILD_CHECK(s.request_sync(std::move(m), resp, kWaitMs) == Result::TooBigForSocket);
    CHILD_CHECK(!resp);
    CHILD_CHECK(s.is_open());
    CHILD_CHECK(s.create_message(m) == Result::Ok);
    CHILD_CHECK(set_body(m, OpEcho, 2));
    CHILD_CHECK(s.request_sync(std::move(m), resp, kWaitMs) == Result::Ok);
    CHILD_CHECK(resp.size() == sizeof(Body));
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(testutil::run_until(loop, [&] { return pipe_says(opened, 'o'); }, kWaitMs));
  CHECK(testutil::run_until(loop, [&] { return srv.opens == 1; }, kWaitMs));
  // The session's socket is the one whose buffer was raised for the protocol.
  int raised = 0;
  for (int fd = 0; fd < 1024; ++fd) {
    int have = 0;
    socklen_t len = sizeof have;
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &have, &len) != 0 || have < static_cast<int>(2 * kBig)) continue;
    const int small = 64 * 1024;
    CHECK(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small) == 0);
    ++raised;
  }
  CHECK(raised == 1);
  lowered.put('l');
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  CHECK(srv.last_respond == Result::Ok);  // the echo; the refused one said TooBigForSocket
  // The server never closed the session itself: at most the child's exit did.
  CHECK((srv.closes == 0 || srv.reason == Result::Closed));
}

// A protocol whose largest frame no socket on this system can carry is
// refused when the Service or Session is built, with a Result that says why.
TEST_CASE("messaging: a protocol whose frames cannot be one datagram here is refused at construction with TooBigForSocket") {
  long wmem_max = 0;
  if (FILE* f = std::fopen("/proc/sys/net/core/wmem_max", "r")) {
    if (std::fscanf(f, "%ld", &wmem_max) != 1) wmem_max = 0;
    std::fclose(f);
  }
  REQUIRE(wmem_max > 0);
  // A socket's buffer is at most twice wmem_max; the largest protocol is 16 MiB.
  if (2 * wmem_max + 4096 >= (1L << 24)) {
    MESSAGE("net.core.wmem_max is large enough for 16 MiB frames: nothing to refuse here");
    return;
  }
  constexpr std::uint32_t kHuge = 1u << 24;
  const lemsg::Protocol huge{"lemsg.test.huge", kHuge};
  static lemsg::MessagePool<kHuge, 1> pool;
  Loop loop;
  Service svc(loop, huge, pool);
  Session s(loop, huge, pool);
  CHECK(svc.status() == Result::TooBigForSocket);
  CHECK(s.status() == Result::TooBigForSocket);
  CHECK(std::strstr(lemsg::to_string(Result::TooBigForSocket), "wmem_max") != nullptr);
  testutil::RuntimeDir dir;
  CHECK(svc.advertise("huge") == Result::TooBigForSocket);
  CHECK(s.try_open("huge") == Result::TooBigForSocket);
  CHECK(loop.timer_count() == 0);
}

TEST_CASE("messaging: Service::close runs the client's close handler with Closed and the server's with Ok") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client c(loop, pool);
  REQUIRE(connect(loop, srv, c, "server-closes"));
  Reply rep;
  CHECK(ask(c.s, OpHold, 1, rep, 20000) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == 1; }, kWaitMs));
  const SessionRef s = srv.opened;
  CHECK(srv.svc.close(s) == Result::Ok);
  CHECK(srv.closes == 1);  // at once, from close()
  CHECK(srv.closed == s);
  CHECK(srv.reason == Result::Ok);
  CHECK(srv.svc.session_count() == 0);
  CHECK(srv.svc.close(s) == Result::NotFound);
  CHECK(srv.svc.close(SessionRef{}) == Result::NotFound);
  CHECK(testutil::run_until(loop, [&] { return c.closes == 1; }, kWaitMs));
  CHECK(c.reason == Result::Closed);
  CHECK(!c.s.is_open());
  CHECK(rep.calls == 1);
  CHECK(rep.result == Result::Closed);
  CHECK(srv.svc.respond(std::move(srv.held[0])) == Result::Closed);
  srv.nheld = 0;
  testutil::run_until(loop, [] { return false; }, 50);
  CHECK(c.closes == 1);
  CHECK(srv.closes == 1);
  CHECK(pool.in_use() == 0);
}

// ---- Session: close, reopen, reconnect --------------------------------------

TEST_CASE("messaging: Session::close completes pending requests with Closed before it returns, without the close handler") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client c(loop, pool);
  REQUIRE(connect(loop, srv, c, "client-closes"));
  Reply r1, r2;
  CHECK(ask(c.s, OpHold, 1, r1) == Result::Ok);
  CHECK(ask(c.s, OpHold, 2, r2, 20000) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == 2; }, kWaitMs));
  CHECK(c.s.pending_count() == 2);
  c.s.close();
  CHECK(r1.calls == 1);
  CHECK(r1.result == Result::Closed);
  CHECK(r1.empty);
  CHECK(r2.calls == 1);
  CHECK(r2.result == Result::Closed);
  CHECK(c.s.pending_count() == 0);
  CHECK(!c.s.is_open());
  CHECK(c.closes == 0);
  // Closed sessions refuse traffic; the message stays the caller's.
  Message m;
  REQUIRE(c.s.create_message(m) == Result::Ok);
  CHECK(c.s.send(std::move(m)) == Result::Closed);
  CHECK(c.s.request(std::move(m), [](Result, Message&) {}) == Result::Closed);
  CHECK(static_cast<bool>(m));
  CHECK(c.s.pending_count() == 0);
  c.s.close();  // twice is fine
  // The server sees the client go.
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  CHECK(srv.reason == Result::Closed);
  for (int i = 0; i < srv.nheld; ++i) CHECK(srv.svc.respond(std::move(srv.held[i])) == Result::Closed);
  srv.nheld = 0;
  testutil::run_until(loop, [] { return false; }, 50);
  CHECK(r1.calls == 1);
  CHECK(r2.calls == 1);
  CHECK(c.closes == 0);
}

TEST_CASE("messaging: a session opens again after close") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client c(loop, pool);
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    REQUIRE(connect(loop, srv, c, "reopen"));
    Reply rep;
    CHECK(ask(c.s, OpEcho, static_cast<std::uint32_t>(round), rep) == Result::Ok);
    CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
    CHECK(rep.result == Result::Ok);
    CHECK(rep.body.value == echo_of(static_cast<std::uint32_t>(round)));
    c.s.close();
    CHECK(!c.s.is_open());
    CHECK(testutil::run_until(loop, [&] { return srv.closes == round + 1; }, kWaitMs));
  }
  CHECK(c.opens == 3);
  CHECK(c.closes == 0);
  CHECK(srv.svc.session_count() == 0);

  // A session that is still waiting for its server can be closed and reopened too.
  CHECK(c.open("nobody-here") == Result::Ok);
  c.s.close();
  CHECK(connect(loop, srv, c, "reopen"));
  c.s.close();
}

TEST_CASE("messaging: with set_reconnect the open callback runs again with Ok after the server restarts") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Client c(loop, pool);
  c.s.set_reconnect(true, 10, 100);
  {
    Server first(loop, pool);
    REQUIRE(connect(loop, first, c, "restarts"));
    Reply rep;
    CHECK(ask(c.s, OpHold, 1, rep) == Result::Ok);
    REQUIRE(testutil::run_until(loop, [&] { return first.nheld == 1; }, kWaitMs));
    for (int i = 0; i < first.nheld; ++i) first.held[i].release();  // answered Unanswered
    first.nheld = 0;
    CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
    CHECK(rep.result == Result::Unanswered);
  }  // the server goes away
  CHECK(testutil::run_until(loop, [&] { return c.closes == 1; }, kWaitMs));
  CHECK(c.reason == Result::Closed);
  CHECK(!c.s.is_open());
  testutil::run_until(loop, [] { return false; }, 50);
  CHECK(c.opens == 1);
  {
    Server second(loop, pool);
    REQUIRE(second.svc.advertise("restarts") == Result::Ok);
    CHECK(testutil::run_until(loop, [&] { return c.opens == 2; }, kWaitMs));
    CHECK(c.open_result == Result::Ok);
    CHECK(c.s.is_open());
    Reply rep;
    CHECK(ask(c.s, OpEcho, 5, rep) == Result::Ok);
    CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
    CHECK(rep.result == Result::Ok);
    CHECK(rep.body.value == echo_of(5));
    // close() stops reconnecting.
    c.s.close();
  }
  testutil::run_until(loop, [] { return false; }, 100);
  CHECK(c.opens == 2);
  CHECK(c.closes == 1);
}

// ---- requests and responses -------------------------------------------------

TEST_CASE("messaging: a request the server releases without responding completes with Unanswered") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client c(loop, pool);
  REQUIRE(connect(loop, srv, c, "unanswered"));
  // Dropped inside the receive handler.
  Reply dropped;
  CHECK(ask(c.s, OpDrop, 1, dropped) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return dropped.calls == 1; }, kWaitMs));
  CHECK(dropped.result == Result::Unanswered);
  CHECK(dropped.empty);
  // Kept for a while (with a copy), then released.
  Reply kept;
  CHECK(ask(c.s, OpHold, 2, kept) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == 1; }, kWaitMs));
  Message copy = srv.held[0];
  srv.held[0].release();
  testutil::run_until(loop, [] { return false; }, 50);
  CHECK(kept.calls == 0);  // a copy still holds it
  copy.release();
  srv.nheld = 0;
  CHECK(testutil::run_until(loop, [&] { return kept.calls == 1; }, kWaitMs));
  CHECK(kept.result == Result::Unanswered);
  CHECK(c.s.is_open());
  CHECK(srv.closes == 0);
  c.s.close();
  CHECK(testutil::run_until(loop, [&] { return srv.svc.session_count() == 0; }, kWaitMs));

  // The same for a synchronous request from another process.
  const pid_t child = testutil::spawn([] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.open_sync("unanswered", kWaitMs) == Result::Ok);
    Body b{0, 0};
    CHILD_CHECK(call(s, OpDrop, 3, b) == Result::Unanswered);
    CHILD_CHECK(call(s, OpEcho, 4, b) == Result::Ok);
    CHILD_CHECK(b.value == echo_of(4));
    CHILD_CHECK(s.pending_count() == 0);
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  CHECK(testutil::run_until(loop, [&] { return srv.svc.session_count() == 0; }, kWaitMs));
  CHECK(pool.in_use() == 0);
}

// respond() takes the request's own handle, and it must be the only one:
// after an answer the caller's handle is empty. So "respond twice" is a
// second respond with that (empty) handle, which is BadParameter; the
// documented NotFound ("already answered") cannot be reached from outside,
// because a shared request is refused before it is answered.
TEST_CASE("messaging: a request is answered once; respond refuses answered, shared and non-request messages") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Service other(loop, kProto, pool);
  Client c(loop, pool);
  REQUIRE(connect(loop, srv, c, "respond"));

  Reply rep;
  CHECK(ask(c.s, OpHold, 7, rep) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == 1; }, kWaitMs));
  Message& req = srv.held[0];
  CHECK(req.needs_response());
  CHECK(req.session() == srv.opened);
  CHECK(req.status() == Result::Ok);

  // Another service's request is not ours to answer.
  CHECK(other.respond(std::move(req)) == Result::BadParameter);
  CHECK(req.needs_response());
  // A shared request is refused and stays as it was.
  Message copy = req;
  CHECK(srv.svc.respond(std::move(req)) == Result::BadParameter);
  CHECK(req.needs_response());
  CHECK(copy.needs_response());
  copy.release();

  REQUIRE(set_body(req, OpHold, 70));
  CHECK(srv.svc.respond(std::move(req)) == Result::Ok);
  CHECK(!req);
  CHECK(!req.needs_response());
  // The second respond, with the handle the first one consumed.
  CHECK(srv.svc.respond(std::move(req)) == Result::BadParameter);
  srv.nheld = 0;
  CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
  testutil::run_until(loop, [] { return false; }, 50);
  CHECK(rep.calls == 1);
  CHECK(rep.result == Result::Ok);
  CHECK(rep.body.value == 70);

  // A one-way message is not a request.
  srv.keep_notes = true;
  CHECK(tell(c.s, 0) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return srv.notes == 1; }, kWaitMs));
  REQUIRE(srv.last_note);
  CHECK(!srv.last_note.needs_response());
  CHECK(srv.last_note.session() == srv.opened);
  CHECK(srv.svc.respond(std::move(srv.last_note)) == Result::BadParameter);
  CHECK(static_cast<bool>(srv.last_note));
  srv.last_note.release();
  // Nor is a message the server made, nor an empty one.
  Message made;
  REQUIRE(srv.svc.create_message(made) == Result::Ok);
  CHECK(!made.needs_response());
  CHECK(!made.session());
  CHECK(srv.svc.respond(std::move(made)) == Result::BadParameter);
  CHECK(static_cast<bool>(made));
  Message empty;
  CHECK(srv.svc.respond(std::move(empty)) == Result::BadParameter);
  CHECK(c.s.is_open());
  CHECK(srv.closes == 0);
  c.s.close();
}

TEST_CASE("messaging: more than LEMSG_MAX_PENDING outstanding requests return PendingTableFull") {
  testutil::RuntimeDir dir;
  Loop loop;
  lemsg::MessagePool<64, LEMSG_MAX_PENDING + 8> pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("pending") == Result::Ok);
  testutil::Pipe full;
  testutil::Pipe answered;
  const pid_t child = testutil::spawn([&] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.open_sync("pending", kWaitMs) == Result::Ok);
    Reply rep[LEMSG_MAX_PENDING];
    for (int i = 0; i < LEMSG_MAX_PENDING; ++i)
      CHILD_CHECK(ask(s, OpHold, static_cast<std::uint32_t>(i), rep[i]) == Result::Ok);
    CHILD_CHECK(s.pending_count() == LEMSG_MAX_PENDING);
    Message m;
    CHILD_CHECK(s.create_message(m) == Result::Ok);
    CHILD_CHECK(set_body(m, OpEcho, 99));
    int extra_calls = 0;
    CHILD_CHECK(s.request(std::move(m), [&extra_calls](Result, Message&) { ++extra_calls; }) ==
                Result::PendingTableFull);
    CHILD_CHECK(static_cast<bool>(m));
    Message resp;
    CHILD_CHECK(s.request_sync(std::move(m), resp, 1000) == Result::PendingTableFull);
    CHILD_CHECK(static_cast<bool>(m));
    CHILD_CHECK(s.pending_count() == LEMSG_MAX_PENDING);
    full.put('f');
    // The server answers them all; then there is room again.
    CHILD_CHECK(answered.get(kWaitMs) == 'g');
    CHILD_CHECK(testutil::run_until(cl, [&] { return s.pending_count() == 0; }, kWaitMs));
    for (int i = 0; i < LEMSG_MAX_PENDING; ++i) {
      CHILD_CHECK(rep[i].calls == 1);
      CHILD_CHECK(rep[i].result == Result::Ok);
      CHILD_CHECK(rep[i].body.value == echo_of(static_cast<std::uint32_t>(i)));
    }
    CHILD_CHECK(s.request_sync(std::move(m), resp, kWaitMs) == Result::Ok);
    CHILD_CHECK(body_of(resp).value == echo_of(99));
    CHILD_CHECK(extra_calls == 0);
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(testutil::run_until(loop, [&] { return pipe_says(full, 'f'); }, kWaitMs));
  CHECK(testutil::run_until(loop, [&] { return srv.nheld == LEMSG_MAX_PENDING; }, kWaitMs));
  for (int i = 0; i < srv.nheld; ++i) {
    srv.reply(srv.held[i], echo_of(body_of(srv.held[i]).value));
    CHECK(srv.last_respond == Result::Ok);
  }
  srv.nheld = 0;
  answered.put('g');
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
}

// Transaction ids: slot index + a wrapping sequence (LEMSG_TXN_BITS). Here
// with 6 bits over 4 slots the sequence wraps every 16 uses of a slot.
TEST_CASE("messaging: transaction ids wrap past their space without colliding with a pending id or running out") {
  lemsg::detail::TxnTable<int, 4, 6> t;
  int held = 0, obj = 0;
  std::uint32_t held_id = 0;
  REQUIRE(t.add(&held, held_id) == Result::Ok);
  REQUIRE(held_id != 0);
  std::uint32_t prev = 0;
  int wrong = 0, repeats = 0;
  for (int i = 0; i < 10000; ++i) {
    std::uint32_t id = 0;
    if (t.add(&obj, id) != Result::Ok) {
      ++wrong;
      break;
    }
    if (id == 0 || id == held_id || id >= 64) ++wrong;
    if (id == prev) ++repeats;  // the next id differs even for the same slot
    if (prev && t.lookup(prev) != nullptr) ++wrong;  // a finished id is stale
    if (t.lookup(id) != &obj || t.lookup(held_id) != &held) ++wrong;
    if (t.remove(id) != Result::Ok || t.remove(id) != Result::NotFound) ++wrong;
    prev = id;
  }
  CHECK(wrong == 0);
  CHECK(repeats == 0);
  CHECK(t.size() == 1);
  // All four slots pending: the table is full, and says so.
  int more[3];
  std::uint32_t ids[3];
  for (int i = 0; i < 3; ++i) REQUIRE(t.add(&more[i], ids[i]) == Result::Ok);
  std::uint32_t none = 0;
  CHECK(t.add(&obj, none) == Result::NoMemory);
  CHECK(none == 0);
  CHECK(t.lookup(0) == nullptr);
  CHECK(t.lookup(0xFFFFFFFFu) == nullptr);
}

// The same through a Session: with one request held pending the whole time,
// more requests than the id space holds (in the tiny build, whose
// LEMSG_TXN_BITS is 6) are all answered, and the held one last gets its own
// answer. Before ids wrapped, a session ran out after 2^32 requests.
TEST_CASE("messaging: a session makes more requests than its id space holds while one stays pending") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client c(loop, pool);
  REQUIRE(connect(loop, srv, c, "wrap"));
  Reply held;
  REQUIRE(ask(c.s, OpHold, 7, held) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == 1; }, kWaitMs));
  constexpr int kRequests = LEMSG_TXN_BITS >= 10 ? 3000 : (1 << LEMSG_TXN_BITS) * 3;
  int bad = 0;
  for (int i = 0; i < kRequests && bad == 0; ++i) {
    Reply r;
    if (ask(c.s, OpEcho, static_cast<std::uint32_t>(i), r) != Result::Ok) {
      ++bad;
      break;
    }
    if (!testutil::run_until(loop, [&] { return r.calls == 1; }, kWaitMs)) ++bad;
    if (r.result != Result::Ok || r.body.value != echo_of(static_cast<std::uint32_t>(i))) ++bad;
  }
  CHECK(bad == 0);
  CHECK(held.calls == 0);
  srv.reply(srv.held[0], echo_of(7));
  srv.nheld = 0;
  CHECK(testutil::run_until(loop, [&] { return held.calls == 1; }, kWaitMs));
  CHECK(held.result == Result::Ok);
  CHECK(held.body.value == echo_of(7));
  c.s.close();
}

TEST_CASE("messaging: a client's send returns Overflow while the server does not read, and nothing is lost") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool spool;
  SmallPool cpool;
  Server srv(loop, spool);
  Client c(loop, cpool);
  REQUIRE(connect(loop, srv, c, "client-overflow"));
  // The loop does not run: the server reads nothing meanwhile.
  Message m;
  Result r = Result::Ok;
  int sent = 0;
  for (; sent < 1000000; ++sent) {
    REQUIRE(c.s.create_message(m) == Result::Ok);
    REQUIRE(set_body(m, OpNote, static_cast<std::uint32_t>(sent)));
    r = c.s.send(std::move(m));
    if (r != Result::Ok) break;
  }
  CHECK(r == Result::Overflow);
  CHECK(sent > LEMSG_MAX_OUTGOING);
  CHECK(static_cast<bool>(m));
  CHECK(body_of(m).value == static_cast<std::uint32_t>(sent));
  CHECK(cpool.in_use() == LEMSG_MAX_OUTGOING + 1);
  Reply rep;
  CHECK(ask(c.s, OpEcho, 1, rep) == Result::Overflow);
  CHECK(c.s.pending_count() == 0);
  CHECK(c.s.is_open());

  // Once the server reads, the queue drains in order and sending works again.
  CHECK(testutil::run_until(loop, [&] { return srv.notes == sent; }, kWaitMs));
  CHECK(srv.notes_in_order);
  CHECK(c.s.send(std::move(m)) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return srv.notes == sent + 1; }, kWaitMs));
  CHECK(srv.notes_in_order);
  CHECK(cpool.in_use() == 0);
  CHECK(srv.closes == 0);
  CHECK(c.closes == 0);
  c.s.close();
}

// ---- Message -----------------------------------------------------------------

TEST_CASE("messaging: copying a Message adds a reference to the same pool block") {
  lemsg::MessagePool<64, 4> pool;
  CHECK(pool.capacity() == 4);
  CHECK(pool.max_payload() == 64);
  Message m;
  CHECK(!m);
  REQUIRE(pool.create(m) == Result::Ok);
  CHECK(static_cast<bool>(m));
  CHECK(pool.in_use() == 1);
  CHECK(m.size() == 0);
  CHECK(m.capacity() == 64);
  REQUIRE(m.assign("abc", 3) == Result::Ok);

  Message c = m;
  CHECK(pool.in_use() == 1);
  CHECK(c.payload() == m.payload());
  CHECK(c.size() == 3);
  Message d;
  d = c;
  CHECK(pool.in_use() == 1);
  CHECK(d.payload() == m.payload());
  Message& alias = d;
  d = alias;  // self-assignment keeps it
  CHECK(static_cast<bool>(d));
  CHECK(pool.in_use() == 1);
  // A change through one handle shows through the others: one block.
  REQUIRE(d.set_size(2) == Result::Ok);
  CHECK(m.size() == 2);

  m.release();
  CHECK(!m);
  CHECK(pool.in_use() == 1);
  CHECK(std::memcmp(c.payload(), "ab", 2) == 0);
  Message e = std::move(d);
  CHECK(!d);
  CHECK(static_cast<bool>(e));
  CHECK(pool.in_use() == 1);
  c.release();
  CHECK(pool.in_use() == 1);
  e.release();
  CHECK(pool.in_use() == 0);
  e.release();  // releasing an empty handle is nothing
  CHECK(pool.in_use() == 0);

  // Copies take no blocks: one block, many handles, the pool still has room.
  Message many[8];
  REQUIRE(pool.create(many[0]) == Result::Ok);
  for (int i = 1; i < 8; ++i) many[i] = many[0];
  CHECK(pool.in_use() == 1);
  CHECK(pool.available() == 3);
  for (Message& h : many) h.release();
  CHECK(pool.in_use() == 0);

  // Every block taken: PoolEmpty, and the handle stays empty.
  Message all[4];
  for (Message& h : all) CHECK(pool.create(h) == Result::Ok);
  Message none;
  CHECK(pool.create(none) == Result::PoolEmpty);
  CHECK(!none);
  CHECK(pool.high_water() == 4);
  // create() into a handle that holds a block gives that block back first.
  CHECK(pool.create(all[0]) == Result::Ok);
  CHECK(pool.in_use() == 4);
}

TEST_CASE("messaging: Message checks sizes, and owns the fd it carries") {
  lemsg::MessagePool<64, 2> pool;
  Message empty;
  CHECK(empty.payload() == nullptr);
  CHECK(empty.size() == 0);
  CHECK(empty.capacity() == 0);
  CHECK(empty.set_size(0) == Result::BadParameter);
  CHECK(empty.assign("x", 1) == Result::BadParameter);
  CHECK(empty.take_fd() == -1);
  CHECK(!empty.has_fd());
  CHECK(!empty.needs_response());
  CHECK(empty.status() == Result::Ok);
  CHECK(!empty.session());

  Message m;
  REQUIRE(pool.create(m) == Result::Ok);
  CHECK(m.set_size(64) == Result::Ok);
  CHECK(m.size() == 64);
  CHECK(m.set_size(65) == Result::BadParameter);
  CHECK(m.size() == 64);
  CHECK(m.set_size(0) == Result::Ok);
  unsigned char big[65] = {};
  CHECK(m.assign(big, 65) == Result::BadParameter);
  CHECK(m.size() == 0);
  CHECK(m.assign(nullptr, 1) == Result::BadParameter);
  CHECK(m.assign(nullptr, 0) == Result::Ok);
  CHECK(m.assign(big, 64) == Result::Ok);
  CHECK(m.size() == 64);

  // fds: taken over, replaced (the old one closed), taken back, closed on release.
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  int q[2];
  REQUIRE(pipe2(q, O_CLOEXEC) == 0);
  CHECK(!m.has_fd());
  CHECK(m.set_fd(-1) == Result::BadParameter);
  const int d = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  REQUIRE(d >= 0);
  CHECK(m.set_fd(d) == Result::BadParameter);  // a directory never travels
  CHECK(fd_is_open(d));                        // and stays the caller's
  close(d);
  CHECK(m.set_fd(p[0]) == Result::Ok);
  CHECK(m.has_fd());
  CHECK(m.set_fd(q[0]) == Result::Ok);
  CHECK(!fd_is_open(p[0]));
  CHECK(m.take_fd() == q[0]);
  CHECK(!m.has_fd());
  CHECK(m.take_fd() == -1);
  CHECK(fd_is_open(q[0]));
  CHECK(m.set_fd(q[0]) == Result::Ok);
  Message copy = m;
  copy.release();
  CHECK(fd_is_open(q[0]));  // a copy going does not close it
  m.release();
  CHECK(!fd_is_open(q[0]));  // the last handle does
  close(p[1]);
  close(q[1]);
  CHECK(pool.in_use() == 0);
}

TEST_CASE("messaging: only the used bytes of a message travel") {
  testutil::RuntimeDir dir;
  const lemsg::Protocol big{"lemsg.test.big", 4096};
  Loop loop;
  lemsg::MessagePool<4096, 4> spool;
  lemsg::MessagePool<4096, 4> cpool;

  // Through a real server: it sees 3 bytes; its 2-byte answer arrives as 2.
  {
    Server srv(loop, spool, big);
    std::uint32_t seen_size = 0;
    std::uint32_t seen_capacity = 0;
    char seen[4] = {};
    struct Seen {
      Server* srv;
      std::uint32_t* size;
      std::uint32_t* capacity;
      char* bytes;
    } st{&srv, &seen_size, &seen_capacity, seen};
    srv.hook = [p = &st](Message& m) {
      *p->size = m.size();
      *p->capacity = m.capacity();
      if (m.size() <= 3) std::memcpy(p->bytes, m.payload(), m.size());
      if (m.needs_response()) {
        Result r = m.assign("ok", 2);
        (void)r;
        p->srv->last_respond = p->srv->svc.respond(std::move(m));
      }
      return true;
    };
    Client c(loop, cpool, big);
    REQUIRE(connect(loop, srv, c, "sizes"));
    Message m;
    REQUIRE(c.s.create_message(m) == Result::Ok);
    REQUIRE(m.assign("abc", 3) == Result::Ok);
    CHECK(c.s.send(std::move(m)) == Result::Ok);
    CHECK(testutil::run_until(loop, [&] { return srv.received == 1; }, kWaitMs));
    CHECK(seen_size == 3);
    CHECK(seen_capacity == 4096);
    CHECK(std::memcmp(seen, "abc", 3) == 0);
    REQUIRE(c.s.create_message(m) == Result::Ok);
    REQUIRE(m.assign("xyz", 3) == Result::Ok);
    Reply rep;
    CHECK(c.s.request(std::move(m),
                      [&rep](Result r, Message& a) {
                        ++rep.calls;
                        rep.result = r;
                        rep.size = a.size();
                      }) == Result::Ok);
    CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
    CHECK(seen_size == 3);
    CHECK(rep.result == Result::Ok);
    CHECK(rep.size == 2);
    c.s.close();
  }

  // On the wire, seen by a raw server: a 16-byte header and the 3 bytes.
  char path[256];
  dir.socket("raw", path);
  const int lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  REQUIRE(lfd >= 0);
  sockaddr_un sa;
  REQUIRE(unix_address(path, sa));
  REQUIRE(bind(lfd, reinterpret_cast<const sockaddr*>(&sa), sizeof sa) == 0);
  REQUIRE(listen(lfd, 4) == 0);
  Client c(loop, cpool, big);
  REQUIRE(c.open("raw") == Result::Ok);
  struct pollfd pl = {lfd, POLLIN, 0};
  REQUIRE(poll(&pl, 1, kWaitMs) == 1);
  const int fd = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
  REQUIRE(fd >= 0);
  unsigned char buf[8192];
  const long hello = raw_recv(fd, buf, sizeof buf, kWaitMs);
  CHECK(hello == static_cast<long>(lemsg::wire::header_size + 8 + std::strlen(big.id)));
  lemsg::wire::encode(lemsg::wire::Header{lemsg::wire::FrameType::Welcome, 0, 0, 0}, buf);
  REQUIRE(send(fd, buf, lemsg::wire::header_size, MSG_NOSIGNAL) == static_cast<ssize_t>(lemsg::wire::header_size));
  REQUIRE(testutil::run_until(loop, [&] { return c.opens == 1; }, kWaitMs));
  CHECK(c.open_result == Result::Ok);

  Message m;
  REQUIRE(c.s.create_message(m) == Result::Ok);
  REQUIRE(m.assign("abc", 3) == Result::Ok);
  CHECK(c.s.send(std::move(m)) == Result::Ok);
  long n = raw_recv(fd, buf, sizeof buf, kWaitMs);
  CHECK(n == 16 + 3);
  lemsg::wire::Header h;
  CHECK(lemsg::wire::decode(buf, static_cast<std::size_t>(n > 0 ? n : 0), 4096, h) == Result::Ok);
  CHECK(h.type == lemsg::wire::FrameType::Message);
  CHECK(h.length == 3);
  CHECK(std::memcmp(buf + 16, "abc", 3) == 0);

  REQUIRE(c.s.create_message(m) == Result::Ok);
  REQUIRE(m.assign("def", 3) == Result::Ok);
  Reply rep;
  CHECK(c.s.request(std::move(m),
                    [&rep](Result r, Message& a) {
                      ++rep.calls;
                      rep.result = r;
                      rep.size = a.size();
                    }) == Result::Ok);
  n = raw_recv(fd, buf, sizeof buf, kWaitMs);
  CHECK(n == 16 + 3);
  CHECK(lemsg::wire::decode(buf, static_cast<std::size_t>(n > 0 ? n : 0), 4096, h) == Result::Ok);
  CHECK(h.type == lemsg::wire::FrameType::Request);
  CHECK(h.length == 3);
  // A 5-byte answer arrives as 5 bytes.
  lemsg::wire::encode(lemsg::wire::Header{lemsg::wire::FrameType::Response, 0, h.txn, 5}, buf);
  std::memcpy(buf + 16, "hello", 5);
  REQUIRE(send(fd, buf, 16 + 5, MSG_NOSIGNAL) == 16 + 5);
  CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
  CHECK(rep.result == Result::Ok);
  CHECK(rep.size == 5);
  c.s.close();
  close(fd);
  close(lfd);
}

TEST_CASE("messaging: an fd sent with a request reaches the server, and one in the response reaches the client") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("fds") == Result::Ok);
  const int server_fds = testutil::count_open_fds();
  const pid_t child = testutil::spawn([] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.open_sync("fds", kWaitMs) == Result::Ok);
    const int fds = testutil::count_open_fds();
    for (int round = 0; round < 3; ++round) {
      int p[2];
      CHILD_CHECK(pipe2(p, O_CLOEXEC) == 0);
      CHILD_CHECK(write(p[1], "ping", 4) == 4);
      close(p[1]);
      Message m;
      CHILD_CHECK(s.create_message(m) == Result::Ok);
      CHILD_CHECK(set_body(m, OpFd, 0));
      CHILD_CHECK(m.set_fd(p[0]) == Result::Ok);
      Message resp;
      CHILD_CHECK(s.request_sync(std::move(m), resp, kWaitMs) == Result::Ok);
      CHILD_CHECK(resp.size() == 4);
      CHILD_CHECK(std::memcmp(resp.payload(), "ping", 4) == 0);
      CHILD_CHECK(resp.has_fd());
      const int fd = resp.take_fd();
      CHILD_CHECK(fd >= 0);
      CHILD_CHECK((fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
      char got[8] = {};
      CHILD_CHECK(read(fd, got, sizeof got) == 4);
      CHILD_CHECK(std::memcmp(got, "pong", 4) == 0);
      close(fd);
      CHILD_CHECK(testutil::count_open_fds() == fds);
    }
    // A response whose fd is never taken closes it with the message.
    int p[2];
    CHILD_CHECK(pipe2(p, O_CLOEXEC) == 0);
    close(p[1]);
    Message m;
    CHILD_CHECK(s.create_message(m) == Result::Ok);
    CHILD_CHECK(set_body(m, OpFd, 0));
    CHILD_CHECK(m.set_fd(p[0]) == Result::Ok);
    Message resp;
    CHILD_CHECK(s.request_sync(std::move(m), resp, kWaitMs) == Result::Ok);
    CHILD_CHECK(resp.has_fd());
    resp.release();
    CHILD_CHECK(testutil::count_open_fds() == fds);
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  CHECK(srv.received == 4);
  CHECK(srv.last_respond == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  CHECK(testutil::count_open_fds() == server_fds);
  CHECK(pool.in_use() == 0);
}

// ---- tables -------------------------------------------------------------------

TEST_CASE("messaging: track refuses a map twice with Duplicate and more than LEMSG_MAX_TRACKED maps with TrackTableFull") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  lemsg::RefMap<int, 4> maps[LEMSG_MAX_TRACKED + 1];
  int released[LEMSG_MAX_TRACKED + 1] = {};
  CHECK(srv.svc.track(maps[0], nullptr) == Result::BadParameter);
  for (int i = 0; i < LEMSG_MAX_TRACKED; ++i) {
    CAPTURE(i);
    int* count = &released[i];
    CHECK(srv.svc.track(maps[i], [count](void*, std::uint32_t) { ++*count; }) == Result::Ok);
  }
  CHECK(srv.svc.track(maps[0], [](void*, std::uint32_t) {}) == Result::Duplicate);
  CHECK(srv.svc.track(maps[LEMSG_MAX_TRACKED], [](void*, std::uint32_t) {}) == Result::TrackTableFull);

  // Every tracked map gives back what the closing session owned, and only that.
  Client c(loop, pool);
  REQUIRE(connect(loop, srv, c, "tracked"));
  int objs[3] = {};
  std::uint32_t refs[LEMSG_MAX_TRACKED + 1][3];
  for (int i = 0; i <= LEMSG_MAX_TRACKED; ++i) {
    CHECK(maps[i].add(&objs[0], refs[i][0], srv.opened.value) == Result::Ok);
    CHECK(maps[i].add(&objs[1], refs[i][1], srv.opened.value) == Result::Ok);
    CHECK(maps[i].add(&objs[2], refs[i][2]) == Result::Ok);  // nobody's
  }
  c.s.close();
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  for (int i = 0; i < LEMSG_MAX_TRACKED; ++i) {
    CAPTURE(i);
    CHECK(released[i] == 2);
    CHECK(maps[i].size() == 1);
    CHECK(maps[i].lookup(refs[i][0]) == nullptr);
    CHECK(maps[i].lookup(refs[i][2]) == &objs[2]);
  }
  CHECK(maps[LEMSG_MAX_TRACKED].size() == 3);  // not tracked: untouched
}

// In a build whose loop has fewer watches than sessions, the watch table
// fills first, and the refusal says so.
TEST_CASE("messaging: a client beyond LEMSG_MAX_SESSIONS is refused with SessionTableFull") {
  constexpr int kFill = std::min(LEMSG_MAX_SESSIONS, LEMSG_MAX_WATCHES - 1);
  constexpr Result kRefusal =
      LEMSG_MAX_SESSIONS <= LEMSG_MAX_WATCHES - 1 ? Result::SessionTableFull : Result::WatchTableFull;
  testutil::RuntimeDir dir;
  testutil::LogCapture log;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("full") == Result::Ok);
  char path[256];
  dir.socket("full", path);
  // Raw clients fill the table (they need no timers or watches here).
  int raw[kFill];
  int connected = 0;
  for (int i = 0; i < kFill; ++i) {
    raw[i] = raw_connect(path);
    if (raw[i] < 0) break;
    ++connected;
    CHECK(raw_hello(raw[i], kProto));
    // Let the server take it before the next, so the backlog never fills.
    CHECK(testutil::run_until(loop, [&] { return srv.opens == i + 1; }, kWaitMs));
  }
  REQUIRE(connected == kFill);
  CHECK(srv.svc.session_count() == static_cast<std::size_t>(kFill));

  const pid_t child = testutil::spawn([] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    // Each asks again while the table stays full (try_open for
    // LEMSG_OPEN_TIMEOUT_MS), then says why it gave up.
    CHILD_CHECK(s.try_open("full") == kRefusal);
    CHILD_CHECK(s.open_sync("full", 300) == kRefusal);
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  CHECK(srv.svc.session_count() == static_cast<std::size_t>(kFill));
  CHECK(srv.opens == kFill);
  CHECK(log.warnings() >= 2);  // both refusals were logged
  CHECK(std::strstr(log.last, kRefusal == Result::SessionTableFull ? "LEMSG_MAX_SESSIONS" : "LEMSG_MAX_WATCHES") !=
        nullptr);

  // A slot that frees up is usable again.
  close(raw[0]);
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  const pid_t next = testutil::spawn([] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.try_open("full") == Result::Ok);
    Body b{0, 0};
    CHILD_CHECK(call(s, OpEcho, 2, b) == Result::Ok);
    CHILD_CHECK(b.value == echo_of(2));
    return 0;
  });
  REQUIRE(next > 0);
  CHECK(run_until_exit(loop, next, kWaitMs) == 0);
  for (int i = 1; i < connected; ++i) close(raw[i]);
  CHECK(testutil::run_until(loop, [&] { return srv.svc.session_count() == 0; }, kWaitMs));
}

// ---- handlers that destroy or close their own object ------------------------
//
// Legato code deletes a session in its close handler; any handler may destroy
// the object that called it. These cases destroy Services and Sessions from
// inside each kind of handler. The objects live on the heap (Doomed), so the
// ASan builds report any read of them after the handler returns. The memory
// is filled with bytes of 3 first, which read as a live, open object (and as
// garbage pointers), so the library goes on where it should stop: ASan then
// reports, and without ASan the run misbehaves.

namespace {

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
bool open_doomed(Loop& loop, Server& srv, Session& s, const char* name) {
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

bool send_note(Service& svc, SessionRef to, std::uint32_t value) {
  Message m;
  return svc.create_message(m) == Result::Ok && set_body(m, OpNote, value) && svc.send(to, std::move(m)) == Result::Ok;
}

}  // namespace

TEST_CASE("messaging: a session may destroy itself in its close handler, with or without set_reconnect") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("doomed-close") == Result::Ok);
  for (int reconnect = 0; reconnect < 2; ++reconnect) {
    CAPTURE(reconnect);
    Doomed<Session> s;
    s.make(loop, kProto, pool);
    s->set_reconnect(reconnect != 0, 10, 100);
    int closes = 0;
    s->set_close_handler([&](Result) {
      ++closes;
      s.destroy();
    });
    REQUIRE(open_doomed(loop, srv, *s, "doomed-close"));
    Reply rep;
    CHECK(ask(*s, OpHold, 1, rep) == Result::Ok);
    REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == 1; }, kWaitMs));
    CHECK(srv.svc.close(srv.opened) == Result::Ok);
    CHECK(testutil::run_until(loop, [&] { return !s; }, kWaitMs));
    CHECK(closes == 1);
    CHECK(rep.calls == 1);
    CHECK(rep.result == Result::Closed);
    testutil::run_until(loop, [] { return false; }, 100);  // nothing may reach the dead session
    CHECK(srv.svc.session_count() == 0);
    srv.held[0].release();
    srv.nheld = 0;
  }
}

TEST_CASE("messaging: a session may destroy itself in its receive handler while more frames wait") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("doomed-receive") == Result::Ok);
  Doomed<Session> s;
  s.make(loop, kProto, pool);
  int received = 0;
  s->set_receive_handler([&](Message&) {
    ++received;
    s.destroy();
  });
  REQUIRE(open_doomed(loop, srv, *s, "doomed-receive"));
  for (std::uint32_t i = 0; i < 4; ++i) CHECK(send_note(srv.svc, srv.opened, i));
  CHECK(testutil::run_until(loop, [&] { return !s && srv.closes == 1; }, kWaitMs));
  CHECK(received == 1);
  CHECK(srv.reason == Result::Closed);
}

TEST_CASE("messaging: a session may destroy itself in a response handler that completes with Ok, Timeout or Closed") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("doomed-response") == Result::Ok);
  // 0: two answered requests; 1: two that time out; 2: two the server's
  // close completes; 3: two that Session::close completes.
  for (int mode = 0; mode < 4; ++mode) {
    CAPTURE(mode);
    Doomed<Session> s;
    s.make(loop, kProto, pool);
    int closes = 0;
    s->set_close_handler([&closes](Result) { ++closes; });
    REQUIRE(open_doomed(loop, srv, *s, "doomed-response"));
    struct Seen {
      int calls = 0;
      Result first = Result::Ok;
      Result second = Result::Ok;
      Doomed<Session>* s;
    } seen;
    seen.s = &s;
    auto done = [&seen](Result r, Message&) {
      if (++seen.calls == 1) {
        seen.first = r;
        seen.s->destroy();
      } else {
        seen.second = r;
      }
    };
    const std::uint32_t op = mode == 0 ? OpEcho : OpHold;
    const std::uint32_t timeout = mode == 1 ? 1 : 0;
    for (std::uint32_t i = 0; i < 2; ++i) {
      Message m;
      REQUIRE(s->create_message(m) == Result::Ok);
      REQUIRE(set_body(m, op, i));
      CHECK(s->request(std::move(m), done, timeout) == Result::Ok);
    }
    if (mode >= 2) REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == 2; }, kWaitMs));
    if (mode == 2) CHECK(srv.svc.close(srv.opened) == Result::Ok);
    if (mode == 3) s->close();
    CHECK(testutil::run_until(loop, [&] { return !s; }, kWaitMs));
    CHECK(seen.calls == 2);
    CHECK(seen.first == (mode == 0 ? Result::Ok : mode == 1 ? Result::Timeout : Result::Closed));
    // The second completes from the destructor, unless it was answered in
    // the same batch or timed out in the same pass: never twice, never lost.
    if (mode >= 2) CHECK(seen.second == Result::Closed);
    CHECK(closes == 0);
    testutil::run_until(loop, [&] { return srv.svc.session_count() == 0; }, kWaitMs);
    CHECK(srv.svc.session_count() == 0);
    for (int i = 0; i < srv.nheld; ++i) srv.held[i].release();
    srv.nheld = 0;
  }
}

TEST_CASE("messaging: a session may destroy itself in its open callback, on success and on refusal") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("doomed-open") == Result::Ok);
  const uid_t stranger = getuid() == 4242 ? 4243 : 4242;
  Server guarded(loop, pool);
  lemsg::ServiceOptions only_stranger;
  only_stranger.uids = &stranger;
  only_stranger.uid_count = 1;
  REQUIRE(guarded.svc.advertise("doomed-guarded", only_stranger) == Result::Ok);
  const lemsg::Protocol other{"lemsg.test.messaging.other", 64};
  // 0: opens; 1: NotPermitted at accept; 2: ProtocolMismatch at hello.
  for (int mode = 0; mode < 3; ++mode) {
    CAPTURE(mode);
    testutil::LogCapture log;  // the refusals warn
    Doomed<Session> s;
    s.make(loop, mode == 2 ? other : kProto, pool);
    struct Seen {
      int calls = 0;
      Result r = Result::Ok;
      Doomed<Session>* s;
    } seen;
    seen.s = &s;
    CHECK(s->open(mode == 1 ? "doomed-guarded" : "doomed-open", [&seen](Result r) {
      ++seen.calls;
      seen.r = r;
      seen.s->destroy();
    }) == Result::Ok);
    CHECK(testutil::run_until(loop, [&] { return !s; }, kWaitMs));
    CHECK(seen.calls == 1);
    CHECK(seen.r == (mode == 0 ? Result::Ok : mode == 1 ? Result::NotPermitted : Result::ProtocolMismatch));
    testutil::run_until(loop, [&] { return srv.svc.session_count() == 0; }, kWaitMs);
    CHECK(srv.svc.session_count() == 0);
  }
}

TEST_CASE("messaging: a service may destroy itself in its receive handler while more frames wait") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Doomed<Service> svc;
  svc.make(loop, kProto, pool);
  int received = 0;
  svc->set_receive_handler([&](Message&) {
    ++received;
    svc.destroy();
  });
  REQUIRE(svc->advertise("doomed-service-receive") == Result::Ok);
  Client c(loop, pool);
  CHECK(c.open("doomed-service-receive") == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return c.opens == 1; }, kWaitMs));
  for (std::uint32_t i = 0; i < 4; ++i) CHECK(tell(c.s, i) == Result::Ok);
  Reply rep;
  CHECK(ask(c.s, OpEcho, 1, rep) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return !svc && c.closes == 1 && rep.calls == 1; }, kWaitMs));
  CHECK(received == 1);
  CHECK(rep.result == Result::Closed);
}

TEST_CASE("messaging: a service may destroy itself in its open handler") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Doomed<Service> svc;
  svc.make(loop, kProto, pool);
  int opens = 0, closes = 0;
  svc->set_open_handler([&](SessionRef) {
    ++opens;
    svc.destroy();
  });
  svc->set_close_handler([&closes](SessionRef, Result) { ++closes; });
  REQUIRE(svc->advertise("doomed-service-open") == Result::Ok);
  Client c(loop, pool);
  CHECK(c.open("doomed-service-open") == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return !svc && c.closes == 1; }, kWaitMs));
  CHECK(opens == 1);
  CHECK(closes == 1);  // the destructor closed the session it had just opened
}

TEST_CASE("messaging: a service may destroy itself in its close handler, and its destructor does not run a close twice") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Doomed<Service> svc;
  svc.make(loop, kProto, pool);
  int closes = 0;
  Result reasons[4] = {};
  svc->set_close_handler([&](SessionRef, Result why) {
    if (closes < 4) reasons[closes] = why;
    ++closes;
    svc.destroy();  // a second call, from inside the destructor, does nothing
  });
  REQUIRE(svc->advertise("doomed-service-close") == Result::Ok);
  Client a(loop, pool), b(loop, pool);
  CHECK(a.open("doomed-service-close") == Result::Ok);
  CHECK(b.open("doomed-service-close") == Result::Ok);
  REQUIRE(testutil::run_until(
      loop, [&] { return a.opens == 1 && b.opens == 1 && svc->session_count() == 2; }, kWaitMs));
  a.s.close();
  CHECK(testutil::run_until(loop, [&] { return !svc && b.closes == 1; }, kWaitMs));
  CHECK(closes == 2);  // a's (Closed), then b's from the destructor (Ok)
  CHECK(reasons[0] == Result::Closed);
  CHECK(reasons[1] == Result::Ok);
  CHECK(a.closes == 0);
}

TEST_CASE("messaging: a service may destroy itself in a TrackRelease callback") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  lemsg::RefMap<int, 8> map;
  int objs[3] = {1, 2, 3};
  Doomed<Service> svc;
  svc.make(loop, kProto, pool);
  int released = 0;
  svc->set_open_handler([&](SessionRef s) {
    for (int& o : objs) {
      std::uint32_t ref = 0;
      CHECK(map.add(&o, ref, s.value) == Result::Ok);
    }
  });
  REQUIRE(svc->track(map, [&](void*, std::uint32_t) {
    ++released;
    svc.destroy();
  }) == Result::Ok);
  REQUIRE(svc->advertise("doomed-service-track") == Result::Ok);
  Client c(loop, pool);
  CHECK(c.open("doomed-service-track") == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return c.opens == 1 && map.size() == 3; }, kWaitMs));
  c.s.close();
  CHECK(testutil::run_until(loop, [&] { return !svc; }, kWaitMs));
  CHECK(released == 3);  // every entry the session owned is still released once
  CHECK(map.size() == 0);
}

TEST_CASE("messaging: a request kept after its Service is gone may still be released or dropped") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Doomed<Server> srv;
  srv.make(loop, pool);
  REQUIRE(srv->svc.advertise("gone-service") == Result::Ok);
  Client c(loop, pool);
  CHECK(c.open("gone-service") == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return c.opens == 1; }, kWaitMs));
  Reply rep;
  CHECK(ask(c.s, OpHold, 7, rep) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return srv->nheld == 1; }, kWaitMs));
  Message kept = std::move(srv->held[0]);
  srv->nheld = 0;
  srv.destroy();
  CHECK(body_of(kept).value == 7u);
  kept.release();  // must not answer through the dead service
  CHECK(testutil::run_until(loop, [&] { return rep.calls == 1 && c.closes == 1; }, kWaitMs));
  CHECK(rep.result == Result::Closed);
  CHECK(pool.in_use() == 0);
}

TEST_CASE("messaging: close() in the close handler stops set_reconnect from opening again") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("close-in-close") == Result::Ok);
  Client c(loop, pool);
  c.s.set_reconnect(true, 1, 10);
  c.s.set_close_handler([&c](Result why) {
    ++c.closes;
    c.reason = why;
    c.s.close();
  });
  REQUIRE(connect(loop, srv, c, "close-in-close"));
  CHECK(srv.svc.close(srv.opened) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return c.closes == 1; }, kWaitMs));
  // The server is still there: a reconnect would open within a few ms.
  testutil::run_until(loop, [&] { return srv.opens > 1; }, 300);
  CHECK(c.opens == 1);
  CHECK(srv.opens == 1);
  CHECK(!c.s.is_open());
}

TEST_CASE("messaging: Session::close in a response handler while the server goes away ends the session quietly") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client c(loop, pool);
  c.s.set_reconnect(true, 1, 10);
  REQUIRE(connect(loop, srv, c, "close-in-response"));
  struct Seen {
    int calls = 0;
    Result r[2] = {Result::Ok, Result::Ok};
    Session* s;
  } seen;
  seen.s = &c.s;
  auto done = [&seen](Result r, Message&) {
    if (seen.calls < 2) seen.r[seen.calls] = r;
    if (++seen.calls == 1) seen.s->close();
  };
  for (std::uint32_t i = 0; i < 2; ++i) {
    Message m;
    REQUIRE(c.s.create_message(m) == Result::Ok);
    REQUIRE(set_body(m, OpHold, i));
    CHECK(c.s.request(std::move(m), done) == Result::Ok);
  }
  REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == 2; }, kWaitMs));
  CHECK(srv.svc.close(srv.opened) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return seen.calls == 2; }, kWaitMs));
  testutil::run_until(loop, [&] { return srv.opens > 1; }, 300);
  CHECK(seen.calls == 2);
  CHECK(seen.r[0] == Result::Closed);
  CHECK(seen.r[1] == Result::Closed);
  CHECK(c.closes == 0);  // close() was called: the close handler is not
  CHECK(srv.opens == 1);  // and it does not reconnect
  CHECK(!c.s.is_open());
  for (int i = 0; i < srv.nheld; ++i) srv.held[i].release();
  srv.nheld = 0;
}

TEST_CASE("messaging: open() never runs its callback before it returns, even when the socket file refuses it") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("refused-now") == Result::Ok);
  char path[256];
  dir.socket("refused-now", path);
  REQUIRE(chmod(path, 0) == 0);
  // connect() fails with EACCES at once: as root only after dropping to
  // nobody (root passes any mode), so the client is a child.
  const pid_t child = testutil::spawn([&] {
    if (getuid() == 0) {
      CHILD_CHECK(setgroups(0, nullptr) == 0 && setgid(65534) == 0 && setuid(65534) == 0);
    }
    die_with_parent();  // after setuid, which clears it
    testutil::LogCapture log;  // the refusal warns
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    struct Seen {
      bool inside = false;
      int calls = 0;
      int calls_inside = 0;
      Result r = Result::Ok;
    } seen;
    seen.inside = true;
    CHILD_CHECK(s.open("refused-now", [&seen](Result r) {
      ++seen.calls;
      if (seen.inside) ++seen.calls_inside;
      seen.r = r;
    }) == Result::Ok);
    seen.inside = false;
    CHILD_CHECK(seen.calls_inside == 0);
    CHILD_CHECK(testutil::run_until(cl, [&] { return seen.calls >= 1; }, kWaitMs));
    testutil::run_until(cl, [] { return false; }, 50);
    CHILD_CHECK(seen.calls == 1);
    CHILD_CHECK(seen.r == Result::NotPermitted);
    // close() before the loop runs drops the report with the attempt.
    seen.calls = 0;
    CHILD_CHECK(s.open("refused-now", [&seen](Result) { ++seen.calls; }) == Result::Ok);
    s.close();
    testutil::run_until(cl, [] { return false; }, 50);
    CHILD_CHECK(seen.calls == 0);
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
}

// ---- destruction order ------------------------------------------------------

namespace {

// Runs `mistake` in a child whose log lines go to a pipe; true when the
// child died with SIGABRT and one of its lines contains `words`.
template <typename F>
bool aborts_naming(F mistake, const char* words) {
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

}  // namespace

TEST_CASE("messaging: destroying a Loop before a Service or Session on it stops with an assertion naming the mistake") {
  testutil::RuntimeDir dir;
  CHECK(aborts_naming(
      [] {
        Loop* loop = new Loop;
        SmallPool pool;
        Session s(*loop, kProto, pool);
        delete loop;
        Result r = s.send(Message());
        (void)r;
      },
      "Loop destroyed before"));
  CHECK(aborts_naming(
      [] {
        Loop* loop = new Loop;
        SmallPool pool;
        Service svc(*loop, kProto, pool);
        delete loop;
        Result r = svc.hide();
        (void)r;
      },
      "Loop destroyed before"));
}

TEST_CASE("messaging: destroying a MessagePool while a Message or a Session uses it stops with an assertion naming the mistake") {
  testutil::RuntimeDir dir;
  CHECK(aborts_naming(
      [] {
        Message m;
        {
          SmallPool pool;
          Result r = pool.create(m);
          (void)r;
        }
        m.release();
      },
      "MessagePool destroyed while"));
  CHECK(aborts_naming(
      [] {
        Loop loop;
        SmallPool* pool = new SmallPool;
        Session s(loop, kProto, *pool);
        delete pool;
        Message m;
        Result r = s.create_message(m);
        (void)r;
      },
      "MessagePool destroyed while"));
}

// ---- diagnostics ----------------------------------------------------------------

namespace {
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
}  // namespace

// What a new user needs on day one: at debug level the library says what it
// decided and why, naming the service, for each open, close, wait, timeout
// and constructor refusal.
TEST_CASE("messaging: at debug level the library logs its waits, opens, closes, timeouts and refusals by name") {
  testutil::RuntimeDir dir;
  LogLines log;
  Loop loop;
  {
    lemsg::MessagePool<16, 2> tiny_pool;
    Service bad(loop, kProto, tiny_pool);
    CHECK(bad.status() == Result::BadParameter);
    CHECK(log.has("max_payload 64", "above the pool's 16"));
  }
  SmallPool pool;
  {
    Session s(loop, kProto, pool);
    CHECK(s.open_sync("absent", 50) == Result::Timeout);
    CHECK(log.has("session absent", "no server at", "waiting up to 50 ms"));
    CHECK(log.has("session absent", "open_sync after 50 ms", "timed out"));
    CHECK(s.try_open("absent") == Result::NotFound);
    CHECK(std::strstr(lemsg::to_string(Result::NotFound), "no server") != nullptr);
  }
  Server srv(loop, pool);
  Client c(loop, pool);
  REQUIRE(connect(loop, srv, c, "logged"));
  CHECK(log.has("service logged", "session opened for pid"));
  CHECK(log.has("session logged", "open (server pid"));
  Reply rep;
  REQUIRE(ask(c.s, OpHold, 1, rep, 20) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
  CHECK(rep.result == Result::Timeout);
  CHECK(log.has("session logged", "request", "timed out"));
  srv.nheld = 0;
  srv.held[0].release();
  CHECK(srv.svc.close(srv.opened) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return c.closes == 1; }, kWaitMs));
  CHECK(log.has("service logged", "session of pid", "closed by this side"));
  CHECK(log.has("session logged", "closed from the server's side"));
}

// ---- threads ------------------------------------------------------------------

// WouldDeadlock is about the thread, not the process: a synchronous client
// on another thread than the service's loop is answered.
TEST_CASE("messaging: a synchronous request to a service on another thread's loop of this process is answered") {
  testutil::RuntimeDir dir;
  std::atomic<int> state{0};  // 1: advertised, 2: stop, -1: failed
  std::thread server([&state] {
    Loop loop;
    SmallPool pool;
    Server srv(loop, pool);
    if (srv.svc.advertise("threaded") != Result::Ok) {
      state.store(-1);
      return;
    }
    state.store(1);
    testutil::run_until(loop, [&] { return state.load() == 2; }, 4 * kWaitMs);
  });
  const long long end = testutil::now_ms() + kWaitMs;
  while (state.load() == 0 && testutil::now_ms() < end) usleep(1000);
  CHECK(state.load() == 1);
  if (state.load() == 1) {
    Loop loop;
    SmallPool pool;
    Session s(loop, kProto, pool);
    CHECK(s.open_sync("threaded", kWaitMs) == Result::Ok);
    for (std::uint32_t i = 0; i < 20; ++i) {
      Body b{0, 0};
      CHECK(call(s, OpEcho, i, b) == Result::Ok);
      CHECK(b.value == echo_of(i));
    }
    s.close();
  }
  state.store(2);
  server.join();
}

// The owner of a loop is the thread that dispatches it, not the one that
// built it: a loop built here and run by a thread that starts later serves a
// synchronous client on this thread.
TEST_CASE("messaging: a loop built on one thread and run by a thread that starts later gives no false WouldDeadlock") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("built-here") == Result::Ok);
  std::atomic<int> go{0}, stop{0};
  std::thread runner([&] {
    for (int i = 0; i < kWaitMs && go.load() == 0; ++i) usleep(1000);
    usleep(20000);  // the client below is inside open_sync by now
    testutil::run_until(loop, [&] { return stop.load() != 0; }, 4 * kWaitMs);
  });
  {
    Loop cloop;
    SmallPool cpool;
    Session s(cloop, kProto, cpool);
    go.store(1);
    CHECK(s.open_sync("built-here", kWaitMs) == Result::Ok);
    Body b{0, 0};
    if (s.is_open()) CHECK(call(s, OpEcho, 5, b) == Result::Ok);
    CHECK(b.value == echo_of(5));
    s.close();
  }
  stop.store(1);
  runner.join();
}

// A loop embedded in another loop (fill_pollfds/dispatch) is owned by the
// thread that dispatches it: a synchronous call from that thread to its own
// service fails at once instead of waiting out its timeout.
TEST_CASE("messaging: a loop driven by fill_pollfds and dispatch on another thread is that thread's for WouldDeadlock") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("embedded") == Result::Ok);
  Result open_result = Result::Ok, request_result = Result::Ok;
  std::thread driver([&] {
    struct pollfd fds[LEMSG_MAX_WATCHES + 1];
    std::size_t n = 0;
    for (int i = 0; i < 3; ++i) {
      if (loop.fill_pollfds(fds, LEMSG_MAX_WATCHES + 1, n) != Result::Ok) return;
      if (::poll(fds, static_cast<nfds_t>(n), 0) < 0) return;
      Result r = loop.dispatch(fds, n);
      (void)r;
    }
    Loop cloop;
    SmallPool cpool;
    Session s(cloop, kProto, cpool);
    // Far longer than the test waits if the call did block.
    open_result = s.open_sync("embedded", 5000);
    request_result = s.try_open("embedded");
  });
  driver.join();
  CHECK(open_result == Result::WouldDeadlock);
  CHECK(request_result == Result::WouldDeadlock);
}

// A second advertisement of a served name from another thread fails with
// Duplicate and leaves the first service's entry in the process's table, so
// a synchronous call on the first service's thread is still refused at once.
TEST_CASE("messaging: a failed advertise of a served name on another thread keeps the WouldDeadlock check of the first") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("taken") == Result::Ok);
  CHECK(loop.run_once(0) != Result::SystemError);  // this thread runs the loop
  Result second = Result::Ok;
  std::thread other([&second] {
    Loop l2;
    SmallPool p2;
    Service s2(l2, kProto, p2);
    second = s2.advertise("taken");
  });
  other.join();
  CHECK(second == Result::Duplicate);
  Session s(loop, kProto, pool);
  CHECK(s.open_sync("taken", 5000) == Result::WouldDeadlock);
  CHECK(s.try_open("taken") == Result::WouldDeadlock);
}

}  // TEST_SUITE

// The process-wide service table (LEMSG_MAX_SERVICES), exhausted. Each service
// has its own loop, so the watch and timer tables are not what runs out.
TEST_SUITE("messaging") {
  const lemsg::Protocol kServicesProto{"lemsg.test.services.v1", 16};
  TEST_CASE("messaging: a process advertises at most LEMSG_MAX_SERVICES services; one more is ServiceTableFull") {
    testutil::RuntimeDir dir;
    struct One {
      lemsg::Loop loop;
      lemsg::MessagePool<16, 2> pool;
      lemsg::Service svc{loop, kServicesProto, pool};
    };
    constexpr int n = LEMSG_MAX_SERVICES;
    One* all[n + 1];
    for (One*& o : all) o = new One;  // tests may use the heap
    char name[32];
    for (int i = 0; i < n; ++i) {
      std::snprintf(name, sizeof name, "svc-%d", i);
      REQUIRE(all[i]->svc.status() == lemsg::Result::Ok);
      CHECK(all[i]->svc.advertise(name) == lemsg::Result::Ok);
    }
    REQUIRE(all[n]->svc.status() == lemsg::Result::Ok);
    CHECK(all[n]->svc.advertise("svc-extra") == lemsg::Result::ServiceTableFull);
    CHECK_FALSE(all[n]->svc.is_advertised());
    char path[256];
    dir.socket("svc-extra", path);
    struct stat st;
    CHECK(::stat(path, &st) != 0);  // a refused advertisement leaves no socket file
    CHECK(all[0]->svc.hide() == lemsg::Result::Ok);
    CHECK(all[n]->svc.advertise("svc-extra") == lemsg::Result::Ok);
    for (One* o : all) delete o;
  }
}
