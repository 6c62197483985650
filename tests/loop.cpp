// Section 6 (loop): Loop, its fd watches, timers, post queue, stop, embedding.
//
// Every wait is bounded: tests drive the loop with run_once(timeout) in a
// loop with a round limit, and every run() has a safety timer that stops it
// (the test then checks the safety timer was not what stopped it). Cases
// that use other threads have "thread" in their names for the TSan build.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

TEST_SUITE("loop") {

using lemsg::Loop;
using lemsg::Result;
using lemsg::TimerId;
using lemsg::WatchId;

namespace {

// Enough rounds to outlast a slow emulator, bounded all the same.
constexpr int kRounds = 400;
constexpr int kRoundMs = 25;
constexpr std::uint32_t kSafetyMs = 10000;

struct FdPair {
  int a = -1;  // pipe: read end; socketpair: one end
  int b = -1;  // pipe: write end; socketpair: the other end
  static FdPair pipe() {
    FdPair p;
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0) {
      p.a = fds[0];
      p.b = fds[1];
    }
    return p;
  }
  static FdPair sockets() {
    FdPair p;
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) == 0) {
      p.a = fds[0];
      p.b = fds[1];
    }
    return p;
  }
  FdPair() = default;
  FdPair(FdPair&& o) noexcept : a(o.a), b(o.b) { o.a = o.b = -1; }
  FdPair& operator=(FdPair&&) = delete;
  ~FdPair() {
    close_a();
    close_b();
  }
  bool ok() const { return a >= 0 && b >= 0; }
  void close_a() {
    if (a >= 0) ::close(a);
    a = -1;
  }
  void close_b() {
    if (b >= 0) ::close(b);
    b = -1;
  }
};

bool put_byte(int fd) { return ::write(fd, "x", 1) == 1; }

int drain(int fd) {
  char buf[64];
  int total = 0;
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    total += static_cast<int>(n);
  }
  return total;
}

// Runs the loop until done() holds or the rounds run out; false on a poll error.
template <typename Done>
bool run_until(Loop& loop, Done done, int rounds = kRounds, int round_ms = kRoundMs) {
  for (int i = 0; i < rounds && !done(); ++i)
    if (loop.run_once(round_ms) == Result::SystemError) return false;
  return done();
}

// What a watch handler saw.
struct Seen {
  int calls = 0;
  int fd = -1;
  short revents = 0;
};

// A sequence of small integers recorded by handlers.
struct Order {
  int v[16] = {};
  int n = 0;
  void add(int x) {
    if (n < 16) v[n] = x;
    ++n;
  }
};

struct LogCapture {
  int warnings = 0;
  char last[256] = {};
};
void capture_log(lemsg::LogLevel level, const char* line, void* ctx) {
  LogCapture* c = static_cast<LogCapture*>(ctx);
  if (level == lemsg::LogLevel::Warning) ++c->warnings;
  std::snprintf(c->last, sizeof c->last, "%s", line);
}

}  // namespace

static_assert(!std::is_convertible<WatchId, TimerId>::value, "watch and timer ids do not mix");
static_assert(!std::is_convertible<WatchId, std::uint32_t>::value, "ids are not plain integers");

TEST_CASE("loop: a new loop is ready and run_once(0) with nothing to do returns Timeout") {
  Loop loop;
  CHECK(loop.status() == Result::Ok);
  CHECK(loop.watch_count() == 0);
  CHECK(loop.timer_count() == 0);
  CHECK(loop.run_once(0) == Result::Timeout);
  CHECK(loop.next_timeout_ms() == -1);
  CHECK_FALSE(static_cast<bool>(WatchId{}));
  CHECK_FALSE(static_cast<bool>(TimerId{}));
}

// ---------------------------------------------------------------------------
// fd watches
// ---------------------------------------------------------------------------

TEST_CASE("loop: a Readable watch's handler runs when data is written") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  Seen seen;
  WatchId id;
  REQUIRE(loop.add_watch(p.a, lemsg::Readable, [&seen](int fd, short rev) {
    ++seen.calls;
    seen.fd = fd;
    seen.revents = rev;
  }, id) == Result::Ok);
  CHECK(static_cast<bool>(id));
  CHECK(loop.watch_count() == 1);

  CHECK(loop.run_once(0) == Result::Timeout);  // nothing written yet
  CHECK(seen.calls == 0);

  REQUIRE(put_byte(p.b));
  CHECK(run_until(loop, [&] { return seen.calls > 0; }));
  CHECK(seen.calls == 1);
  CHECK(seen.fd == p.a);
  CHECK((seen.revents & POLLIN) != 0);

  // Level-triggered: unread data fires again; once read, it stops.
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(seen.calls == 2);
  CHECK(drain(p.a) == 1);
  CHECK(loop.run_once(0) == Result::Timeout);
  CHECK(seen.calls == 2);

  CHECK(loop.remove_watch(id) == Result::Ok);
  CHECK(loop.watch_count() == 0);
  REQUIRE(put_byte(p.b));
  CHECK(loop.run_once(0) == Result::Timeout);  // removed: never called again
  CHECK(seen.calls == 2);
}

TEST_CASE("loop: set_events changes which events reach the handler") {
  Loop loop;
  FdPair s = FdPair::sockets();
  REQUIRE(s.ok());
  Seen seen;
  WatchId id;
  REQUIRE(loop.add_watch(s.a, 0, [&seen](int fd, short rev) {
    ++seen.calls;
    seen.fd = fd;
    seen.revents = rev;
  }, id) == Result::Ok);

  // The socket is writable, but interest 0 asks for errors only.
  CHECK(loop.run_once(0) == Result::Timeout);
  CHECK(seen.calls == 0);

  CHECK(loop.set_events(id, lemsg::Writable) == Result::Ok);
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(seen.calls == 1);
  CHECK((seen.revents & POLLOUT) != 0);
  CHECK((seen.revents & POLLIN) == 0);

  CHECK(loop.set_events(id, lemsg::Readable) == Result::Ok);
  CHECK(loop.run_once(0) == Result::Timeout);  // nothing to read
  CHECK(seen.calls == 1);

  REQUIRE(put_byte(s.b));
  CHECK(run_until(loop, [&] { return seen.calls > 1; }));
  CHECK(seen.calls == 2);
  CHECK((seen.revents & POLLIN) != 0);
  CHECK((seen.revents & POLLOUT) == 0);

  CHECK(loop.set_events(id, lemsg::Readable | lemsg::Writable) == Result::Ok);
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(seen.calls == 3);
  CHECK((seen.revents & POLLIN) != 0);
  CHECK((seen.revents & POLLOUT) != 0);

  CHECK(loop.set_events(id, 0) == Result::Ok);
  CHECK(loop.run_once(0) == Result::Timeout);  // data still waiting, no interest
  CHECK(seen.calls == 3);

  // Unknown bits are refused and leave the interest alone.
  CHECK(loop.set_events(id, POLLPRI) == Result::BadParameter);
  CHECK(loop.set_events(id, static_cast<short>(lemsg::Readable | 0x4000)) == Result::BadParameter);
  CHECK(loop.run_once(0) == Result::Timeout);
  CHECK(seen.calls == 3);
}

TEST_CASE("loop: the handler sees POLLHUP when the peer of a socketpair closes") {
  Loop loop;
  FdPair s = FdPair::sockets();
  REQUIRE(s.ok());
  Seen seen;
  WatchId id;
  REQUIRE(loop.add_watch(s.a, lemsg::Readable, [&](int fd, short rev) {
    ++seen.calls;
    seen.fd = fd;
    seen.revents = rev;
    if (rev & POLLHUP) {
      Result r = loop.remove_watch(id);
      CHECK(r == Result::Ok);
    }
  }, id) == Result::Ok);
  CHECK(loop.run_once(0) == Result::Timeout);
  s.close_b();
  CHECK(run_until(loop, [&] { return seen.calls > 0; }));
  CHECK(seen.calls == 1);
  CHECK(seen.fd == s.a);
  CHECK((seen.revents & POLLHUP) != 0);
  CHECK(loop.watch_count() == 0);
}

TEST_CASE("loop: POLLHUP reaches a watch whose interest is 0") {
  Loop loop;
  FdPair s = FdPair::sockets();
  REQUIRE(s.ok());
  Seen seen;
  WatchId id;
  REQUIRE(loop.add_watch(s.a, 0, [&](int, short rev) {
    ++seen.calls;
    seen.revents = rev;
    Result r = loop.remove_watch(id);
    CHECK(r == Result::Ok);
  }, id) == Result::Ok);
  s.close_b();
  CHECK(run_until(loop, [&] { return seen.calls > 0; }));
  CHECK((seen.revents & POLLHUP) != 0);
}

TEST_CASE("loop: a watched fd that is closed gets POLLNVAL once and the loop removes the watch") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  const int fd = ::dup(p.a);
  REQUIRE(fd >= 0);
  Seen seen;
  WatchId id;
  REQUIRE(loop.add_watch(fd, lemsg::Readable, [&seen](int f, short rev) {
    ++seen.calls;
    seen.fd = f;
    seen.revents = rev;
  }, id) == Result::Ok);
  // A second, healthy watch must survive.
  Seen other;
  WatchId other_id;
  REQUIRE(loop.add_watch(p.a, lemsg::Readable, [&other](int, short) { ++other.calls; }, other_id) ==
          Result::Ok);
  CHECK(loop.watch_count() == 2);

  REQUIRE(::close(fd) == 0);
  LogCapture log;
  lemsg::set_log_sink(capture_log, &log);
  lemsg::set_log_level(lemsg::LogLevel::Warning);
  const bool fired = run_until(loop, [&] { return seen.calls > 0; });
  lemsg::set_log_sink(nullptr, nullptr);
  lemsg::set_log_level(static_cast<lemsg::LogLevel>(LEMSG_LOG_LEVEL));
  CHECK(fired);
  CHECK(seen.calls == 1);
  CHECK(seen.fd == fd);
  CHECK((seen.revents & POLLNVAL) != 0);
  // The handler left the watch in place, so the loop removed it and said so.
  CHECK(loop.watch_count() == 1);
  CHECK(loop.remove_watch(id) == Result::NotFound);
  CHECK(log.warnings == 1);
  CHECK(std::strstr(log.last, "closed") != nullptr);

  CHECK(loop.run_once(0) == Result::Timeout);
  CHECK(seen.calls == 1);  // never again
  REQUIRE(put_byte(p.b));
  CHECK(run_until(loop, [&] { return other.calls > 0; }));
  CHECK(other.calls == 1);
}

TEST_CASE("loop: a handler that removes its POLLNVAL watch itself gets no warning") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  const int fd = ::dup(p.a);
  REQUIRE(fd >= 0);
  Seen seen;
  WatchId id;
  Result removed = Result::BadParameter;
  REQUIRE(loop.add_watch(fd, lemsg::Readable, [&](int, short rev) {
    ++seen.calls;
    seen.revents = rev;
    removed = loop.remove_watch(id);
  }, id) == Result::Ok);
  REQUIRE(::close(fd) == 0);
  LogCapture log;
  lemsg::set_log_sink(capture_log, &log);
  lemsg::set_log_level(lemsg::LogLevel::Warning);
  const bool fired = run_until(loop, [&] { return seen.calls > 0; });
  lemsg::set_log_sink(nullptr, nullptr);
  lemsg::set_log_level(static_cast<lemsg::LogLevel>(LEMSG_LOG_LEVEL));
  CHECK(fired);
  CHECK((seen.revents & POLLNVAL) != 0);
  CHECK(removed == Result::Ok);
  CHECK(loop.watch_count() == 0);
  CHECK(log.warnings == 0);
}

TEST_CASE("loop: add_watch refuses a negative fd, an empty handler and unknown event bits") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  WatchId id;
  id.value = 99;
  CHECK(loop.add_watch(-1, lemsg::Readable, [](int, short) {}, id) == Result::BadParameter);
  CHECK(id == WatchId{});
  id.value = 99;
  CHECK(loop.add_watch(p.a, lemsg::Readable, lemsg::WatchHandler{}, id) == Result::BadParameter);
  CHECK(id == WatchId{});
  void (*null_fn)(int, short) = nullptr;
  CHECK(loop.add_watch(p.a, lemsg::Readable, null_fn, id) == Result::BadParameter);
  CHECK(loop.add_watch(p.a, POLLPRI, [](int, short) {}, id) == Result::BadParameter);
  CHECK(loop.add_watch(p.a, static_cast<short>(lemsg::Readable | POLLHUP), [](int, short) {}, id) ==
        Result::BadParameter);
  CHECK(loop.add_watch(p.a, -1, [](int, short) {}, id) == Result::BadParameter);
  CHECK(id == WatchId{});
  CHECK(loop.watch_count() == 0);
  CHECK(loop.pollfd_count() == 1);  // only the wake-up fd
  // The valid forms are accepted.
  CHECK(loop.add_watch(p.a, 0, [](int, short) {}, id) == Result::Ok);
  CHECK(loop.add_watch(p.b, lemsg::Writable, [](int, short) {}, id) == Result::Ok);
  CHECK(loop.watch_count() == 2);
}

TEST_CASE("loop: unknown, removed and forged watch ids are NotFound") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  WatchId live, gone;
  REQUIRE(loop.add_watch(p.a, lemsg::Readable, [](int, short) {}, live) == Result::Ok);
  REQUIRE(loop.add_watch(p.a, lemsg::Readable, [](int, short) {}, gone) == Result::Ok);
  REQUIRE(loop.remove_watch(gone) == Result::Ok);
  // A timer id's value comes from another table and means nothing here.
  TimerId timer;
  REQUIRE(loop.add_timer([] {}, timer) == Result::Ok);

  std::vector<WatchId> bad = {WatchId{}, gone, WatchId{0xFFFFFFFFu}, WatchId{1}, WatchId{timer.value},
                              WatchId{live.value ^ 1u}, WatchId{live.value ^ 0x80000000u}};
  std::uint32_t x = 0x9E3779B9u;
  for (int i = 0; i < 200; ++i) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    if (x != live.value) bad.push_back(WatchId{x});
  }
  std::size_t wrong = 0;
  for (WatchId w : bad) {
    if (loop.remove_watch(w) != Result::NotFound) ++wrong;
    if (loop.set_events(w, lemsg::Readable) != Result::NotFound) ++wrong;
  }
  CHECK(wrong == 0);
  CHECK(loop.watch_count() == 1);
  CHECK(loop.set_events(live, lemsg::Writable) == Result::Ok);
  CHECK(loop.remove_watch(live) == Result::Ok);
  CHECK(loop.remove_watch(live) == Result::NotFound);
  CHECK(loop.set_events(live, 0) == Result::NotFound);
}

TEST_CASE("loop: the watch table holds LEMSG_MAX_WATCHES watches, then WatchTableFull") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  WatchId ids[LEMSG_MAX_WATCHES];
  for (auto& id : ids) REQUIRE(loop.add_watch(p.a, lemsg::Readable, [](int, short) {}, id) == Result::Ok);
  CHECK(loop.watch_count() == LEMSG_MAX_WATCHES);
  WatchId extra;
  extra.value = 5;
  CHECK(loop.add_watch(p.a, lemsg::Readable, [](int, short) {}, extra) == Result::WatchTableFull);
  CHECK(extra == WatchId{});
  CHECK(loop.add_watch(p.a, lemsg::Readable, [](int, short) {}, extra) == Result::WatchTableFull);
  CHECK(loop.watch_count() == LEMSG_MAX_WATCHES);
  // Still runs with a full table.
  int calls = 0;
  REQUIRE(loop.remove_watch(ids[0]) == Result::Ok);
  CHECK(loop.add_watch(p.a, lemsg::Readable, [&calls](int, short) { ++calls; }, extra) == Result::Ok);
  CHECK(loop.watch_count() == LEMSG_MAX_WATCHES);
  REQUIRE(put_byte(p.b));
  CHECK(run_until(loop, [&] { return calls > 0; }));
  CHECK(calls == 1);
}

// ---------------------------------------------------------------------------
// timers
// ---------------------------------------------------------------------------

TEST_CASE("loop: the timer table holds LEMSG_MAX_TIMERS timers, then TimerTableFull") {
  Loop loop;
  TimerId ids[LEMSG_MAX_TIMERS];
  for (auto& id : ids) REQUIRE(loop.add_timer([] {}, id) == Result::Ok);
  CHECK(loop.timer_count() == LEMSG_MAX_TIMERS);
  TimerId extra;
  extra.value = 5;
  CHECK(loop.add_timer([] {}, extra) == Result::TimerTableFull);
  CHECK(extra == TimerId{});
  REQUIRE(loop.remove_timer(ids[LEMSG_MAX_TIMERS - 1]) == Result::Ok);
  int fired = 0;
  CHECK(loop.add_timer([&fired] { ++fired; }, extra) == Result::Ok);
  CHECK(loop.arm_timer(extra, 0) == Result::Ok);
  CHECK(run_until(loop, [&] { return fired > 0; }));
  CHECK(fired == 1);
}

TEST_CASE("loop: add_timer refuses an empty handler") {
  Loop loop;
  TimerId id;
  id.value = 3;
  CHECK(loop.add_timer(lemsg::TimerHandler{}, id) == Result::BadParameter);
  CHECK(id == TimerId{});
  void (*null_fn)() = nullptr;
  CHECK(loop.add_timer(null_fn, id) == Result::BadParameter);
  CHECK(loop.timer_count() == 0);
}

TEST_CASE("loop: a one-shot timer fires once and is then disarmed but still exists") {
  Loop loop;
  int fired = 0;
  TimerId t;
  REQUIRE(loop.add_timer([&fired] { ++fired; }, t) == Result::Ok);
  CHECK_FALSE(loop.is_armed(t));  // created disarmed
  CHECK(loop.run_once(0) == Result::Timeout);
  CHECK(loop.arm_timer(t, 1) == Result::Ok);
  CHECK(loop.is_armed(t));
  CHECK(run_until(loop, [&] { return fired > 0; }));
  CHECK(fired == 1);
  CHECK_FALSE(loop.is_armed(t));
  CHECK(loop.timer_count() == 1);
  for (int i = 0; i < 3; ++i) CHECK(loop.run_once(10) == Result::Timeout);
  CHECK(fired == 1);
  // Re-arming works.
  CHECK(loop.arm_timer(t, 0) == Result::Ok);
  CHECK(run_until(loop, [&] { return fired > 1; }));
  CHECK(fired == 2);
  CHECK(loop.remove_timer(t) == Result::Ok);
  CHECK(loop.timer_count() == 0);
}

TEST_CASE("loop: a repeating timer fires until disarmed and can be armed again") {
  Loop loop;
  int fired = 0;
  TimerId t;
  REQUIRE(loop.add_timer([&fired] { ++fired; }, t) == Result::Ok);
  REQUIRE(loop.arm_timer(t, 1, 1) == Result::Ok);
  CHECK(run_until(loop, [&] { return fired >= 3; }));
  CHECK(fired >= 3);
  CHECK(loop.is_armed(t));
  CHECK(loop.disarm_timer(t) == Result::Ok);
  CHECK_FALSE(loop.is_armed(t));
  const int at_disarm = fired;
  for (int i = 0; i < 3; ++i) CHECK(loop.run_once(10) == Result::Timeout);
  CHECK(fired == at_disarm);
  CHECK(loop.disarm_timer(t) == Result::Ok);  // disarming twice is fine
  CHECK(loop.arm_timer(t, 0, 1) == Result::Ok);
  CHECK(run_until(loop, [&] { return fired >= at_disarm + 2; }));
  CHECK(fired >= at_disarm + 2);
  CHECK(loop.is_armed(t));
}

TEST_CASE("loop: a repeating timer that falls behind fires once, not in a burst") {
  Loop loop;
  int fired = 0;
  TimerId t;
  REQUIRE(loop.add_timer([&fired] { ++fired; }, t) == Result::Ok);
  REQUIRE(loop.arm_timer(t, 0, 1) == Result::Ok);
  // Miss many periods, then dispatch once.
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(fired == 1);
  CHECK(loop.is_armed(t));
}

TEST_CASE("loop: a removed timer never fires and its id is NotFound") {
  Loop loop;
  int fired = 0;
  TimerId t, other;
  REQUIRE(loop.add_timer([&fired] { ++fired; }, t) == Result::Ok);
  REQUIRE(loop.add_timer([] {}, other) == Result::Ok);
  REQUIRE(loop.arm_timer(t, 0) == Result::Ok);
  CHECK(loop.remove_timer(t) == Result::Ok);
  CHECK(loop.timer_count() == 1);
  for (int i = 0; i < 3; ++i) CHECK(loop.run_once(5) == Result::Timeout);
  CHECK(fired == 0);
  CHECK_FALSE(loop.is_armed(t));
  CHECK(loop.arm_timer(t, 0) == Result::NotFound);
  CHECK(loop.disarm_timer(t) == Result::NotFound);
  CHECK(loop.remove_timer(t) == Result::NotFound);
  // Unknown and forged ids too, including a watch id's value.
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  WatchId w;
  REQUIRE(loop.add_watch(p.a, 0, [](int, short) {}, w) == Result::Ok);
  for (TimerId bad : {TimerId{}, TimerId{0xFFFFFFFFu}, TimerId{1}, TimerId{w.value},
                      TimerId{other.value ^ 2u}}) {
    CHECK(loop.arm_timer(bad, 0) == Result::NotFound);
    CHECK(loop.disarm_timer(bad) == Result::NotFound);
    CHECK(loop.remove_timer(bad) == Result::NotFound);
    CHECK_FALSE(loop.is_armed(bad));
  }
  CHECK(loop.timer_count() == 1);
  CHECK(loop.remove_timer(other) == Result::Ok);
}

TEST_CASE("loop: timers with the same delay fire in the order they were armed") {
  Loop loop;
  Order order;
  TimerId t[3];
  for (int i = 0; i < 3; ++i) REQUIRE(loop.add_timer([&order, i] { order.add(i); }, t[i]) == Result::Ok);
  // Arm in an order unlike the creation order.
  REQUIRE(loop.arm_timer(t[1], 20) == Result::Ok);
  REQUIRE(loop.arm_timer(t[2], 20) == Result::Ok);
  REQUIRE(loop.arm_timer(t[0], 20) == Result::Ok);
  CHECK(run_until(loop, [&] { return order.n >= 3; }));
  REQUIRE(order.n == 3);
  CHECK(order.v[0] == 1);
  CHECK(order.v[1] == 2);
  CHECK(order.v[2] == 0);

  // Re-arming a timer puts it behind the others with the same delay.
  order = Order{};
  REQUIRE(loop.arm_timer(t[0], 20) == Result::Ok);
  REQUIRE(loop.arm_timer(t[1], 20) == Result::Ok);
  REQUIRE(loop.arm_timer(t[0], 20) == Result::Ok);
  CHECK(run_until(loop, [&] { return order.n >= 2; }));
  for (int i = 0; i < 3; ++i) CHECK(loop.run_once(5) == Result::Timeout);
  REQUIRE(order.n == 2);
  CHECK(order.v[0] == 1);
  CHECK(order.v[1] == 0);
}

TEST_CASE("loop: repeating timers with exactly the same deadline fire in arming order") {
  Loop loop;
  Order order;
  // Created B then A, so the table's slot order is the opposite of the
  // arming order.
  TimerId b, a;
  REQUIRE(loop.add_timer([&order] { order.add(2); }, b) == Result::Ok);
  REQUIRE(loop.add_timer([&order] { order.add(1); }, a) == Result::Ok);
  REQUIRE(loop.arm_timer(a, 0, 1) == Result::Ok);
  REQUIRE(loop.arm_timer(b, 0, 1) == Result::Ok);
  // Both fall behind, so the first dispatch moves both deadlines to the same
  // value (dispatch time + period); the second dispatch sees a true tie.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(loop.run_once(0) == Result::Ok);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(loop.run_once(0) == Result::Ok);
  REQUIRE(order.n == 4);
  CHECK(order.v[0] == 1);
  CHECK(order.v[1] == 2);
  CHECK(order.v[2] == 1);
  CHECK(order.v[3] == 2);
}

TEST_CASE("loop: timers with different deadlines fire earliest first") {
  Loop loop;
  Order order;
  // Ordering, not timing: the 80 ms gaps between the delays are far larger
  // than the time it takes to arm three timers, even under a loaded emulator.
  const std::uint32_t delays[3] = {240, 80, 160};
  TimerId t[3];
  for (int i = 0; i < 3; ++i) {
    const int d = static_cast<int>(delays[i]);
    REQUIRE(loop.add_timer([&order, d] { order.add(d); }, t[i]) == Result::Ok);
  }
  for (int i = 0; i < 3; ++i) REQUIRE(loop.arm_timer(t[i], delays[i]) == Result::Ok);
  CHECK(run_until(loop, [&] { return order.n >= 3; }));
  REQUIRE(order.n == 3);
  CHECK(order.v[0] == 80);
  CHECK(order.v[1] == 160);
  CHECK(order.v[2] == 240);
}

TEST_CASE("loop: timers that are all due in one dispatch still fire earliest first") {
  Loop loop;
  Order order;
  // Armed latest-deadline first, 80 ms apart, as above.
  const std::uint32_t delays[3] = {240, 80, 160};
  TimerId t[3];
  for (int i = 0; i < 3; ++i) {
    const int d = static_cast<int>(delays[i]);
    REQUIRE(loop.add_timer([&order, d] { order.add(d); }, t[i]) == Result::Ok);
  }
  for (int i = 0; i < 3; ++i) REQUIRE(loop.arm_timer(t[i], delays[i]) == Result::Ok);
  // Sleeping past every deadline puts all three in the same dispatch; the
  // order then comes from the deadlines alone.
  std::this_thread::sleep_for(std::chrono::milliseconds(260));
  CHECK(loop.run_once(0) == Result::Ok);
  REQUIRE(order.n == 3);
  CHECK(order.v[0] == 80);
  CHECK(order.v[1] == 160);
  CHECK(order.v[2] == 240);
}

TEST_CASE("loop: a timer armed with delay 0 inside a timer handler waits for a later dispatch") {
  Loop loop;
  // Handlers capture at most four pointers (LEMSG_CALLABLE_SIZE on 32-bit
  // targets), so the state lives in one struct.
  struct {
    Loop* loop;
    TimerId ta, tb;
    int a = 0, b = 0, b_seen_by_a = -1;
    Result armed = Result::BadParameter;
  } s;
  s.loop = &loop;
  REQUIRE(loop.add_timer([c = &s] { ++c->b; }, s.tb) == Result::Ok);
  REQUIRE(loop.add_timer([c = &s] {
    ++c->a;
    c->b_seen_by_a = c->b;
    c->armed = c->loop->arm_timer(c->tb, 0);
  }, s.ta) == Result::Ok);
  REQUIRE(loop.arm_timer(s.ta, 0) == Result::Ok);
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(s.a == 1);
  CHECK(s.armed == Result::Ok);
  CHECK(s.b == 0);  // not in the same dispatch
  CHECK(s.b_seen_by_a == 0);
  CHECK(loop.next_timeout_ms() == 0);
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(s.b == 1);
  CHECK(s.a == 1);
}

TEST_CASE("loop: a timer that re-arms itself with delay 0 fires once per dispatch") {
  Loop loop;
  int fired = 0;
  TimerId t;
  REQUIRE(loop.add_timer([&] {
    ++fired;
    Result r = loop.arm_timer(t, 0);
    CHECK(r == Result::Ok);
  }, t) == Result::Ok);
  REQUIRE(loop.arm_timer(t, 0) == Result::Ok);
  for (int i = 1; i <= 5; ++i) {
    CHECK(loop.run_once(0) == Result::Ok);
    CHECK(fired == i);
  }
}

// ---------------------------------------------------------------------------
// changing the loop from its own handlers
// ---------------------------------------------------------------------------

namespace {
struct SelfRemove {
  Loop* loop = nullptr;
  WatchId watch;
  TimerId timer;
  Result removed = Result::BadParameter;
  int value_after_remove = 0;
  int calls = 0;
};
}  // namespace

TEST_CASE("loop: a watch handler may remove its own watch") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  SelfRemove ctx;
  ctx.loop = &loop;
  // The capture owns the only reference to a heap int: if the loop ran the
  // handler in place, removing the watch would free it under the handler
  // (the address sanitizer build would report the read below).
  REQUIRE(loop.add_watch(p.a, lemsg::Readable, [c = &ctx, owned = std::make_shared<int>(42)](int, short) {
    ++c->calls;
    c->removed = c->loop->remove_watch(c->watch);
    c->value_after_remove = *owned;
  }, ctx.watch) == Result::Ok);
  REQUIRE(put_byte(p.b));
  CHECK(run_until(loop, [&] { return ctx.calls > 0; }));
  CHECK(ctx.calls == 1);
  CHECK(ctx.removed == Result::Ok);
  CHECK(ctx.value_after_remove == 42);
  CHECK(loop.watch_count() == 0);
  CHECK(loop.run_once(0) == Result::Timeout);  // still readable, no longer watched
  CHECK(ctx.calls == 1);
}

TEST_CASE("loop: a timer handler may remove its own timer") {
  Loop loop;
  SelfRemove ctx;
  ctx.loop = &loop;
  REQUIRE(loop.add_timer([c = &ctx, owned = std::make_shared<int>(7)] {
    ++c->calls;
    c->removed = c->loop->remove_timer(c->timer);
    c->value_after_remove = *owned;
  }, ctx.timer) == Result::Ok);
  REQUIRE(loop.arm_timer(ctx.timer, 0, 1) == Result::Ok);  // repeating: must stop anyway
  CHECK(run_until(loop, [&] { return ctx.calls > 0; }));
  for (int i = 0; i < 3; ++i) CHECK(loop.run_once(5) == Result::Timeout);
  CHECK(ctx.calls == 1);
  CHECK(ctx.removed == Result::Ok);
  CHECK(ctx.value_after_remove == 7);
  CHECK(loop.timer_count() == 0);
}

// Handlers run in place: a handler that removes its own watch (or timer)
// keeps its slot until it returns, so watches (timers) it adds after that
// never land on the callable that is running.
TEST_CASE("loop: a handler that removes itself and fills the table runs on undisturbed") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  struct Ctx {
    Loop* loop;
    WatchId watch;
    TimerId timer;
    int fd;
    int calls = 0;
    int added = 0;
    Result full = Result::Ok;
    int value_after = 0;
  } ctx{&loop, WatchId{}, TimerId{}, p.b};
  REQUIRE(loop.add_watch(p.a, lemsg::Readable, [c = &ctx, owned = std::make_shared<int>(42)](int, short) {
    ++c->calls;
    CHECK(c->loop->remove_watch(c->watch) == Result::Ok);
    WatchId w;
    for (;;) {
      const Result r = c->loop->add_watch(c->fd, 0, [](int, short) {}, w);
      if (r != Result::Ok) {
        c->full = r;
        break;
      }
      ++c->added;
    }
    c->value_after = *owned;
  }, ctx.watch) == Result::Ok);
  REQUIRE(put_byte(p.b));
  CHECK(run_until(loop, [&] { return ctx.calls > 0; }));
  CHECK(ctx.calls == 1);
  CHECK(ctx.full == Result::WatchTableFull);
  CHECK(ctx.added == LEMSG_MAX_WATCHES - 1);  // the running handler's slot stayed taken
  CHECK(ctx.value_after == 42);
  CHECK(loop.watch_count() == static_cast<std::size_t>(LEMSG_MAX_WATCHES - 1));
  WatchId last;
  CHECK(loop.add_watch(p.b, 0, [](int, short) {}, last) == Result::Ok);  // freed once it returned

  Loop tl;
  ctx.loop = &tl;
  ctx.calls = ctx.added = ctx.value_after = 0;
  ctx.full = Result::Ok;
  REQUIRE(tl.add_timer([c = &ctx, owned = std::make_shared<int>(7)] {
    ++c->calls;
    CHECK(c->loop->remove_timer(c->timer) == Result::Ok);
    TimerId t;
    for (;;) {
      const Result r = c->loop->add_timer([] {}, t);
      if (r != Result::Ok) {
        c->full = r;
        break;
      }
      ++c->added;
    }
    c->value_after = *owned;
  }, ctx.timer) == Result::Ok);
  REQUIRE(tl.arm_timer(ctx.timer, 0) == Result::Ok);
  CHECK(run_until(tl, [&] { return ctx.calls > 0; }));
  CHECK(ctx.calls == 1);
  CHECK(ctx.full == Result::TimerTableFull);
  CHECK(ctx.added == LEMSG_MAX_TIMERS - 1);
  CHECK(ctx.value_after == 7);
  TimerId spare;
  CHECK(tl.add_timer([] {}, spare) == Result::Ok);
}

// The poll list is kept between waits: watches added, removed or changed
// between two run_once() calls are polled as they are now.
TEST_CASE("loop: watches changed between waits are polled as they are now") {
  Loop loop;
  FdPair p = FdPair::pipe(), q = FdPair::pipe();
  REQUIRE((p.ok() && q.ok()));
  int pc = 0, qc = 0;
  WatchId pw, qw;
  REQUIRE(loop.add_watch(p.a, lemsg::Readable, [&](int fd, short) {
    ++pc;
    char c;
    CHECK(::read(fd, &c, 1) == 1);
  }, pw) == Result::Ok);
  REQUIRE(put_byte(p.b));
  CHECK(run_until(loop, [&] { return pc == 1; }));
  // Interest dropped: a byte waits, the handler does not run.
  REQUIRE(loop.set_events(pw, 0) == Result::Ok);
  REQUIRE(put_byte(p.b));
  CHECK(loop.run_once(10) == Result::Timeout);
  CHECK(pc == 1);
  REQUIRE(loop.set_events(pw, lemsg::Readable) == Result::Ok);
  CHECK(run_until(loop, [&] { return pc == 2; }));
  // A watch added after a wait is polled in the next one.
  REQUIRE(loop.add_watch(q.a, lemsg::Readable, [&](int fd, short) {
    ++qc;
    char c;
    CHECK(::read(fd, &c, 1) == 1);
  }, qw) == Result::Ok);
  REQUIRE(put_byte(q.b));
  CHECK(run_until(loop, [&] { return qc == 1; }));
  // Removed: no longer polled, though its fd is readable.
  REQUIRE(loop.remove_watch(pw) == Result::Ok);
  REQUIRE(put_byte(p.b));
  CHECK(loop.run_once(10) == Result::Timeout);
  CHECK(pc == 2);
  // An embedding caller's fill_pollfds() between two run_once() calls.
  pollfd fds[LEMSG_MAX_WATCHES + 1];
  std::size_t n = 0;
  REQUIRE(loop.fill_pollfds(fds, LEMSG_MAX_WATCHES + 1, n) == Result::Ok);
  CHECK(n == 2);  // the wake-up eventfd and q
  REQUIRE(put_byte(q.b));
  CHECK(run_until(loop, [&] { return qc == 2; }));
  CHECK(loop.dispatch(fds, n) == Result::BadParameter);  // run_once() has waited since that fill
}

namespace {
struct Rivals {
  Loop* loop = nullptr;
  WatchId watch[2];
  TimerId timer[2];
  int ran[2] = {};
  Result removed[2] = {Result::BadParameter, Result::BadParameter};
  // A watch added during dispatch, on an fd that was already readable.
  int fresh_fd = -1;
  WatchId fresh;
  Result fresh_added = Result::BadParameter;
  int fresh_calls = 0;
};
}  // namespace

TEST_CASE("loop: a handler that removes another pending watch keeps that handler from running") {
  Loop loop;
  FdPair p0 = FdPair::pipe(), p1 = FdPair::pipe(), p2 = FdPair::pipe();
  REQUIRE((p0.ok() && p1.ok() && p2.ok()));
  Rivals ctx;
  ctx.loop = &loop;
  ctx.fresh_fd = p2.a;
  const int fds[2] = {p0.a, p1.a};
  for (int i = 0; i < 2; ++i) {
    // Whichever runs first removes the other and adds a new watch, which
    // may take the removed watch's slot.
    REQUIRE(loop.add_watch(fds[i], lemsg::Readable, [c = &ctx, i, owned = std::make_shared<int>(i)](int, short) {
      ++c->ran[*owned];
      c->removed[i] = c->loop->remove_watch(c->watch[1 - i]);
      c->fresh_added = c->loop->add_watch(c->fresh_fd, lemsg::Readable, [c](int, short) { ++c->fresh_calls; }, c->fresh);
    }, ctx.watch[i]) == Result::Ok);
  }
  // Every fd is readable before the one poll that sees them all.
  REQUIRE(put_byte(p0.b));
  REQUIRE(put_byte(p1.b));
  REQUIRE(put_byte(p2.b));
  CHECK(run_until(loop, [&] { return ctx.ran[0] + ctx.ran[1] > 0; }));
  CHECK(ctx.ran[0] + ctx.ran[1] == 1);
  const int winner = ctx.ran[0] ? 0 : 1;
  CHECK(ctx.removed[winner] == Result::Ok);
  CHECK(ctx.fresh_added == Result::Ok);
  CHECK(ctx.fresh_calls == 0);  // added during the dispatch: not in its poll
  CHECK(loop.watch_count() == 2);
  CHECK(loop.remove_watch(ctx.watch[1 - winner]) == Result::NotFound);
  // Next dispatch: the winner (still readable) and the new watch both run.
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(ctx.fresh_calls == 1);
  CHECK(ctx.ran[winner] == 2);
  CHECK(ctx.ran[1 - winner] == 0);
}

TEST_CASE("loop: a timer handler that removes another due timer keeps it from firing") {
  Loop loop;
  Rivals ctx;
  ctx.loop = &loop;
  for (int i = 0; i < 2; ++i) {
    REQUIRE(loop.add_timer([c = &ctx, i, owned = std::make_shared<int>(i)] {
      ++c->ran[*owned];
      c->removed[i] = c->loop->remove_timer(c->timer[1 - i]);
    }, ctx.timer[i]) == Result::Ok);
  }
  REQUIRE(loop.arm_timer(ctx.timer[0], 0) == Result::Ok);
  REQUIRE(loop.arm_timer(ctx.timer[1], 0) == Result::Ok);
  // Both are due at the first dispatch; timer 0 was armed first.
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(ctx.ran[0] == 1);
  CHECK(ctx.ran[1] == 0);
  CHECK(ctx.removed[0] == Result::Ok);
  CHECK(loop.timer_count() == 1);
  CHECK(loop.run_once(0) == Result::Timeout);
  CHECK(ctx.ran[1] == 0);
}

TEST_CASE("loop: handlers may add watches and timers while the loop dispatches") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  struct {
    Loop* loop;
    int fd;
    int timer_fired = 0, watch_fired = 0;
    Result added_timer = Result::BadParameter, armed = Result::BadParameter,
           added_watch = Result::BadParameter;
    TimerId first, second;
    WatchId w;
  } s;
  s.loop = &loop;
  s.fd = p.a;
  REQUIRE(loop.add_timer([c = &s] {
    c->added_timer = c->loop->add_timer([c] { ++c->timer_fired; }, c->second);
    c->armed = c->loop->arm_timer(c->second, 0);
    c->added_watch = c->loop->add_watch(c->fd, lemsg::Readable, [c](int fd, short) {
      ++c->watch_fired;
      drain(fd);
    }, c->w);
  }, s.first) == Result::Ok);
  REQUIRE(loop.arm_timer(s.first, 0) == Result::Ok);
  REQUIRE(put_byte(p.b));
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(s.added_timer == Result::Ok);
  CHECK(s.armed == Result::Ok);
  CHECK(s.added_watch == Result::Ok);
  CHECK(s.timer_fired == 0);
  CHECK(s.watch_fired == 0);
  CHECK(run_until(loop, [&] { return s.timer_fired > 0 && s.watch_fired > 0; }));
  CHECK(s.timer_fired == 1);
  CHECK(s.watch_fired == 1);
  CHECK(loop.timer_count() == 2);
  CHECK(loop.watch_count() == 1);
}

// ---------------------------------------------------------------------------
// post
// ---------------------------------------------------------------------------

namespace {
struct PostLog {
  std::thread::id loop_thread;
  std::vector<int> order;  // touched on the loop thread only
  int wrong_thread = 0;
};
}  // namespace

TEST_CASE("loop: post refuses an empty function") {
  Loop loop;
  CHECK(loop.post(lemsg::PostedFn{}) == Result::BadParameter);
  void (*null_fn)() = nullptr;
  CHECK(loop.post(null_fn) == Result::BadParameter);
  CHECK(loop.next_timeout_ms() == -1);
  CHECK(loop.run_once(0) == Result::Timeout);
}

TEST_CASE("loop: the post queue holds LEMSG_MAX_POSTED functions, then QueueFull, and runs them in order") {
  Loop loop;
  PostLog log;
  log.loop_thread = std::this_thread::get_id();
  log.order.reserve(LEMSG_MAX_POSTED + 1);
  for (int i = 0; i < LEMSG_MAX_POSTED; ++i)
    REQUIRE(loop.post([l = &log, i] { l->order.push_back(i); }) == Result::Ok);
  // The loop is not running, so the queue cannot drain: the next post fails
  // at once instead of waiting.
  CHECK(loop.post([l = &log] { l->order.push_back(-1); }) == Result::QueueFull);
  CHECK(loop.post([l = &log] { l->order.push_back(-1); }) == Result::QueueFull);
  CHECK(loop.next_timeout_ms() == 0);
  CHECK(log.order.empty());
  CHECK(run_until(loop, [&] { return log.order.size() >= static_cast<std::size_t>(LEMSG_MAX_POSTED); }));
  REQUIRE(log.order.size() == static_cast<std::size_t>(LEMSG_MAX_POSTED));
  for (int i = 0; i < LEMSG_MAX_POSTED; ++i) CHECK(log.order[static_cast<std::size_t>(i)] == i);
  CHECK(loop.next_timeout_ms() == -1);
  // Drained: accepts again.
  CHECK(loop.post([l = &log] { l->order.push_back(100); }) == Result::Ok);
  CHECK(run_until(loop, [&] { return log.order.size() > static_cast<std::size_t>(LEMSG_MAX_POSTED); }));
  CHECK(log.order.back() == 100);
  CHECK(loop.run_once(0) == Result::Timeout);
}

TEST_CASE("loop: a thread that fills the post queue gets QueueFull without blocking") {
  Loop loop;
  PostLog log;
  log.loop_thread = std::this_thread::get_id();
  log.order.reserve(LEMSG_MAX_POSTED);
  Result results[LEMSG_MAX_POSTED + 2];
  std::thread poster([&] {
    for (int i = 0; i < LEMSG_MAX_POSTED + 2; ++i)
      results[i] = loop.post([l = &log, i] {
        if (std::this_thread::get_id() != l->loop_thread) ++l->wrong_thread;
        l->order.push_back(i);
      });
  });
  poster.join();  // returns: nothing in post() waited for the loop
  for (int i = 0; i < LEMSG_MAX_POSTED; ++i) CHECK(results[i] == Result::Ok);
  CHECK(results[LEMSG_MAX_POSTED] == Result::QueueFull);
  CHECK(results[LEMSG_MAX_POSTED + 1] == Result::QueueFull);
  CHECK(run_until(loop, [&] { return log.order.size() >= static_cast<std::size_t>(LEMSG_MAX_POSTED); }));
  REQUIRE(log.order.size() == static_cast<std::size_t>(LEMSG_MAX_POSTED));
  for (int i = 0; i < LEMSG_MAX_POSTED; ++i) CHECK(log.order[static_cast<std::size_t>(i)] == i);
  CHECK(log.wrong_thread == 0);
  CHECK(loop.post([] {}) == Result::Ok);
  CHECK(loop.run_once(0) == Result::Ok);
}

TEST_CASE("loop: functions posted from other threads run on the loop thread in each thread's order") {
  constexpr int per_thread = 300;
  constexpr int threads = 2;
  Loop loop;
  PostLog log;
  log.loop_thread = std::this_thread::get_id();
  log.order.reserve(per_thread * threads);
  std::atomic<int> unexpected{0};
  std::vector<std::thread> posters;
  for (int t = 0; t < threads; ++t) {
    posters.emplace_back([&, t] {
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      for (int i = 0; i < per_thread; ++i) {
        const int tag = t * per_thread + i;
        for (;;) {
          const Result r = loop.post([l = &log, tag] {
            if (std::this_thread::get_id() != l->loop_thread) ++l->wrong_thread;
            l->order.push_back(tag);
          });
          if (r == Result::Ok) break;
          if (r != Result::QueueFull || std::chrono::steady_clock::now() > give_up) {
            ++unexpected;
            return;
          }
          std::this_thread::yield();  // the queue is full: let the loop drain it
        }
      }
    });
  }
  const std::size_t want = static_cast<std::size_t>(per_thread * threads);
  const bool all = run_until(loop, [&] { return log.order.size() >= want || unexpected.load() != 0; }, 2000, 10);
  for (auto& th : posters) th.join();
  CHECK(all);
  CHECK(unexpected.load() == 0);
  CHECK(log.order.size() == want);
  CHECK(log.wrong_thread == 0);
  // Each thread's functions ran in the order it posted them.
  int next[threads] = {};
  std::size_t out_of_order = 0;
  for (int tag : log.order) {
    const int t = tag / per_thread;
    if (tag % per_thread != next[t]) ++out_of_order;
    next[t] = tag % per_thread + 1;
  }
  CHECK(out_of_order == 0);
  for (int t = 0; t < threads; ++t) CHECK(next[t] == per_thread);
}

TEST_CASE("loop: a posted function that posts again does not keep one dispatch going") {
  Loop loop;
  // Re-posts itself up to `limit` times; if a dispatch ran whatever was
  // posted during it, one run_once would run the whole chain.
  struct Chain {
    Loop* loop;
    int runs = 0;
    int limit = 1000;
    Result last = Result::Ok;
    static void step(Chain* c) {
      ++c->runs;
      if (c->runs < c->limit) c->last = c->loop->post([c] { step(c); });
    }
  } chain;
  chain.loop = &loop;
  REQUIRE(loop.post([c = &chain] { Chain::step(c); }) == Result::Ok);
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(chain.runs >= 1);
  CHECK(chain.runs < chain.limit);
  CHECK(chain.last == Result::Ok);
  CHECK(loop.next_timeout_ms() == 0);  // the re-posted one waits
  const int after_one = chain.runs;
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(chain.runs > after_one);
  CHECK(chain.runs < chain.limit);
  CHECK(run_until(loop, [&] { return chain.runs >= chain.limit; }, 2 * 1000));
  CHECK(chain.runs == chain.limit);
  CHECK(chain.last == Result::Ok);
  CHECK(loop.run_once(0) == Result::Timeout);
}

// ---------------------------------------------------------------------------
// run and stop
// ---------------------------------------------------------------------------

TEST_CASE("loop: stop from another thread ends run") {
  Loop loop;
  bool safety_fired = false;
  TimerId safety;
  REQUIRE(loop.add_timer([&] {
    safety_fired = true;
    loop.stop();
  }, safety) == Result::Ok);
  REQUIRE(loop.arm_timer(safety, kSafetyMs) == Result::Ok);
  std::atomic<bool> running{false};
  std::thread stopper([&] {
    // A posted function tells this thread the loop is dispatching.
    while (loop.post([&running] { running.store(true); }) == Result::QueueFull) std::this_thread::yield();
    for (int i = 0; i < 10000 && !running.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    loop.stop();
  });
  const Result r = loop.run();
  stopper.join();
  CHECK(r == Result::Ok);
  CHECK(running.load());
  CHECK_FALSE(safety_fired);
  CHECK(loop.is_armed(safety));
}

TEST_CASE("loop: stop from a handler ends run") {
  Loop loop;
  bool safety_fired = false;
  TimerId safety, tick;
  int ticks = 0;
  REQUIRE(loop.add_timer([&] {
    safety_fired = true;
    loop.stop();
  }, safety) == Result::Ok);
  REQUIRE(loop.arm_timer(safety, kSafetyMs) == Result::Ok);
  REQUIRE(loop.add_timer([&] {
    if (++ticks == 3) loop.stop();
  }, tick) == Result::Ok);
  REQUIRE(loop.arm_timer(tick, 1, 1) == Result::Ok);
  CHECK(loop.run() == Result::Ok);
  CHECK_FALSE(safety_fired);
  CHECK(ticks == 3);

  // A stop from a watch handler works the same, and run() can run again.
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  int calls = 0;
  WatchId w;
  REQUIRE(loop.disarm_timer(tick) == Result::Ok);
  REQUIRE(loop.add_watch(p.a, lemsg::Readable, [&](int, short) {
    ++calls;
    loop.stop();
  }, w) == Result::Ok);
  REQUIRE(put_byte(p.b));
  CHECK(loop.run() == Result::Ok);
  CHECK_FALSE(safety_fired);
  CHECK(calls == 1);
}

// A nested run_once would poll again and run the handlers of events the
// outer dispatch is still handing out, some twice for one event.
TEST_CASE("loop: run, run_once, fill_pollfds and dispatch called from inside a handler return Reentrant") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  REQUIRE(put_byte(p.b));  // stays readable: the handler does not read it
  struct Nested {
    Loop* loop;
    int calls = 0;
    Result once = Result::Ok, run = Result::Ok, fill = Result::Ok, dispatch = Result::Ok;
    void try_all() {
      once = loop->run_once(0);
      run = loop->run();  // without the refusal, the safety timer ends it
      struct pollfd fds[LEMSG_MAX_WATCHES + 1];
      std::size_t n = 0;
      fill = loop->fill_pollfds(fds, LEMSG_MAX_WATCHES + 1, n);
      dispatch = loop->dispatch(fds, 0);
    }
  } watch{&loop}, timer{&loop};
  bool safety_fired = false;
  TimerId safety, t;
  REQUIRE(loop.add_timer([&] {
    safety_fired = true;
    loop.stop();
  }, safety) == Result::Ok);
  REQUIRE(loop.arm_timer(safety, 200, 200) == Result::Ok);  // stops every nested run()
  WatchId w;
  REQUIRE(loop.add_watch(p.a, lemsg::Readable, [&watch](int, short) {
    if (++watch.calls == 1) watch.try_all();
  }, w) == Result::Ok);
  REQUIRE(loop.add_timer([&timer] {
    if (++timer.calls == 1) timer.try_all();
  }, t) == Result::Ok);
  REQUIRE(loop.arm_timer(t, 0) == Result::Ok);
  CHECK(loop.run_once(kSafetyMs) == Result::Ok);
  CHECK(watch.calls == 1);  // one event, one call
  CHECK(timer.calls == 1);
  CHECK_FALSE(safety_fired);
  for (Nested* n : {&watch, &timer}) {
    CHECK(n->once == Result::Reentrant);
    CHECK(n->run == Result::Reentrant);
    CHECK(n->fill == Result::Reentrant);
    CHECK(n->dispatch == Result::Reentrant);
  }
  // Outside handlers the loop runs as before.
  CHECK(loop.run_once(0) == Result::Ok);
  CHECK(watch.calls == 2);
  REQUIRE(loop.remove_timer(safety) == Result::Ok);
}

TEST_CASE("loop: stop before run makes run return at once, and only once") {
  Loop loop;
  bool safety_fired = false;
  TimerId safety, now, tick;
  int now_fired = 0, ticks = 0;
  REQUIRE(loop.add_timer([&] {
    safety_fired = true;
    loop.stop();
  }, safety) == Result::Ok);
  REQUIRE(loop.arm_timer(safety, kSafetyMs) == Result::Ok);
  REQUIRE(loop.add_timer([&now_fired] { ++now_fired; }, now) == Result::Ok);
  REQUIRE(loop.arm_timer(now, 0) == Result::Ok);
  loop.stop();
  CHECK(loop.run() == Result::Ok);
  CHECK_FALSE(safety_fired);
  CHECK(now_fired == 0);  // returned before dispatching anything

  // The stop was used up: the next run() runs until a handler stops it.
  REQUIRE(loop.add_timer([&] {
    if (++ticks == 2) loop.stop();
  }, tick) == Result::Ok);
  REQUIRE(loop.arm_timer(tick, 1, 1) == Result::Ok);
  CHECK(loop.run() == Result::Ok);
  CHECK_FALSE(safety_fired);
  CHECK(ticks == 2);
  CHECK(now_fired == 1);
}

// ---------------------------------------------------------------------------
// embedding in another loop
// ---------------------------------------------------------------------------

TEST_CASE("loop: fill_pollfds, the caller's poll and dispatch run the loop's handlers") {
  Loop loop;
  FdPair p = FdPair::pipe();
  REQUIRE(p.ok());
  Seen seen;
  WatchId w;
  REQUIRE(loop.add_watch(p.a, lemsg::Readable, [&seen](int fd, short rev) {
    ++seen.calls;
    seen.fd = fd;
    seen.revents = rev;
    drain(fd);
  }, w) == Result::Ok);
  CHECK(loop.pollfd_count() == 2);  // the watch and the wake-up eventfd

  struct pollfd small[1];
  std::size_t count = 99;
  CHECK(loop.fill_pollfds(small, 1, count) == Result::BadParameter);
  CHECK(count == 2);
  count = 99;
  CHECK(loop.fill_pollfds(nullptr, 0, count) == Result::BadParameter);
  CHECK(count == 2);

  struct pollfd fds[8];
  REQUIRE(loop.fill_pollfds(fds, 8, count) == Result::Ok);
  REQUIRE(count == 2);
  int found = 0;
  for (std::size_t i = 0; i < count; ++i)
    if (fds[i].fd == p.a && fds[i].events == POLLIN) ++found;
  CHECK(found == 1);

  REQUIRE(put_byte(p.b));
  CHECK(loop.next_timeout_ms() == -1);
  const int rc = ::poll(fds, static_cast<nfds_t>(count), 5000);
  CHECK(rc >= 1);
  // A count that does not match the fill is refused and runs nothing.
  CHECK(loop.dispatch(fds, count + 1) == Result::BadParameter);
  CHECK(loop.dispatch(fds, count - 1) == Result::BadParameter);
  CHECK(seen.calls == 0);
  CHECK(loop.dispatch(fds, count) == Result::Ok);
  CHECK(seen.calls == 1);
  CHECK(seen.fd == p.a);
  CHECK((seen.revents & POLLIN) != 0);
}

TEST_CASE("loop: next_timeout_ms is -1 with nothing scheduled, 0 when due, positive otherwise") {
  Loop loop;
  CHECK(loop.next_timeout_ms() == -1);
  int fired = 0;
  TimerId t;
  REQUIRE(loop.add_timer([&fired] { ++fired; }, t) == Result::Ok);
  CHECK(loop.next_timeout_ms() == -1);  // exists but disarmed
  REQUIRE(loop.arm_timer(t, 10000) == Result::Ok);
  const int far = loop.next_timeout_ms();
  CHECK(far > 0);
  CHECK(far <= 10000);
  REQUIRE(loop.arm_timer(t, 0) == Result::Ok);
  CHECK(loop.next_timeout_ms() == 0);
  REQUIRE(loop.disarm_timer(t) == Result::Ok);
  CHECK(loop.next_timeout_ms() == -1);

  // Posted work waits: 0 until it has run.
  int ran = 0;
  REQUIRE(loop.post([&ran] { ++ran; }) == Result::Ok);
  CHECK(loop.next_timeout_ms() == 0);
  struct pollfd fds[LEMSG_MAX_WATCHES + 1];
  std::size_t n = 0;
  REQUIRE(loop.fill_pollfds(fds, LEMSG_MAX_WATCHES + 1, n) == Result::Ok);
  CHECK(::poll(fds, static_cast<nfds_t>(n), loop.next_timeout_ms()) >= 0);
  CHECK(loop.dispatch(fds, n) == Result::Ok);
  CHECK(ran == 1);
  CHECK(loop.next_timeout_ms() == -1);

  // A timer driven entirely through the embedding hooks.
  REQUIRE(loop.arm_timer(t, 2) == Result::Ok);
  for (int i = 0; i < kRounds && fired == 0; ++i) {
    REQUIRE(loop.fill_pollfds(fds, LEMSG_MAX_WATCHES + 1, n) == Result::Ok);
    const int wait = loop.next_timeout_ms();
    CHECK(wait >= 0);
    CHECK(wait <= 2);
    CHECK(::poll(fds, static_cast<nfds_t>(n), wait) >= 0);
    const Result r = loop.dispatch(fds, n);
    CHECK((r == Result::Ok || r == Result::Timeout));
  }
  CHECK(fired == 1);
  CHECK(loop.next_timeout_ms() == -1);
}

// ---------------------------------------------------------------------------
// signals
// ---------------------------------------------------------------------------

namespace {
// The signal is sent to the loop thread and read there: sig_atomic_t is enough
// (std::atomic<int> is not lock-free on armv5te).
volatile sig_atomic_t g_signals = 0;
void count_signal(int) { g_signals = g_signals + 1; }
}  // namespace

TEST_CASE("loop: a signal from another thread interrupts run_once without an error") {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = count_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: poll() returns EINTR
  struct sigaction old;
  REQUIRE(::sigaction(SIGUSR1, &sa, &old) == 0);
  g_signals = 0;

  Loop loop;
  int long_fired = 0, short_fired = 0;
  TimerId long_timer, short_timer;
  REQUIRE(loop.add_timer([&long_fired] { ++long_fired; }, long_timer) == Result::Ok);
  REQUIRE(loop.add_timer([&short_fired] { ++short_fired; }, short_timer) == Result::Ok);
  REQUIRE(loop.arm_timer(long_timer, 20000) == Result::Ok);

  const pthread_t loop_thread = ::pthread_self();
  std::atomic<bool> in_run{false}, done{false};
  std::thread sender([&] {
    for (int i = 0; i < 10000 && !in_run.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    // Keep signalling until run_once returns: one that lands before poll()
    // only runs the handler; the next one interrupts poll().
    for (int i = 0; i < 2000 && !done.load(); ++i) {
      ::pthread_kill(loop_thread, SIGUSR1);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  in_run.store(true);
  const Result r = loop.run_once(20000);
  done.store(true);
  sender.join();

  // Interrupted: it returned without an error and long before the timer.
  CHECK(r == Result::Timeout);
  CHECK(g_signals >= 1);
  CHECK(long_fired == 0);
  CHECK(loop.is_armed(long_timer));

  // The loop keeps working.
  REQUIRE(loop.arm_timer(short_timer, 0) == Result::Ok);
  CHECK(run_until(loop, [&] { return short_fired > 0; }));
  CHECK(short_fired == 1);
  CHECK(long_fired == 0);
  REQUIRE(loop.post([] {}) == Result::Ok);
  CHECK(loop.run_once(0) == Result::Ok);

  REQUIRE(::sigaction(SIGUSR1, &old, nullptr) == 0);
}

TEST_CASE("loop: on_owner_thread is true on the thread that last dispatched the loop, and nowhere before") {
  Loop loop;
  // Built here but never run: nobody owns it yet.
  CHECK_FALSE(loop.on_owner_thread());
  bool there = true;
  std::thread other([&] { there = loop.on_owner_thread(); });
  other.join();
  CHECK_FALSE(there);
  // dispatch() claims the loop as run_once() does.
  std::thread embedder([&] {
    struct pollfd fds[LEMSG_MAX_WATCHES + 1];
    std::size_t n = 0;
    if (loop.fill_pollfds(fds, LEMSG_MAX_WATCHES + 1, n) != Result::Ok) return;
    Result r = loop.dispatch(fds, n);
    (void)r;
    there = loop.on_owner_thread();
  });
  embedder.join();
  CHECK(there);
  CHECK_FALSE(loop.on_owner_thread());
  // Another thread runs it once: that thread becomes the owner.
  bool ran_there = false;
  std::thread runner([&] {
    Result r = loop.run_once(0);
    (void)r;
    ran_there = loop.on_owner_thread();
  });
  runner.join();
  CHECK(ran_there);
  CHECK_FALSE(loop.on_owner_thread());
  CHECK(loop.run_once(0) == Result::Timeout);
  CHECK(loop.on_owner_thread());
}

TEST_CASE("loop: on_owner_thread can be asked from another thread while the loop runs") {
  // On the heap: clang's thread sanitizer skips some reads of stack objects.
  std::unique_ptr<Loop> owned(new Loop);
  Loop& loop = *owned;
  std::atomic<bool> started{false}, done{false};
  std::atomic<int> owner_there{0}, rounds{0};
  REQUIRE(loop.post([&started] { started.store(true); }) == Result::Ok);
  std::thread runner([&] {
    for (int i = 0; i < 20000 && !done.load(); ++i) {
      Result r = loop.run_once(0);
      (void)r;
      if (loop.on_owner_thread()) owner_there.store(1);
      rounds.fetch_add(1, std::memory_order_relaxed);
    }
  });
  for (int i = 0; i < 10000 && !started.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  // The loop runs on the other thread now: asked here, the answer is no,
  // every time, while that thread keeps running it.
  int here = 0;
  const int from = rounds.load(std::memory_order_relaxed);
  // (An acquire load each time, so the compiler cannot ask only once.)
  for (int i = 0; i < 100000 && rounds.load(std::memory_order_acquire) < from + 50; ++i)
    if (loop.on_owner_thread()) ++here;
  done.store(true);
  runner.join();
  CHECK(started.load());
  CHECK(here == 0);
  CHECK(owner_there.load() == 1);
}

// A loop adds a watch per session and a timer per Service or Session: over
// years that is more than a handle table's generations (in the tiny build,
// LEMSG_HANDLE_GENERATIONS is 7). The tables wrap instead of running out.
TEST_CASE("loop: watches and timers can be added and removed for ever: their handle generations wrap") {
  Loop loop;
  int failed = 0, stale = 0;
  lemsg::WatchId last_watch;
  lemsg::TimerId last_timer;
  for (int i = 0; i < 20000 && failed == 0; ++i) {
    lemsg::WatchId w;
    lemsg::TimerId t;
    if (loop.add_watch(0, 0, [](int, short) {}, w) != Result::Ok) ++failed;
    if (loop.add_timer([] {}, t) != Result::Ok) ++failed;
    if (last_watch && loop.remove_watch(last_watch) != Result::NotFound) ++stale;
    if (last_timer && loop.remove_timer(last_timer) != Result::NotFound) ++stale;
    if (loop.remove_watch(w) != Result::Ok || loop.remove_timer(t) != Result::Ok) ++failed;
    last_watch = w;
    last_timer = t;
  }
  CHECK(failed == 0);
  CHECK(stale == 0);
  CHECK(loop.watch_count() == 0);
  CHECK(loop.timer_count() == 0);
}

}  // TEST_SUITE
