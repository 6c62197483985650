// Sections 8 to 11 (messaging), the fault tests: real processes (fork without exec),
// real sockets, real kill -9. Each case carries the number of the fault it
// covers:
//   1  a client killed with a request pending and references held
//      (and the forum's case: an exclusive resource a killed client held)
//   2  a server killed with requests pending on several clients
//   4  an exhausted pool (fault 3 is not in this file)
//   5  a client that never reads
//   6  a synchronous request that times out, answered late
//   7  a synchronous request only the caller's own loop could answer
//   8  64 client processes, 1,000 requests each
//   9  unsolicited messages and responses keep their order
//  10  no heap on either side after initialisation
//
// Children report through their exit code (0 = every check held; a failed
// check prints its line to stderr). Every wait is bounded; a child that the
// parent no longer watches dies with it (PR_SET_PDEATHSIG). The allocation
// counters below replace the global operator new/delete for the whole test
// binary and wrap malloc/calloc/realloc (link with
// -Wl,--wrap=malloc -Wl,--wrap=calloc -Wl,--wrap=realloc); they count only
// while a case asks them to.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

// ---- allocation counting (fault 10) -----------------------------------------

namespace {
std::atomic<int> g_counting{0};
std::atomic<long> g_allocations{0};
inline void note_allocation() noexcept {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

extern "C" {
void* __real_malloc(std::size_t n);
void* __real_calloc(std::size_t n, std::size_t size);
void* __real_realloc(void* p, std::size_t n);
void* __wrap_malloc(std::size_t n) {
  note_allocation();
  return __real_malloc(n);
}
void* __wrap_calloc(std::size_t n, std::size_t size) {
  note_allocation();
  return __real_calloc(n, size);
}
void* __wrap_realloc(void* p, std::size_t n) {
  note_allocation();
  return __real_realloc(p, n);
}
}

// ThreadSanitizer's runtime (clang links it statically) defines operator
// new and delete itself; under TSan only malloc, calloc and realloc are
// counted. (TSan builds run the *thread* cases only.)
#if defined(__SANITIZE_THREAD__)
#define FAULTS_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define FAULTS_TSAN 1
#endif
#endif

#ifndef FAULTS_TSAN
namespace {
// operator new counts once and takes its memory from the real malloc, so a
// new is not counted a second time by __wrap_malloc.
void* counted_new(std::size_t n) noexcept {
  note_allocation();
  return __real_malloc(n ? n : 1);
}
void* counted_new_aligned(std::size_t n, std::align_val_t al) noexcept {
  note_allocation();
  std::size_t a = static_cast<std::size_t>(al);
  if (a < sizeof(void*)) a = sizeof(void*);
  void* p = nullptr;
  return ::posix_memalign(&p, a, n ? n : 1) == 0 ? p : nullptr;
}
void* must(void* p) noexcept {
  if (!p) std::abort();  // no exceptions in this build: an empty heap ends the run
  return p;
}
}  // namespace

void* operator new(std::size_t n) { return must(counted_new(n)); }
void* operator new[](std::size_t n) { return must(counted_new(n)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_new(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_new(n); }
void* operator new(std::size_t n, std::align_val_t al) { return must(counted_new_aligned(n, al)); }
void* operator new[](std::size_t n, std::align_val_t al) { return must(counted_new_aligned(n, al)); }
void* operator new(std::size_t n, std::align_val_t al, const std::nothrow_t&) noexcept {
  return counted_new_aligned(n, al);
}
void* operator new[](std::size_t n, std::align_val_t al, const std::nothrow_t&) noexcept {
  return counted_new_aligned(n, al);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
#endif  // FAULTS_TSAN


TEST_SUITE("messaging") {

using lemsg::Loop;
using lemsg::Message;
using lemsg::Result;
using lemsg::Service;
using lemsg::Session;
using lemsg::SessionRef;

namespace {

// Bounds for waits that only a failure (or a very slow emulator) reaches.
constexpr int kWaitMs = 30000;
// Longest a child lives when nobody kills it.
constexpr int kChildLifeMs = 120000;

constexpr lemsg::Protocol kProto{"lemsg.test.faults.v1", 64};

// Async sessions a case may open to a Service on the same loop (1 or 2): each
// Service and Session takes a timer; the Service a watch plus one per
// session, each Session a watch.
constexpr int kLocalSessions = std::min({2, LEMSG_MAX_TIMERS - 1, (LEMSG_MAX_WATCHES - 1) / 2});
using SmallPool = lemsg::MessagePool<64, 32>;

// Every payload here is an operation and a value (testutil::Body).
using testutil::Body;
using testutil::die_with_parent;
using testutil::echo_of;
using testutil::set_body;
enum : std::uint32_t {
  OpEcho = 1,  // respond with echo_of(value)
  OpHold,      // the server keeps the request unanswered
  OpTake,      // take a free resource: respond with its reference (0 = none free)
  OpNote,      // an unsolicited message from the server
};

Body body_of(const Message& m) {
  Body b{0, 0};
  if (m && m.size() == sizeof b) std::memcpy(&b, m.payload(), sizeof b);
  return b;
}


// Sleeps (without reading anything) until killed, at most `ms`.
void linger(int ms) {
  const long long end = testutil::now_ms() + ms;
  while (testutil::now_ms() < end) usleep(10000);
}

// One synchronous request; Ok with `out` set to the response's body.
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

// The completion of one async request.
struct Reply {
  int calls = 0;
  Result result = Result::Ok;
  Body body{0, 0};
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
      },
      timeout_ms);
}

// Reads exactly `n` bytes from `fd`, waiting at most `timeout_ms` in all.
bool read_exact(int fd, void* buf, std::size_t n, int timeout_ms) {
  const long long end = testutil::now_ms() + timeout_ms;
  std::size_t got = 0;
  while (got < n) {
    const long long left = end - testutil::now_ms();
    if (left <= 0) return false;
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) != 1) continue;
    const ssize_t r = read(fd, static_cast<char*>(buf) + got, n - got);
    if (r <= 0) return false;
    got += static_cast<std::size_t>(r);
  }
  return true;
}

// True (and the byte consumed) when `pipe` holds `c` right now.
bool pipe_says(testutil::Pipe& pipe, char c) { return pipe.get(0) == static_cast<unsigned char>(c); }

// Runs `loop` until child `pid` exits, at most `timeout_ms`. Its exit code as
// testutil::wait_exit gives it; -1 on timeout (the child is then killed).
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

// Children reaped while a loop runs.
struct Reaper {
  static constexpr int kMax = 64;
  pid_t pid[kMax];
  int code[kMax];
  int count = 0;
  int left = 0;
  long long next_ms = 0;
  void add(pid_t p) {
    pid[count] = p;
    code[count] = -1;
    ++count;
    ++left;
  }
  // Reaps what has exited (at most every 20 ms); true when all have.
  bool all_exited() {
    if (left == 0) return true;
    const long long now = testutil::now_ms();
    if (now < next_ms) return false;
    next_ms = now + 20;
    for (int i = 0; i < count; ++i) {
      if (pid[i] <= 0) continue;
      int st = 0;
      const pid_t r = waitpid(pid[i], &st, WNOHANG);
      if (r == 0) continue;
      code[i] = r < 0 ? -2 : WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      pid[i] = 0;
      --left;
    }
    return left == 0;
  }
  void kill_rest() {
    for (int i = 0; i < count; ++i)
      if (pid[i] > 0) {
        testutil::kill9(pid[i]);
        pid[i] = 0;
      }
    left = 0;
  }
};

// A Service with the behaviours the cases need, and counters of what it saw.
struct Server {
  struct Res {
    bool held = false;
  };
  struct Seen {
    SessionRef ref;
    pid_t pid;
  };

  Service svc;
  int opens = 0;
  int closes = 0;
  Result reason = Result::Ok;  // of the last close
  SessionRef closed;
  Seen seen[16];
  int nseen = 0;
  int received = 0;
  Message held[16];
  int nheld = 0;
  Result last_respond = Result::Ok;
  int respond_failures = 0;
  // Resources a client takes with OpTake; the entries are owned by the
  // session, and tracking frees them when it closes.
  Res res[8];
  int nres = 8;
  lemsg::RefMap<Res, 8> refs;
  int released = 0;
  // Unsolicited messages sent just before and just after each OpEcho response.
  int before = 0;
  int after = 0;
  std::uint32_t note_value = 0;
  // Writes 'n' to notify_fd when `received` reaches notify_at.
  int notify_fd = -1;
  int notify_at = 0;

  Server(Loop& loop, lemsg::MessagePoolBase& pool) : svc(loop, kProto, pool) {
    svc.set_open_handler([this](SessionRef s) {
      ++opens;
      lemsg::Credentials c;
      if (svc.credentials(s, c) == Result::Ok && nseen < 16) seen[nseen++] = Seen{s, c.pid};
    });
    svc.set_close_handler([this](SessionRef s, Result why) {
      ++closes;
      closed = s;
      reason = why;
    });
    svc.set_receive_handler([this](Message& m) { on_message(m); });
    Result r = svc.track(refs, [this](void* obj, std::uint32_t) {
      static_cast<Res*>(obj)->held = false;
      ++released;
    });
    (void)r;  // checked by status() and the cases' counts
  }

  SessionRef session_of(pid_t pid) const {
    for (int i = nseen - 1; i >= 0; --i)
      if (seen[i].pid == pid) return seen[i].ref;
    return SessionRef{};
  }

  void reply(Message& m, std::uint32_t value) {
    const Body b = body_of(m);
    set_body(m, b.op, value);
    last_respond = svc.respond(std::move(m));
    if (last_respond != Result::Ok) ++respond_failures;
  }

  void note(SessionRef s) {
    Message n;
    if (svc.create_message(n) != Result::Ok) return;
    set_body(n, OpNote, ++note_value);
    Result r = svc.send(s, std::move(n));
    (void)r;
  }

  void on_message(Message& m) {
    ++received;
    if (notify_fd >= 0 && received == notify_at) {
      ssize_t w = write(notify_fd, "n", 1);
      (void)w;
    }
    const Body b = body_of(m);
    switch (b.op) {
      case OpEcho: {
        const SessionRef s = m.session();
        for (int i = 0; i < before; ++i) note(s);
        reply(m, echo_of(b.value));
        for (int i = 0; i < after; ++i) note(s);
        break;
      }
      case OpHold:
        if (nheld < 16) held[nheld++] = std::move(m);
        break;
      case OpTake: {
        std::uint32_t ref = 0;
        for (int i = 0; i < nres; ++i) {
          if (res[i].held) continue;
          if (refs.add(&res[i], ref, m.session().value) == Result::Ok) res[i].held = true;
          break;
        }
        reply(m, ref);
        break;
      }
      default:
        break;  // released unanswered
    }
  }
};

// An async client and what its handlers saw.
struct Client {
  Session s;
  int opens = 0;
  Result open_result = Result::Ok;
  int closes = 0;
  Result reason = Result::Ok;
  int received = 0;
  std::uint32_t got[32];

  Client(Loop& loop, lemsg::MessagePoolBase& pool) : s(loop, kProto, pool) {
    s.set_close_handler([this](Result why) {
      ++closes;
      reason = why;
    });
    s.set_receive_handler([this](Message& m) {
      if (received < 32) got[received] = body_of(m).value;
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

// The body of a server child: serves `name` after `setup` until killed (at
// most kChildLifeMs); writes 'a' to `ready` once advertised.
template <typename Setup>
int serve(const char* name, testutil::Pipe& ready, Setup&& setup) {
  die_with_parent();
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  setup(srv);
  if (srv.svc.advertise(name) != Result::Ok) return 10;
  ready.put('a');
  testutil::run_until(loop, [] { return false; }, kChildLifeMs);
  return 0;
}

}  // namespace

// ---- fault 1 ----------------------------------------------------------------

// Fault 1: 200 cycles of open, take two references, send a request the
// server keeps, kill -9. The server has no clean-up code beyond the release
// callback of Service::track.
TEST_CASE("messaging: a client killed with a request pending and references held leaves the server as if it had closed") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.status() == Result::Ok);
  REQUIRE(srv.svc.advertise("killed-client") == Result::Ok);

  const int base_fds = testutil::count_open_fds();
  const std::size_t base_pool = pool.in_use();
  const std::size_t base_sessions = srv.svc.session_count();
  constexpr int kCycles = 200;
  int cycle = 0;
  for (; cycle < kCycles; ++cycle) {
    const int closes = srv.closes;
    const int released = srv.released;
    const pid_t pid = testutil::spawn([&] {
      die_with_parent();
      Loop cl;
      SmallPool cp;
      Session s(cl, kProto, cp);
      CHILD_CHECK(s.open_sync("killed-client", kWaitMs) == Result::Ok);
      Body b{0, 0};
      CHILD_CHECK(call(s, OpTake, 0, b) == Result::Ok && b.value != 0);
      CHILD_CHECK(call(s, OpTake, 0, b) == Result::Ok && b.value != 0);
      Reply never;
      CHILD_CHECK(ask(s, OpHold, 0, never) == Result::Ok);
      linger(kChildLifeMs);  // killed here, the request still pending
      return 0;
    });
    REQUIRE(pid > 0);
    const bool holding = testutil::run_until(loop, [&] { return srv.nheld == 1; }, kWaitMs);
    CHECK_MESSAGE(holding, "cycle " << cycle << ": the held request never arrived");
    CHECK(srv.refs.size() == 2);
    testutil::kill9(pid);
    if (!holding) break;

    const bool closed = testutil::run_until(loop, [&] { return srv.closes == closes + 1; }, kWaitMs);
    CHECK_MESSAGE(closed, "cycle " << cycle << ": no close handler after kill -9");
    if (!closed) break;
    CHECK(srv.reason == Result::Closed);
    CHECK(srv.released == released + 2);
    CHECK(srv.refs.size() == 0);
    CHECK(!srv.res[0].held);
    CHECK(!srv.res[1].held);
    // The late answer to the dead client's request is harmless.
    CHECK(srv.svc.respond(std::move(srv.held[0])) == Result::Closed);
    srv.nheld = 0;
    if (srv.reason != Result::Closed || srv.released != released + 2) break;
  }
  CHECK(cycle == kCycles);
  // A second close handler for any of them would show up now.
  testutil::run_until(loop, [] { return false; }, 100);
  CHECK(srv.closes == cycle);
  CHECK(srv.opens == cycle);
  CHECK(srv.released == 2 * cycle);
  CHECK(testutil::count_open_fds() == base_fds);
  CHECK(pool.in_use() == base_pool);
  CHECK(srv.svc.session_count() == base_sessions);
}

// Fault 1, the forum's case ("API detect unexpected client disconnection"):
// a client locks an exclusive resource, is killed while holding it, and the
// next client gets it. Only the release callback frees it.
TEST_CASE("messaging: an exclusive resource held by a client killed with kill -9 goes to the next client") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  srv.nres = 1;
  REQUIRE(srv.svc.advertise("exclusive") == Result::Ok);

  // 0: the taker must get the resource; 1: the resource must be busy.
  auto taker = [](int expect_busy) {
    return [expect_busy] {
      die_with_parent();
      Loop cl;
      SmallPool cp;
      Session s(cl, kProto, cp);
      CHILD_CHECK(s.open_sync("exclusive", kWaitMs) == Result::Ok);
      Body b{0, 0};
      CHILD_CHECK(call(s, OpTake, 0, b) == Result::Ok);
      if (expect_busy) {
        CHILD_CHECK(b.value == 0);
        return 0;
      }
      CHILD_CHECK(b.value != 0);
      return 0;
    };
  };

  const pid_t holder = testutil::spawn([] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.open_sync("exclusive", kWaitMs) == Result::Ok);
    Body b{0, 0};
    CHILD_CHECK(call(s, OpTake, 0, b) == Result::Ok && b.value != 0);
    linger(kChildLifeMs);
    return 0;
  });
  REQUIRE(holder > 0);
  REQUIRE(testutil::run_until(loop, [&] { return srv.res[0].held; }, kWaitMs));

  // While the holder lives, nobody else gets the resource.
  CHECK(run_until_exit(loop, testutil::spawn(taker(1)), kWaitMs) == 0);
  CHECK(srv.res[0].held);

  testutil::kill9(holder);
  CHECK(testutil::run_until(loop, [&] { return !srv.res[0].held; }, kWaitMs));
  CHECK(srv.released == 1);
  CHECK(srv.refs.size() == 0);

  CHECK(run_until_exit(loop, testutil::spawn(taker(0)), kWaitMs) == 0);
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 3; }, kWaitMs));
  // The last client closed normally, so its entry went back too.
  CHECK(srv.released == 2);
  CHECK(!srv.res[0].held);
}

// ---- fault 2 ----------------------------------------------------------------

// Fault 2: the server is killed while async clients (in this process) and a
// synchronous client (a child) wait for answers with 20 s timeouts. Every
// one completes with Closed; the clients reconnect to a new server.
TEST_CASE("messaging: a server killed with requests pending completes them all with Closed and the clients reconnect") {
  testutil::RuntimeDir dir;
  // Async clients here, one sync client in a child; the server has a watch
  // per session plus one.
  constexpr int kAsync = std::min({3, LEMSG_MAX_TIMERS, LEMSG_MAX_WATCHES - 2, LEMSG_MAX_SESSIONS - 1});
  constexpr std::uint32_t kLongMs = 20000;
  testutil::Pipe ready;
  testutil::Pipe got_all;

  const pid_t server = testutil::spawn([&] {
    return serve("killed-server", ready, [&](Server& srv) {
      srv.notify_fd = got_all.fd[1];
      srv.notify_at = kAsync + 1;
    });
  });
  REQUIRE(server > 0);
  REQUIRE(ready.get(kWaitMs) == 'a');

  Loop loop;
  SmallPool pool;
  Client c0(loop, pool), c1(loop, pool), c2(loop, pool);
  Client* clients[3] = {&c0, &c1, &c2};
  for (int i = 0; i < kAsync; ++i) {
    clients[i]->s.set_reconnect(true, 20, 200);
    REQUIRE(clients[i]->open("killed-server") == Result::Ok);
  }
  REQUIRE(testutil::run_until(
      loop,
      [&] {
        for (int i = 0; i < kAsync; ++i)
          if (clients[i]->opens != 1) return false;
        return true;
      },
      kWaitMs));
  for (int i = 0; i < kAsync; ++i) REQUIRE(clients[i]->open_result == Result::Ok);

  const pid_t sync_client = testutil::spawn([&] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Client c(cl, cp);
    c.s.set_reconnect(true, 20, 200);
    CHILD_CHECK(c.s.open_sync("killed-server", kWaitMs) == Result::Ok);
    Body b{0, 0};
    const Result r = call(c.s, OpHold, 0, b, static_cast<int>(kLongMs));
    CHILD_CHECK(r == Result::Closed);  // not Timeout
    CHILD_CHECK(testutil::run_until(cl, [&] { return c.closes == 1; }, kWaitMs));
    CHILD_CHECK(c.reason == Result::Closed);
    // Back when the server returns.
    CHILD_CHECK(testutil::run_until(cl, [&] { return c.s.is_open(); }, kWaitMs));
    CHILD_CHECK(call(c.s, OpEcho, 41, b) == Result::Ok);
    CHILD_CHECK(b.value == echo_of(41));
    CHILD_CHECK(c.closes == 1);
    return 0;
  });
  REQUIRE(sync_client > 0);

  Reply replies[3];
  for (int i = 0; i < kAsync; ++i)
    CHECK(ask(clients[i]->s, OpHold, static_cast<std::uint32_t>(i), replies[i], kLongMs) == Result::Ok);
  // Every request, the synchronous one included, waits in the server.
  REQUIRE(testutil::run_until(loop, [&] { return pipe_says(got_all, 'n'); }, kWaitMs));
  for (int i = 0; i < kAsync; ++i) CHECK(clients[i]->s.pending_count() == 1);

  testutil::kill9(server);
  CHECK(testutil::run_until(
      loop,
      [&] {
        for (int i = 0; i < kAsync; ++i)
          if (replies[i].calls == 0 || clients[i]->closes == 0) return false;
        return true;
      },
      kWaitMs));
  for (int i = 0; i < kAsync; ++i) {
    CAPTURE(i);
    CHECK(replies[i].calls == 1);
    CHECK(replies[i].result == Result::Closed);
    CHECK(clients[i]->closes == 1);
    CHECK(clients[i]->reason == Result::Closed);
    CHECK(clients[i]->s.pending_count() == 0);
  }

  // The server comes back (a new process; its old socket file is stale).
  const pid_t again = testutil::spawn([&] { return serve("killed-server", ready, [](Server&) {}); });
  REQUIRE(again > 0);
  CHECK(ready.get(kWaitMs) == 'a');
  CHECK(testutil::run_until(
      loop,
      [&] {
        for (int i = 0; i < kAsync; ++i)
          if (clients[i]->opens != 2) return false;
        return true;
      },
      kWaitMs));
  Reply after[3];
  for (int i = 0; i < kAsync; ++i) {
    CAPTURE(i);
    CHECK(clients[i]->open_result == Result::Ok);
    CHECK(ask(clients[i]->s, OpEcho, static_cast<std::uint32_t>(100 + i), after[i], kLongMs) == Result::Ok);
  }
  CHECK(testutil::run_until(
      loop,
      [&] {
        for (int i = 0; i < kAsync; ++i)
          if (after[i].calls == 0) return false;
        return true;
      },
      kWaitMs));
  for (int i = 0; i < kAsync; ++i) {
    CAPTURE(i);
    CHECK(after[i].calls == 1);
    CHECK(after[i].result == Result::Ok);
    CHECK(after[i].body.value == echo_of(static_cast<std::uint32_t>(100 + i)));
    CHECK(replies[i].calls == 1);  // the old completion did not run again
    CHECK(clients[i]->closes == 1);
  }
  // No client died: the synchronous one finished its checks and exited 0.
  CHECK(testutil::wait_exit(sync_client, kWaitMs) == 0);
  for (int i = 0; i < kAsync; ++i) clients[i]->s.close();
  testutil::kill9(again);
}

// ---- fault 4 ----------------------------------------------------------------

// Fault 4: an empty pool is an error value, never an abort; a server (or a
// client) whose pool is empty stops reading, leaves the frames in the socket,
// and carries on once blocks come back.
TEST_CASE("messaging: an exhausted pool returns PoolEmpty and a side whose pool is empty pauses reading until blocks return") {
  testutil::RuntimeDir dir;
  Loop loop;
  lemsg::MessagePool<64, 4> spool;
  lemsg::MessagePool<64, 8> cpool;
  Server srv(loop, spool);
  REQUIRE(srv.svc.advertise("pool-empty") == Result::Ok);
  Client c(loop, cpool);
  REQUIRE(c.open("pool-empty") == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return c.opens == 1 && srv.opens == 1; }, kWaitMs));

  // The server's pool, held empty by the test.
  Message hold[4];
  for (Message& h : hold) CHECK(srv.svc.create_message(h) == Result::Ok);
  Message none;
  CHECK(srv.svc.create_message(none) == Result::PoolEmpty);
  CHECK(!none);
  CHECK(spool.available() == 0);

  constexpr int kRequests = LEMSG_MAX_PENDING < 3 ? LEMSG_MAX_PENDING : 3;
  Reply rep[3];
  for (int i = 0; i < kRequests; ++i) CHECK(ask(c.s, OpEcho, static_cast<std::uint32_t>(i), rep[i]) == Result::Ok);
  // The requests wait in the socket: nothing is read, nothing is lost, the
  // session stays open.
  testutil::run_until(loop, [] { return false; }, 300);
  CHECK(srv.received == 0);
  CHECK(rep[0].calls == 0);
  CHECK(c.s.is_open());
  CHECK(srv.svc.session_count() == 1);
  CHECK(c.s.pending_count() == static_cast<std::size_t>(kRequests));

  for (Message& h : hold) h.release();
  CHECK(testutil::run_until(loop, [&] { return rep[kRequests - 1].calls == 1; }, kWaitMs));
  for (int i = 0; i < kRequests; ++i) {
    CAPTURE(i);
    CHECK(rep[i].calls == 1);
    CHECK(rep[i].result == Result::Ok);
    CHECK(rep[i].body.value == echo_of(static_cast<std::uint32_t>(i)));
  }
  CHECK(srv.received == kRequests);

  // The same on the client side: its pool held empty while responses arrive.
  Reply late[3];
  for (int i = 0; i < kRequests; ++i)
    CHECK(ask(c.s, OpEcho, static_cast<std::uint32_t>(10 + i), late[i]) == Result::Ok);
  Message chold[8];
  for (Message& h : chold) CHECK(c.s.create_message(h) == Result::Ok);
  CHECK(c.s.create_message(none) == Result::PoolEmpty);
  CHECK(testutil::run_until(loop, [&] { return srv.received == 2 * kRequests; }, kWaitMs));
  testutil::run_until(loop, [] { return false; }, 300);
  CHECK(late[0].calls == 0);
  CHECK(c.s.is_open());
  for (Message& h : chold) h.release();
  CHECK(testutil::run_until(loop, [&] { return late[kRequests - 1].calls == 1; }, kWaitMs));
  for (int i = 0; i < kRequests; ++i) {
    CAPTURE(i);
    CHECK(late[i].calls == 1);
    CHECK(late[i].result == Result::Ok);
    CHECK(late[i].body.value == echo_of(static_cast<std::uint32_t>(10 + i)));
  }
  CHECK(srv.closes == 0);
  CHECK(c.closes == 0);
  c.s.close();
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  CHECK(spool.in_use() == 0);
  CHECK(cpool.in_use() == 0);
}

// ---- fault 5 ----------------------------------------------------------------

// Fault 5: a client that never reads. The messaging sections promise: at most
// LEMSG_MAX_OUTGOING frames wait per session, then send() returns Overflow
// and the message stays the caller's; a response that cannot be queued
// closes that session with Overflow. Other sessions are not affected.
TEST_CASE("messaging: a client that never reads fills its queue, send returns Overflow and only its session closes") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("never-reads") == Result::Ok);

  const pid_t deaf = testutil::spawn([] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.open_sync("never-reads", kWaitMs) == Result::Ok);
    Reply never;
    CHILD_CHECK(ask(s, OpHold, 0, never) == Result::Ok);
    linger(kChildLifeMs);  // never reads, never runs its loop
    return 0;
  });
  REQUIRE(deaf > 0);
  REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == 1; }, kWaitMs));
  const SessionRef deaf_ref = srv.session_of(deaf);
  REQUIRE(deaf_ref);

  // Another client, in its own process, asks whenever the test says so.
  testutil::Pipe cue;
  testutil::Pipe done;
  const pid_t other = testutil::spawn([&] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.open_sync("never-reads", kWaitMs) == Result::Ok);
    for (int round = 0; round < 2; ++round) {
      CHILD_CHECK(cue.get(kWaitMs) == 'q');
      Body b{0, 0};
      CHILD_CHECK(call(s, OpEcho, static_cast<std::uint32_t>(5 + round), b) == Result::Ok);
      CHILD_CHECK(b.value == echo_of(static_cast<std::uint32_t>(5 + round)));
      done.put('d');
    }
    CHILD_CHECK(s.is_open());
    return 0;
  });
  REQUIRE(other > 0);
  REQUIRE(testutil::run_until(loop, [&] { return srv.opens == 2; }, kWaitMs));

  const std::size_t base = pool.in_use();  // the held request
  Message m;
  Result r = Result::Ok;
  int sent = 0;
  for (; sent < 1000000; ++sent) {
    REQUIRE(srv.svc.create_message(m) == Result::Ok);
    REQUIRE(set_body(m, OpNote, static_cast<std::uint32_t>(sent)));
    r = srv.svc.send(deaf_ref, std::move(m));
    if (r != Result::Ok) break;
  }
  CHECK(r == Result::Overflow);
  CHECK(sent > LEMSG_MAX_OUTGOING);
  // The refused message is still the caller's, intact.
  CHECK(static_cast<bool>(m));
  CHECK(body_of(m).value == static_cast<std::uint32_t>(sent));
  // Exactly LEMSG_MAX_OUTGOING frames wait, each in a pool block.
  CHECK(pool.in_use() == base + LEMSG_MAX_OUTGOING + 1);
  // A full queue alone closes nothing.
  CHECK(srv.closes == 0);
  CHECK(srv.svc.session_count() == 2);
  CHECK(srv.svc.send(deaf_ref, std::move(m)) == Result::Overflow);

  // Meanwhile the other client is served.
  cue.put('q');
  CHECK(testutil::run_until(loop, [&] { return pipe_says(done, 'd'); }, kWaitMs));
  CHECK(srv.closes == 0);

  // A response cannot be dropped silently: it closes the deaf session.
  CHECK(srv.svc.respond(std::move(srv.held[0])) == Result::Overflow);
  srv.nheld = 0;
  CHECK(srv.closes == 1);
  CHECK(srv.closed == deaf_ref);
  CHECK(srv.reason == Result::Overflow);
  CHECK(srv.svc.session_count() == 1);
  m.release();
  CHECK(pool.in_use() == 0);  // the queued frames went with the session

  cue.put('q');
  CHECK(run_until_exit(loop, other, kWaitMs) == 0);
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 2; }, kWaitMs));
  CHECK(srv.reason == Result::Closed);  // the other one, leaving normally

  testutil::kill9(deaf);
  testutil::run_until(loop, [] { return false; }, 100);
  CHECK(srv.closes == 2);
}

// ---- fault 6 ----------------------------------------------------------------

// Fault 6: request_sync times out; the server answers afterwards; the late
// answer is discarded and the next request gets its own answer.
TEST_CASE("messaging: a synchronous request times out, and the late response is discarded safely") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("late") == Result::Ok);
  testutil::Pipe timed_out;
  testutil::Pipe answered;

  const pid_t client = testutil::spawn([&] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Client c(cl, cp);
    CHILD_CHECK(c.s.open_sync("late", kWaitMs) == Result::Ok);
    Body b{0, 0};
    CHILD_CHECK(call(c.s, OpHold, 1, b, 300) == Result::Timeout);
    CHILD_CHECK(c.s.pending_count() == 0);
    timed_out.put('t');
    CHILD_CHECK(answered.get(kWaitMs) == 'g');  // the late response is on its way
    CHILD_CHECK(call(c.s, OpEcho, 7, b) == Result::Ok);
    CHILD_CHECK(b.value == echo_of(7));
    CHILD_CHECK(c.s.pending_count() == 0);
    // Whatever the loop delivers now, the late response is not among it.
    testutil::run_until(cl, [] { return false; }, 100);
    CHILD_CHECK(c.received == 0);
    CHILD_CHECK(c.closes == 0);
    CHILD_CHECK(call(c.s, OpEcho, 8, b) == Result::Ok);
    CHILD_CHECK(b.value == echo_of(8));
    CHILD_CHECK(c.s.pending_count() == 0);
    return 0;
  });
  REQUIRE(client > 0);
  REQUIRE(testutil::run_until(loop, [&] { return pipe_says(timed_out, 't'); }, kWaitMs));
  REQUIRE(srv.nheld == 1);
  srv.reply(srv.held[0], 1001);
  srv.nheld = 0;
  CHECK(srv.last_respond == Result::Ok);
  answered.put('g');
  CHECK(run_until_exit(loop, client, kWaitMs) == 0);

  // The same with an async request and its own timeout, in one process.
  Client c(loop, pool);
  REQUIRE(c.open("late") == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return c.opens == 1; }, kWaitMs));
  Reply rep;
  CHECK(ask(c.s, OpHold, 2, rep, 100) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
  CHECK(rep.result == Result::Timeout);
  CHECK(c.s.pending_count() == 0);
  REQUIRE(srv.nheld == 1);
  srv.reply(srv.held[0], 2002);
  srv.nheld = 0;
  CHECK(srv.last_respond == Result::Ok);
  Reply next;
  CHECK(ask(c.s, OpEcho, 9, next) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return next.calls == 1; }, kWaitMs));
  CHECK(next.result == Result::Ok);
  CHECK(next.body.value == echo_of(9));
  CHECK(rep.calls == 1);
  CHECK(c.received == 0);
  CHECK(c.closes == 0);
  CHECK(c.s.pending_count() == 0);
  c.s.close();
}

// ---- fault 7 ----------------------------------------------------------------

// Fault 7: the service and the session share one loop in one thread. A
// synchronous call would wait for a loop that cannot run: WouldDeadlock.
TEST_CASE("messaging: a synchronous call only the caller's own loop could answer fails at once with WouldDeadlock") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("same-thread") == Result::Ok);
  Client c(loop, pool);
  REQUIRE(c.open("same-thread") == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return c.opens == 1; }, kWaitMs));

  Message m;
  REQUIRE(c.s.create_message(m) == Result::Ok);
  REQUIRE(set_body(m, OpEcho, 3));
  Message resp;
  // A timeout far longer than the test would wait if the call did block.
  CHECK(c.s.request_sync(std::move(m), resp, 5000) == Result::WouldDeadlock);
  CHECK(static_cast<bool>(m));  // still the caller's
  CHECK(!resp);
  CHECK(c.s.pending_count() == 0);
  CHECK(srv.received == 0);

  Session other(loop, kProto, pool);
  CHECK(other.open_sync("same-thread", 5000) == Result::WouldDeadlock);
  CHECK(other.try_open("same-thread") == Result::WouldDeadlock);
  CHECK(!other.is_open());

  // The async way still works on the same loop.
  Reply rep;
  CHECK(c.s.request(
            std::move(m),
            [&rep](Result r, Message& a) {
              ++rep.calls;
              rep.result = r;
              rep.body = body_of(a);
            }) == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
  CHECK(rep.result == Result::Ok);
  CHECK(rep.body.value == echo_of(3));
  c.s.close();
}

// ---- fault 8 ----------------------------------------------------------------

// Fault 8: 64 client processes (fewer in the tiny build: one per session
// slot and watch), 1,000 synchronous requests each, all answered right.
TEST_CASE("messaging: 64 client processes with 1,000 requests each are all answered correctly") {
  testutil::RuntimeDir dir;
  constexpr int kClients = std::min({64, LEMSG_MAX_SESSIONS, LEMSG_MAX_WATCHES - 1});
  constexpr int kRequests = 1000;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.status() == Result::Ok);

  // The clients start first and wait for the service to appear.
  Reaper kids;
  for (int k = 0; k < kClients; ++k) {
    const pid_t pid = testutil::spawn([k] {
      die_with_parent();
      Loop cl;
      SmallPool cp;
      Session s(cl, kProto, cp);
      CHILD_CHECK(s.open_sync("many", 2 * kWaitMs) == Result::Ok);
      for (int i = 0; i < kRequests; ++i) {
        const std::uint32_t v = static_cast<std::uint32_t>(k) << 16 | static_cast<std::uint32_t>(i);
        Message m;
        CHILD_CHECK(s.create_message(m) == Result::Ok);
        CHILD_CHECK(set_body(m, OpEcho, v));
        Message resp;
        CHILD_CHECK(s.request_sync(std::move(m), resp, kWaitMs) == Result::Ok);
        CHILD_CHECK(body_of(resp).value == echo_of(v));
        CHILD_CHECK(body_of(resp).op == OpEcho);
      }
      CHILD_CHECK(s.pending_count() == 0);
      return 0;
    });
    REQUIRE(pid > 0);
    kids.add(pid);
  }
  REQUIRE(srv.svc.advertise("many") == Result::Ok);
  const bool all = testutil::run_until(loop, [&] { return kids.all_exited(); }, 20 * kWaitMs);
  CHECK(all);
  if (!all) kids.kill_rest();
  int ok = 0;
  for (int k = 0; k < kids.count; ++k) ok += kids.code[k] == 0;
  CHECK(ok == kClients);
  CHECK(srv.opens == kClients);
  CHECK(srv.received == kClients * kRequests);
  CHECK(srv.respond_failures == 0);
  CHECK(testutil::run_until(loop, [&] { return srv.svc.session_count() == 0; }, kWaitMs));
  CHECK(srv.closes == kClients);
  CHECK(srv.reason == Result::Closed);
  CHECK(pool.in_use() == 0);
}

// ---- fault 9 ----------------------------------------------------------------

// Fault 9: messages the server sends just before a response reach the
// receive handler after request_sync returns, in order, and before what
// follows the response.
TEST_CASE("messaging: unsolicited messages sent before a response arrive after request_sync returns, in order") {
  testutil::RuntimeDir dir;
  constexpr int kBefore = LEMSG_MAX_DEFERRED < 3 ? LEMSG_MAX_DEFERRED : 3;
  constexpr int kAfter = 2;
  testutil::Pipe ready;
  const pid_t server = testutil::spawn([&] {
    return serve("ordered", ready, [](Server& srv) {
      srv.before = kBefore;
      srv.after = kAfter;
    });
  });
  REQUIRE(server > 0);
  REQUIRE(ready.get(kWaitMs) == 'a');

  Loop loop;
  SmallPool pool;
  Client c(loop, pool);
  REQUIRE(c.s.open_sync("ordered", kWaitMs) == Result::Ok);
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    const int seen = c.received;
    Body b{0, 0};
    CHECK(call(c.s, OpEcho, static_cast<std::uint32_t>(round), b) == Result::Ok);
    CHECK(b.value == echo_of(static_cast<std::uint32_t>(round)));
    CHECK(c.received == seen);  // nothing was delivered inside request_sync
    CHECK(testutil::run_until(loop, [&] { return c.received == seen + kBefore + kAfter; }, kWaitMs));
  }
  const int total = 3 * (kBefore + kAfter);
  CHECK(c.received == total);
  for (int i = 0; i < total && i < 32; ++i) {
    CAPTURE(i);
    CHECK(c.got[i] == static_cast<std::uint32_t>(i + 1));
  }
  CHECK(c.closes == 0);
  c.s.close();
  testutil::kill9(server);
}

// Fault 9, the limit: request_sync keeps at most LEMSG_MAX_DEFERRED frames
// for later. One more closes the session with Overflow (never a silent
// drop); what was kept is still delivered, in order, before the close.
TEST_CASE("messaging: more than LEMSG_MAX_DEFERRED messages during request_sync close the session with Overflow") {
  testutil::RuntimeDir dir;
  testutil::Pipe ready;
  const pid_t server = testutil::spawn([&] {
    return serve("too-chatty", ready, [](Server& srv) { srv.before = LEMSG_MAX_DEFERRED + 1; });
  });
  REQUIRE(server > 0);
  REQUIRE(ready.get(kWaitMs) == 'a');

  testutil::LogCapture log;
  Loop loop;
  SmallPool pool;
  Client c(loop, pool);
  REQUIRE(c.s.open_sync("too-chatty", kWaitMs) == Result::Ok);
  Body b{0, 0};
  CHECK(call(c.s, OpEcho, 1, b) == Result::Overflow);
  CHECK(c.received == 0);
  CHECK(c.closes == 0);  // the close handler runs from the loop, not inside the call
  CHECK(testutil::run_until(loop, [&] { return c.closes == 1; }, kWaitMs));
  CHECK(c.reason == Result::Overflow);
  CHECK(log.warnings() == 1);
  CHECK(std::strstr(log.last, "LEMSG_MAX_DEFERRED") != nullptr);
  CHECK(c.received == LEMSG_MAX_DEFERRED);
  for (int i = 0; i < c.received && i < 32; ++i) {
    CAPTURE(i);
    CHECK(c.got[i] == static_cast<std::uint32_t>(i + 1));
  }
  CHECK(!c.s.is_open());
  CHECK(c.s.pending_count() == 0);
  testutil::run_until(loop, [] { return false; }, 50);
  CHECK(c.closes == 1);
  CHECK(pool.in_use() == 0);
  testutil::kill9(server);
}

// Fault 9, async: several requests in flight at once, answered out of order;
// each completion gets its own response.
TEST_CASE("messaging: concurrent async requests answered out of order each get their own response") {
  testutil::RuntimeDir dir;
  constexpr int kPerSession = LEMSG_MAX_PENDING < 6 ? LEMSG_MAX_PENDING : 6;
  Loop loop;
  lemsg::MessagePool<64, 2 * kPerSession + 8> spool;
  SmallPool cpool;
  Server srv(loop, spool);
  REQUIRE(srv.svc.advertise("crossed") == Result::Ok);
  Client a(loop, cpool), b(loop, cpool);
  Client* clients[2] = {&a, &b};
  for (int k = 0; k < kLocalSessions; ++k) {
    REQUIRE(clients[k]->open("crossed") == Result::Ok);
    REQUIRE(testutil::run_until(loop, [&] { return clients[k]->opens == 1; }, kWaitMs));
    REQUIRE(clients[k]->open_result == Result::Ok);
  }

  // Session k tags its requests k * 100 + i.
  Reply rep[2][6];
  for (int i = 0; i < kPerSession; ++i)
    for (int k = 0; k < kLocalSessions; ++k)
      CHECK(ask(clients[k]->s, OpHold, static_cast<std::uint32_t>(100 * (k + 1) + i), rep[k][i]) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == kLocalSessions * kPerSession; }, kWaitMs));
  // Answer from the last to the first, odd positions first.
  for (int pass = 0; pass < 2; ++pass)
    for (int i = srv.nheld - 1; i >= 0; --i) {
      if (i % 2 != (pass == 0 ? 1 : 0)) continue;
      srv.reply(srv.held[i], echo_of(body_of(srv.held[i]).value));
      CHECK(srv.last_respond == Result::Ok);
    }
  srv.nheld = 0;
  CHECK(testutil::run_until(
      loop, [&] { return a.s.pending_count() == 0 && b.s.pending_count() == 0; }, kWaitMs));
  for (int k = 0; k < kLocalSessions; ++k)
    for (int i = 0; i < kPerSession; ++i) {
      CAPTURE(k);
      CAPTURE(i);
      CHECK(rep[k][i].calls == 1);
      CHECK(rep[k][i].result == Result::Ok);
      CHECK(rep[k][i].body.value == echo_of(static_cast<std::uint32_t>(100 * (k + 1) + i)));
    }
  a.s.close();
  b.s.close();
}

// ---- fault 10 ---------------------------------------------------------------

// Fault 10: after initialisation (pools, service, session, open), 10,000
// request/response cycles allocate nothing: counted in the client (this
// process) and in the server (a child that reports its count).
TEST_CASE("messaging: 10,000 request/response cycles allocate nothing on either side after initialisation") {
  testutil::RuntimeDir dir;
  constexpr int kCycles = 10000;
  testutil::Pipe ready;
  testutil::Pipe report;
  const pid_t server = testutil::spawn([&] {
    die_with_parent();
    Loop loop;
    SmallPool pool;
    Server srv(loop, pool);
    if (srv.svc.advertise("no-heap") != Result::Ok) return 10;
    ready.put('a');
    if (!testutil::run_until(loop, [&] { return srv.opens == 1; }, kWaitMs)) return 11;
    g_allocations.store(0);
    g_counting.store(1);
    const bool closed = testutil::run_until(loop, [&] { return srv.closes == 1; }, kChildLifeMs);
    g_counting.store(0);
    const long n = g_allocations.load();
    const long served = srv.received;
    if (write(report.fd[1], &n, sizeof n) != static_cast<ssize_t>(sizeof n)) return 12;
    if (write(report.fd[1], &served, sizeof served) != static_cast<ssize_t>(sizeof served)) return 13;
    return closed ? 0 : 14;
  });
  REQUIRE(server > 0);
  REQUIRE(ready.get(kWaitMs) == 'a');

  Loop loop;
  SmallPool pool;
  Session s(loop, kProto, pool);
  REQUIRE(s.open_sync("no-heap", kWaitMs) == Result::Ok);

  // No doctest assertion while counting: they may allocate on failure.
  int failures = 0;
  Result first_error = Result::Ok;
  g_allocations.store(0);
  g_counting.store(1);
  for (int i = 0; i < kCycles; ++i) {
    Message m;
    Result r = s.create_message(m);
    if (r == Result::Ok) r = set_body(m, OpEcho, static_cast<std::uint32_t>(i)) ? Result::Ok : Result::BadParameter;
    Message resp;
    if (r == Result::Ok) r = s.request_sync(std::move(m), resp, kWaitMs);
    if (r == Result::Ok && body_of(resp).value != echo_of(static_cast<std::uint32_t>(i))) r = Result::BadFrame;
    if (r != Result::Ok) {
      if (failures++ == 0) first_error = r;
    }
  }
  g_counting.store(0);
  const long client_allocations = g_allocations.load();
  CHECK(failures == 0);
  CHECK(first_error == Result::Ok);
  CHECK(client_allocations == 0);

  s.close();
  long server_allocations = -1;
  long served = -1;
  CHECK(read_exact(report.fd[0], &server_allocations, sizeof server_allocations, kWaitMs));
  CHECK(read_exact(report.fd[0], &served, sizeof served, kWaitMs));
  CHECK(server_allocations == 0);
  CHECK(served == kCycles);
  CHECK(testutil::wait_exit(server, kWaitMs) == 0);
}

// The typed layer (section 12) after initialisation: 2,000 typed calls
// (each making and resolving a reference), one-way items and events,
// counted on both sides.
namespace nohandtyped {
struct Obj;
struct Req {
  lemsg::String<16> name;
  lemsg::Array<std::uint32_t, 8> values;
  lemsg::Optional<lemsg::Ref<Obj>> previous;
};
struct Resp {
  lemsg::Ref<Obj> ref;
  std::uint32_t sum;
};
struct Tick {
  std::uint32_t n;
};
LEMSG_METHOD(Make, Req, Resp);
LEMSG_ONEWAY(Ping, Tick);
LEMSG_EVENT(Ticked, Tick);
struct Api : lemsg::Interface<Make, Ping, Ticked> {
  static constexpr const char* name = "lemsg.test.noheap";
};
using Pool = lemsg::TypedPool<Api, 16>;
}  // namespace nohandtyped

struct nohandtyped::Obj {
  std::uint32_t sum = 0;
};

TEST_CASE("typed: 2,000 typed calls with references, one-way items and events allocate nothing on either side after initialisation") {
  using namespace nohandtyped;
  testutil::RuntimeDir dir;
  constexpr int kCycles = 2000;
  testutil::Pipe ready;
  testutil::Pipe report;
  const pid_t server = testutil::spawn([&] {
    die_with_parent();
    Loop loop;
    Pool pool;
    lemsg::TypedService<Api> svc(loop, pool);
    lemsg::RefMap<Obj, 4> objs;
    Obj store[4];
    int opens = 0, closes = 0, pings = 0;
    svc.service().set_open_handler([&](SessionRef) { ++opens; });
    svc.service().set_close_handler([&](SessionRef, Result) { ++closes; });
    if (svc.bind_refs<Obj>(objs, nullptr) != Result::Ok) return 9;
    svc.set_handler<Make>([&](lemsg::Responder<Make>& r, Req& q) {
      if (q.previous) {  // resolved before this ran: it is this session's
        svc.object(*q.previous)->sum = 0;
        (void)svc.drop_ref(*q.previous);
      }
      Obj* o = nullptr;
      for (Obj& x : store)
        if (!o && x.sum == 0) o = &x;
      if (!o) return;  // Unanswered: the client counts it as a failure
      std::uint32_t sum = 1;
      for (std::uint32_t v : q.values) sum += v;
      Resp out{};
      out.sum = sum;
      if (svc.make_ref(r.session(), o, out.ref) != Result::Ok) return;
      o->sum = sum;
      (void)r.reply(out);
    });
    svc.set_handler<Ping>([&](const lemsg::Caller&, Tick& t) {
      ++pings;
      (void)svc.emit<Ticked>(Tick{t.n});
    });
    if (svc.advertise("no-heap-typed") != Result::Ok) return 10;
    ready.put('a');
    if (!testutil::run_until(loop, [&] { return opens == 1; }, kWaitMs)) return 11;
    g_allocations.store(0);
    g_counting.store(1);
    const bool closed = testutil::run_until(loop, [&] { return closes == 1; }, kChildLifeMs);
    g_counting.store(0);
    const long n = g_allocations.load();
    const long served = pings;
    if (write(report.fd[1], &n, sizeof n) != static_cast<ssize_t>(sizeof n)) return 12;
    if (write(report.fd[1], &served, sizeof served) != static_cast<ssize_t>(sizeof served)) return 13;
    return closed ? 0 : 14;
  });
  REQUIRE(server > 0);
  REQUIRE(ready.get(kWaitMs) == 'a');

  Loop loop;
  Pool pool;
  lemsg::TypedClient<Api> c(loop, pool);
  long ticks = 0;
  REQUIRE(c.subscribe<Ticked>([&](Tick&) { ++ticks; }) == Result::Ok);
  REQUIRE(c.open_sync("no-heap-typed", kWaitMs) == Result::Ok);

  int failures = 0;
  Result first_error = Result::Ok;
  Req req{};
  REQUIRE(req.name.assign("counter") == Result::Ok);
  g_allocations.store(0);
  g_counting.store(1);
  for (int i = 0; i < kCycles; ++i) {
    (void)req.values.resize(static_cast<std::size_t>(i % 9));
    for (std::uint32_t& v : req.values) v = static_cast<std::uint32_t>(i);
    Resp resp;
    Result r = c.call<Make>(req, resp, kWaitMs);
    if (r == Result::Ok && resp.sum != 1 + static_cast<std::uint32_t>(i) * static_cast<std::uint32_t>(i % 9)) r = Result::BadFrame;
    if (r == Result::Ok) req.previous = resp.ref;
    if (r == Result::Ok) r = c.send<Ping>(Tick{static_cast<std::uint32_t>(i)});
    if (r != Result::Ok && failures++ == 0) first_error = r;
    // Events that came while call() waited are delivered from the loop.
    const Result ran = loop.run_once(0);
    if (ran != Result::Ok && ran != Result::Timeout && failures++ == 0) first_error = ran;
  }
  const bool all_ticks = testutil::run_until(loop, [&] { return ticks == kCycles; }, kWaitMs);
  g_counting.store(0);
  const long client_allocations = g_allocations.load();
  CHECK(failures == 0);
  CHECK(first_error == Result::Ok);
  CHECK(all_ticks);
  CHECK(client_allocations == 0);

  c.close();
  long server_allocations = -1;
  long served = -1;
  CHECK(read_exact(report.fd[0], &server_allocations, sizeof server_allocations, kWaitMs));
  CHECK(read_exact(report.fd[0], &served, sizeof served, kWaitMs));
  CHECK(server_allocations == 0);
  CHECK(served == kCycles);
  CHECK(testutil::wait_exit(server, kWaitMs) == 0);
}

}  // TEST_SUITE
