// Section 13 (introspection): the info query and the monitor every Service
// answers by itself.
//
// The info figures against known activity (requests, responses, one-way
// messages both ways, requests held unanswered, the client's credentials,
// the pool, closes by reason); the query refused to another uid (a child
// that drops to uid 65534: only when the tests run as root) and granted to
// root or the service's own uid whatever the allow-list says; a monitor
// attached and detached while a client sends requests in a loop; the
// monitor limit; a monitor that does not read, dropped without the clients
// noticing. The Service runs on the test's loop; the blocking query runs on
// a thread of the test (the loop must run to answer it) or in a forked
// child; clients are forked children.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"
#include "messaging_util.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>

TEST_SUITE("introspect") {

using namespace msgtest;
using lemsg::Monitor;
using lemsg::MonitorRecord;
using lemsg::ServiceInfo;

namespace {

// Runs f() on a thread while the loop runs, so the Service on it can answer
// a blocking query. False when f() did not finish in time.
template <typename F>
bool while_serving(Loop& loop, F f) {
  std::atomic<bool> done{false};
  std::thread t([&] {
    f();
    done = true;
  });
  const bool ok = testutil::run_until(loop, [&] { return done.load(); }, kWaitMs);
  t.join();
  return ok;
}

// ServiceInfo is large with big capacities: one per test, not on the stack.
ServiceInfo g_info;

Result query(Loop& loop, const char* name, ServiceInfo& info) {
  Result r = Result::Timeout;
  CHECK(while_serving(loop, [&] { r = lemsg::query_info(name, info, kWaitMs); }));
  return r;
}

// Drops this (forked) process to uid and gid 65534. False when it cannot.
bool become_nobody() { return setresgid(65534, 65534, 65534) == 0 && setresuid(65534, 65534, 65534) == 0; }

}  // namespace

TEST_CASE("introspect: the info figures match what the service did") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("info") == Result::Ok);

  // Nothing done yet.
  ServiceInfo& info = g_info;
  REQUIRE(query(loop, "info", info) == Result::Ok);
  CHECK(std::strcmp(info.name, "info") == 0);
  CHECK(std::strcmp(info.protocol_id, kProto.id) == 0);
  CHECK(info.max_payload == kProto.max_payload);
  CHECK(info.mode == lemsg::ServiceMode::Direct);
  CHECK(info.server.pid == getpid());
  CHECK(info.session_count == 0);
  CHECK(info.pool_capacity == pool.capacity());
  CHECK(info.counters.requests == 0);
  CHECK(info.counters.opened == 0);
  // The query was no session.
  CHECK(srv.opens == 0);
  CHECK(srv.closes == 0);

  testutil::Pipe ready, quit;
  const pid_t child = testutil::spawn([&] {
    die_with_parent();
    ready.close_read();
    quit.close_write();
    // Before the Session: its destructor completes the held requests into them.
    Reply held[2];
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.open_sync("info", kWaitMs) == Result::Ok);
    for (std::uint32_t i = 0; i < 10; ++i) {
      Body b{0, 0};
      CHILD_CHECK(call(s, OpEcho, i, b) == Result::Ok);
      CHILD_CHECK(b.value == echo_of(i));
    }
    // Two requests the server holds, unanswered for now.
    CHILD_CHECK(ask(s, OpHold, 100, held[0]) == Result::Ok);
    CHILD_CHECK(ask(s, OpHold, 101, held[1]) == Result::Ok);
    for (std::uint32_t i = 0; i < 3; ++i) CHILD_CHECK(tell(s, i) == Result::Ok);
    CHILD_CHECK(ready.put('r'));
    // Stays open (and reads nothing) until told to go.
    CHILD_CHECK(quit.get(kWaitMs) == 'q');
    return 0;
  });
  REQUIRE(child > 0);
  ready.close_write();
  quit.close_read();
  REQUIRE(testutil::run_until(loop, [&] { return srv.nheld == 2 && srv.notes == 3; }, kWaitMs));
  REQUIRE(send_note(srv.svc, srv.opened, 7));
  const std::size_t high = pool.high_water();

  REQUIRE(query(loop, "info", info) == Result::Ok);
  REQUIRE(info.session_count == 1);
  const lemsg::SessionInfo& si = info.sessions[0];
  CHECK(si.session == srv.opened);
  CHECK(si.creds.pid == child);
  CHECK(si.creds.uid == getuid());
  CHECK(si.creds.gid == getgid());
  CHECK(si.pending == 2);
  CHECK(si.queued == 0);
  CHECK(info.counters.requests == 12);
  CHECK(info.counters.responses == 10);
  CHECK(info.counters.messages_in == 3);
  CHECK(info.counters.messages_out == 1);
  CHECK(info.counters.opened == 1);
  CHECK(info.counters.bad_frames == 0);
  CHECK(info.counters.closed_by_client == 0);
  // The two held requests are blocks in use; the high water saw at least them.
  CHECK(info.pool_in_use >= 2);
  CHECK(info.pool_high_water >= info.pool_in_use);
  CHECK(info.pool_high_water >= high);
  CHECK(info.pool_high_water <= pool.high_water());
  CHECK(info.pool_capacity == pool.capacity());

  // One answered, one let go unanswered (the library answers it).
  srv.reply(srv.held[0], 1);
  CHECK(srv.last_respond == Result::Ok);
  srv.held[1].release();
  srv.nheld = 0;
  REQUIRE(query(loop, "info", info) == Result::Ok);
  REQUIRE(info.session_count == 1);
  CHECK(info.sessions[0].pending == 0);
  CHECK(info.counters.responses == 12);

  // The client goes: one close, by the client.
  CHECK(quit.put('q'));
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  REQUIRE(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  REQUIRE(query(loop, "info", info) == Result::Ok);
  CHECK(info.session_count == 0);
  CHECK(info.counters.closed_by_client == 1);
  CHECK(info.counters.closed_here == 0);
  CHECK(info.counters.opened == 1);
}

TEST_CASE("introspect: root and the service's own uid are answered whatever the allow-list says") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  // Only uid 12345 may open sessions: not us.
  static const uid_t only[] = {12345};
  lemsg::ServiceOptions opt;
  opt.uids = only;
  opt.uid_count = 1;
  REQUIRE(srv.svc.advertise("listed", opt) == Result::Ok);

  ServiceInfo& info = g_info;
  CHECK(query(loop, "listed", info) == Result::Ok);
  CHECK(std::strcmp(info.name, "listed") == 0);

  // A session is still refused to us.
  Client c(loop, pool);
  REQUIRE(c.open("listed") == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return c.opens == 1; }, kWaitMs));
  CHECK(c.open_result == Result::NotPermitted);
  CHECK(srv.opens == 0);
  CHECK(query(loop, "listed", info) == Result::Ok);
  CHECK(info.counters.refused == 1);
  CHECK(info.counters.opened == 0);
}

TEST_CASE("introspect: the info query and the monitor are refused to another uid") {
  if (getuid() != 0) {
    MESSAGE("not root: cannot run a client under another uid; skipped");
    return;
  }
  testutil::RuntimeDir dir;
  REQUIRE(chmod(dir.path, 0755) == 0);  // uid 65534 must reach the socket
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  lemsg::ServiceOptions opt;
  opt.mode = 0666;
  REQUIRE(srv.svc.advertise("private", opt) == Result::Ok);

  const pid_t child = testutil::spawn([] {
    die_with_parent();
    CHILD_CHECK(become_nobody());
    CHILD_CHECK(getuid() == 65534);
    // It may open a session (so the socket is within its reach) ...
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.open_sync("private", kWaitMs) == Result::Ok);
    Body b{0, 0};
    CHILD_CHECK(call(s, OpEcho, 5, b) == Result::Ok);
    // ... but not look inside.
    static ServiceInfo info;
    CHILD_CHECK(lemsg::query_info("private", info, kWaitMs) == Result::NotPermitted);
    CHILD_CHECK(info.session_count == 0);
    Monitor mon;
    CHILD_CHECK(mon.attach("private", true, kWaitMs) == Result::NotPermitted);
    CHILD_CHECK(!mon.attached());
    // The session is unharmed.
    CHILD_CHECK(call(s, OpEcho, 6, b) == Result::Ok);
    CHILD_CHECK(b.value == echo_of(6));
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  ServiceInfo& info = g_info;
  REQUIRE(query(loop, "private", info) == Result::Ok);
  CHECK(info.counters.refused == 2);
  CHECK(info.counters.requests == 2);
  CHECK(info.counters.opened == 1);
}

TEST_CASE("introspect: a service run by another uid answers that uid and root") {
  if (getuid() != 0) {
    MESSAGE("not root: cannot run a service under another uid; skipped");
    return;
  }
  testutil::RuntimeDir dir;
  // The server must write the runtime dir, and no one else may: it is
  // 65534's. Root's own query then refuses that dir (another user's), so
  // it connects by hand and asks over the fd, as over one the service
  // directory hands out.
  REQUIRE(chmod(dir.path, 0755) == 0);
  REQUIRE(chown(dir.path, 65534, 65534) == 0);
  testutil::Pipe ready;
  const pid_t server = testutil::spawn([&] {
    die_with_parent();
    ready.close_read();
    CHILD_CHECK(become_nobody());
    Loop sl;
    SmallPool sp;
    Server s(sl, sp);
    lemsg::ServiceOptions opt;
    opt.mode = 0666;
    CHILD_CHECK(s.svc.advertise("theirs", opt) == Result::Ok);
    CHILD_CHECK(ready.put('r'));
    testutil::run_until(sl, [] { return false; }, kWaitMs);
    return 0;
  });
  REQUIRE(server > 0);
  ready.close_write();
  REQUIRE(ready.get(kWaitMs) == 'r');

  const pid_t nobody = testutil::spawn([] {
    die_with_parent();
    CHILD_CHECK(become_nobody());
    static ServiceInfo info;
    CHILD_CHECK(lemsg::query_info("theirs", info, kWaitMs) == Result::Ok);
    CHILD_CHECK(info.server.uid == 65534);
    return 0;
  });
  REQUIRE(nobody > 0);
  CHECK(testutil::wait_exit(nobody, kWaitMs) == 0);
  ServiceInfo& info = g_info;
  CHECK(lemsg::query_info("theirs", info, kWaitMs) == Result::UnsafeRuntimeDir);
  char path[256];
  dir.socket("theirs", path);
  const int fd = raw_connect(path);
  REQUIRE(fd >= 0);
  CHECK(lemsg::query_info_fd(fd, info, kWaitMs) == Result::Ok);
  close(fd);
  CHECK(info.server.pid == server);
  CHECK(info.server.uid == 65534);
  CHECK(std::strcmp(info.name, "theirs") == 0);
  testutil::kill9(server);
}

TEST_CASE("introspect: a monitor attached and detached under load sees every frame, and the service serves on") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("watched") == Result::Ok);

  // A client sending requests in a loop until told to stop.
  testutil::Pipe stop, going;
  const pid_t client = testutil::spawn([&] {
    die_with_parent();
    stop.close_write();
    going.close_read();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.open_sync("watched", kWaitMs) == Result::Ok);
    CHILD_CHECK(going.put('g'));
    std::uint32_t n = 0;
    for (;;) {
      struct pollfd p = {stop.fd[0], POLLIN, 0};
      if (poll(&p, 1, 0) == 1) break;
      Body b{0, 0};
      CHILD_CHECK(call(s, OpEcho, n, b) == Result::Ok);
      CHILD_CHECK(b.value == echo_of(n));
      ++n;
      if (n % 16 == 0) CHILD_CHECK(tell(s, n) == Result::Ok);
      usleep(50);  // a steady load, not a flood: the monitor reads one record at a time
    }
    CHILD_CHECK(n > 0);
    return 0;
  });
  REQUIRE(client > 0);
  stop.close_read();
  going.close_write();
  REQUIRE(testutil::run_until(loop, [&] { return srv.opens == 1; }, kWaitMs));

  // A monitor in another process attaches three times, each time reading
  // records, checking them and detaching, while the client goes on. A
  // monitor that falls too far behind is dropped (the rule that keeps the
  // service from waiting for it): on a loaded machine that may happen, and
  // the monitor then attaches again. Three full rounds must succeed.
  testutil::Pipe drops;
  const pid_t watcher = testutil::spawn([&] {
    die_with_parent();
    drops.close_read();
    int rounds = 0;
    for (int attempt = 0; rounds < 3 && attempt < 30; ++attempt) {
      Monitor mon;
      const bool payload = rounds != 1;
      // The service frees a detached monitor's place when it sees the hang-up.
      CHILD_CHECK(mon.attach("watched", payload, kWaitMs) == Result::Ok);
      CHILD_CHECK(mon.fd() >= 0);
      std::uint32_t txns[64];
      std::uint32_t seen_in = 0, matched = 0;
      std::uint64_t last = 0;
      std::uint32_t session = 0;
      bool dropped = false;
      for (int i = 0; i < 200; ++i) {
        MonitorRecord rec;
        const Result r = mon.next(rec, kWaitMs);
        if (r == Result::Closed) {
          dropped = true;
          break;
        }
        CHILD_CHECK(r == Result::Ok);
        CHILD_CHECK(rec.time_ns >= last);
        last = rec.time_ns;
        CHILD_CHECK(rec.session);
        if (!session) session = rec.session.value;
        CHILD_CHECK(rec.session.value == session);
        CHILD_CHECK(!rec.has_fd);
        CHILD_CHECK(!rec.error);
        CHILD_CHECK(rec.size == sizeof(Body));
        CHILD_CHECK(rec.payload_size == (payload ? sizeof(Body) : 0u));
        Body b{0, 0};
        if (payload) std::memcpy(&b, rec.payload, sizeof b);
        if (rec.direction == lemsg::Direction::In && rec.type == lemsg::wire::FrameType::Request) {
          CHILD_CHECK(rec.txn != 0);
          if (payload) CHILD_CHECK(b.op == OpEcho);
          txns[seen_in++ % 64] = rec.txn;
        } else if (rec.direction == lemsg::Direction::In) {
          CHILD_CHECK(rec.type == lemsg::wire::FrameType::Message);
          CHILD_CHECK(rec.txn == 0);
          if (payload) CHILD_CHECK(b.op == OpNote);
        } else {
          // The answer to the request seen just before (unless the monitor
          // attached between the two).
          CHILD_CHECK(rec.direction == lemsg::Direction::Out);
          CHILD_CHECK(rec.type == lemsg::wire::FrameType::Response);
          CHILD_CHECK(rec.txn != 0);
          if (payload) CHILD_CHECK(b.op == OpEcho && b.value % 3 == 1);  // echo_of(v) = 3v + 1
          if (seen_in && txns[(seen_in - 1) % 64] == rec.txn) ++matched;
          else CHILD_CHECK(seen_in == 0);
        }
      }
      if (dropped) {
        CHILD_CHECK(!mon.attached());
        CHILD_CHECK(drops.put('d'));
        continue;
      }
      CHILD_CHECK(matched >= 90);
      mon.detach();
      CHILD_CHECK(!mon.attached());
      MonitorRecord rec;
      CHILD_CHECK(mon.next(rec, 0) == Result::NotFound);
      ++rounds;
    }
    CHILD_CHECK(rounds == 3);
    return 0;
  });
  REQUIRE(watcher > 0);
  CHECK(run_until_exit(loop, watcher, kWaitMs) == 0);

  // Every monitor is gone; the client still runs, with no error.
  ServiceInfo& info = g_info;
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) gone = query(loop, "watched", info) == Result::Ok && info.monitors == 0;
  CHECK(gone);
  // Drops the monitor saw, if any, are counted (one more may have come after
  // a round's last record, before its detach).
  drops.close_write();
  int seen_drops = 0;
  while (drops.get(0) == 'd') ++seen_drops;
  if (seen_drops || info.counters.monitors_dropped) MESSAGE("the monitor fell behind and was dropped " << info.counters.monitors_dropped << " time(s)");
  CHECK(info.counters.monitors_dropped >= static_cast<std::uint64_t>(seen_drops));
  CHECK(info.session_count == 1);
  const std::uint64_t before = info.counters.requests;
  REQUIRE(testutil::run_until(loop, [&] { return static_cast<std::uint64_t>(srv.received) > before + 10; }, kWaitMs));
  CHECK(stop.put('s'));
  CHECK(run_until_exit(loop, client, kWaitMs) == 0);
  CHECK(srv.last_respond == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  CHECK(srv.reason == Result::Closed);
}

TEST_CASE("introspect: at most LEMSG_MAX_MONITORS monitors; one more is Busy until one detaches") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("crowded") == Result::Ok);
  const pid_t child = testutil::spawn([] {
    die_with_parent();
    Monitor mons[LEMSG_MAX_MONITORS];
    for (Monitor& m : mons) CHILD_CHECK(m.attach("crowded", false, kWaitMs) == Result::Ok);
    CHILD_CHECK(mons[0].attach("crowded", false, kWaitMs) == Result::Busy);  // this one is attached already
    Monitor extra;
    CHILD_CHECK(extra.attach("crowded", false, kWaitMs) == Result::Busy);
    CHILD_CHECK(!extra.attached());
    // The service sees a detached monitor's place free at once.
    mons[0].detach();
    CHILD_CHECK(extra.attach("crowded", false, kWaitMs) == Result::Ok);
    return 0;
  });
  REQUIRE(child > 0);
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  ServiceInfo& info = g_info;
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) gone = query(loop, "crowded", info) == Result::Ok && info.monitors == 0;
  CHECK(gone);
  CHECK(info.counters.refused == 1);
  CHECK(info.session_count == 0);
  CHECK(srv.opens == 0);
}

TEST_CASE("introspect: a monitor that does not read is dropped; the clients see nothing of it") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("sleepy") == Result::Ok);

  testutil::Pipe attached, go_on;
  const pid_t watcher = testutil::spawn([&] {
    die_with_parent();
    attached.close_read();
    go_on.close_write();
    Monitor mon;
    CHILD_CHECK(mon.attach("sleepy", true, kWaitMs) == Result::Ok);
    CHILD_CHECK(attached.put('a'));
    // Reads nothing until the clients are done.
    CHILD_CHECK(go_on.get(kWaitMs) == 'g');
    // What was sent before the drop is still there, then the end.
    MonitorRecord rec;
    int n = 0;
    Result r = Result::Ok;
    while ((r = mon.next(rec, kWaitMs)) == Result::Ok) ++n;
    CHILD_CHECK(r == Result::Closed);
    CHILD_CHECK(n > 0);
    CHILD_CHECK(!mon.attached());
    return 0;
  });
  REQUIRE(watcher > 0);
  attached.close_write();
  go_on.close_read();
  REQUIRE(testutil::run_until(loop, [&] { return attached.get(0) == 'a'; }, kWaitMs));

  // Enough requests to fill the monitor's socket many times over.
  const pid_t client = testutil::spawn([] {
    die_with_parent();
    Loop cl;
    SmallPool cp;
    Session s(cl, kProto, cp);
    CHILD_CHECK(s.open_sync("sleepy", kWaitMs) == Result::Ok);
    for (std::uint32_t i = 0; i < 3000; ++i) {
      Body b{0, 0};
      CHILD_CHECK(call(s, OpEcho, i, b) == Result::Ok);
      CHILD_CHECK(b.value == echo_of(i));
    }
    return 0;
  });
  REQUIRE(client > 0);
  CHECK(run_until_exit(loop, client, kWaitMs) == 0);
  CHECK(srv.last_respond == Result::Ok);

  ServiceInfo& info = g_info;
  REQUIRE(query(loop, "sleepy", info) == Result::Ok);
  CHECK(info.monitors == 0);
  CHECK(info.counters.monitors_dropped == 1);
  CHECK(info.counters.requests == 3000);
  CHECK(info.counters.responses == 3000);
  CHECK(go_on.put('g'));
  CHECK(run_until_exit(loop, watcher, kWaitMs) == 0);
}

TEST_CASE("introspect: malformed introspection answers are refused by the client") {
  // A fake service on a socketpair answers the info query with records that
  // break one rule each; the client must refuse every one.
  static unsigned char good[lemsg::wire::header_size + lemsg::wire::info_max_size];
  unsigned char* rec = good + lemsg::wire::header_size;
  std::memset(good, 0, sizeof good);
  const char* id = "x.v1";
  auto put = [](unsigned char* at, std::uint32_t v) { std::memcpy(at, &v, 4); };
  put(rec, 1);
  put(rec + 8, 64);
  put(rec + 20, 8);
  put(rec + 24, 3);
  put(rec + 28, 4);
  put(rec + 32, 1);
  std::memcpy(rec + lemsg::wire::info_fixed_size, "abc", 3);
  std::memcpy(rec + lemsg::wire::info_fixed_size + 3, id, 4);
  unsigned char* s0 = rec + lemsg::wire::info_fixed_size + 7;
  put(s0, 0x101);
  put(s0 + 4, 42);
  put(s0 + 16, 1);
  const std::uint32_t len = static_cast<std::uint32_t>(lemsg::wire::info_fixed_size + 7 + 24);

  struct Case {
    const char* what;
    std::size_t at;      // byte offset in the record to overwrite (SIZE_MAX: none)
    std::uint32_t value;
    int extra;           // bytes added to or taken from the length
    Result want;
  };
  const Case cases[] = {
      {"well formed", SIZE_MAX, 0, 0, Result::Ok},
      {"version", 0, 2, 0, Result::BadFrame},
      {"mode", 4, 2, 0, Result::BadFrame},
      {"in use above high water", 12, 1, 0, Result::BadFrame},
      {"high water above capacity", 16, 9, 0, Result::BadFrame},
      {"name too long", 24, LEMSG_MAX_NAME + 1, 0, Result::BadFrame},
      {"id length 0", 28, 0, 0, Result::BadFrame},
      {"id too long", 28, LEMSG_MAX_PROTOCOL_ID + 1, 0, Result::BadFrame},
      {"too many sessions", 32, LEMSG_MAX_SESSIONS + 1, 0, Result::BadFrame},
      {"session count beyond the bytes", 32, 2, 0, Result::BadFrame},
      {"a byte short", SIZE_MAX, 0, -1, Result::BadFrame},
      {"a byte more", SIZE_MAX, 0, 1, Result::BadFrame},
      {"bad name byte", lemsg::wire::info_fixed_size, '/', 0, Result::BadFrame},
      {"session ref 0", lemsg::wire::info_fixed_size + 7, 0, 0, Result::BadFrame},
      {"huge length", 28, 0xFFFFFFFFu, 0, Result::BadFrame},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    static unsigned char frame[sizeof good];
    std::memcpy(frame, good, sizeof frame);
    unsigned char* r = frame + lemsg::wire::header_size;
    if (c.at != SIZE_MAX) {
      if (c.value < 256 && (c.at == lemsg::wire::info_fixed_size)) r[c.at] = static_cast<unsigned char>(c.value);
      else put(r + c.at, c.value);
    }
    const std::uint32_t n = static_cast<std::uint32_t>(static_cast<int>(len) + c.extra);
    lemsg::wire::encode(lemsg::wire::Header{lemsg::wire::FrameType::Message, 0, 0, n}, frame);
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
    REQUIRE(send(sv[1], frame, lemsg::wire::header_size + n, MSG_NOSIGNAL) == static_cast<ssize_t>(lemsg::wire::header_size + n));
    ServiceInfo& info = g_info;
    CHECK(lemsg::query_info_fd(sv[0], info, kWaitMs) == c.want);
    if (c.want == Result::Ok) {
      CHECK(std::strcmp(info.name, "abc") == 0);
      CHECK(std::strcmp(info.protocol_id, id) == 0);
      CHECK(info.session_count == 1);
      CHECK(info.sessions[0].creds.pid == 42);
      CHECK(info.sessions[0].pending == 1);
    } else {
      CHECK(info.session_count == 0);
    }
    close(sv[0]);
    close(sv[1]);
  }
  // No answer at all: Timeout; an fd with the answer: BadFrame.
  int sv[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
  CHECK(lemsg::query_info_fd(sv[0], g_info, 50) == Result::Timeout);
  close(sv[1]);
  CHECK(lemsg::query_info_fd(sv[0], g_info, kWaitMs) == Result::Closed);
  close(sv[0]);
}

TEST_CASE("introspect: malformed monitor records detach the monitor") {
  struct Case {
    const char* what;
    std::size_t at;
    unsigned char value;
    Result want;
  };
  const Case cases[] = {
      {"well formed", SIZE_MAX, 0, Result::Ok},
      {"direction", 12, 2, Result::BadFrame},
      {"type Hello", 13, 1, Result::BadFrame},
      {"unknown flag", 14, 4, Result::BadFrame},
      {"reserved", 15, 1, Result::BadFrame},
      {"session 0", 8, 0, Result::BadFrame},
      {"txn on a Message", 16, 9, Result::BadFrame},
      {"payload count above the size", 24, 9, Result::BadFrame},
      {"payload count beyond the bytes", 24, 3, Result::BadFrame},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    unsigned char frame[lemsg::wire::header_size + lemsg::wire::record_fixed_size + 2] = {};
    unsigned char* r = frame + lemsg::wire::header_size;
    // The u32 fields in host byte order, as section 5 documents.
    auto put = [](unsigned char* at, std::uint32_t v) { std::memcpy(at, &v, 4); };
    put(r + 8, 5);                                                 // session
    r[13] = static_cast<unsigned char>(lemsg::wire::FrameType::Message);
    put(r + 20, 8);                                                // size
    put(r + 24, 2);                                                // payload bytes
    r[28] = 'h';
    r[29] = 'i';
    if (c.at != SIZE_MAX) {
      if (c.at >= 12 && c.at < 16) r[c.at] = c.value;  // the u8 fields
      else put(r + c.at, c.value);
    }
    const std::uint32_t n = lemsg::wire::record_fixed_size + 2;
    lemsg::wire::encode(lemsg::wire::Header{lemsg::wire::FrameType::Message, 0, 0, n}, frame);
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
    unsigned char welcome[lemsg::wire::header_size];
    lemsg::wire::encode(lemsg::wire::Header{lemsg::wire::FrameType::Welcome, 0, 0, 0}, welcome);
    REQUIRE(send(sv[1], welcome, sizeof welcome, MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof welcome));
    REQUIRE(send(sv[1], frame, sizeof frame, MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof frame));
    Monitor mon;
    REQUIRE(mon.attach_fd(sv[0], true, kWaitMs) == Result::Ok);
    MonitorRecord rec;
    CHECK(mon.next(rec, kWaitMs) == c.want);
    CHECK(mon.attached() == (c.want == Result::Ok));
    if (c.want == Result::Ok) {
      CHECK(rec.session.value == 5);
      CHECK(rec.size == 8);
      CHECK(rec.payload_size == 2);
      CHECK(rec.payload[0] == 'h');
      CHECK(rec.direction == lemsg::Direction::In);
      CHECK(mon.next(rec, 20) == Result::Timeout);
    }
    close(sv[1]);
  }
}

}  // TEST_SUITE
