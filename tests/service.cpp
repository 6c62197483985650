// Section 10 (service): Service, the server end of a session.
//
// advertise and hide, service names, the allow-list and the protocol
// agreement checked at each client's hello; per-session context and
// credentials, session_count and for_each_session, Service::send, respond and
// close; the server's tables (tracked maps, sessions, the process's
// services); and a Service destroyed inside each of its handlers, or before a
// request it received is let go. Clients are async Sessions on the same loop
// or forked children; the helpers are in messaging_util.hpp, the fault tests
// (kill -9, 64 clients, no heap) in faults.cpp.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"
#include "messaging_util.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

TEST_SUITE("service") {

using namespace msgtest;

// ---- advertise, hide, names -------------------------------------------------

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

// ---- sessions, context, credentials, send, respond, close -------------------

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

// ---- tables -----------------------------------------------------------------

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
// A service runs for years: each session takes a SessionRef and a watch on
// either side. More opens than the handle tables have generations (in the
// tiny build LEMSG_HANDLE_GENERATIONS is 7, so after a few dozen) must go on
// working: the generations wrap instead of retiring every slot.
TEST_CASE("messaging: a service opens and closes more sessions than its handle tables have generations") {
  testutil::RuntimeDir dir;
  Loop loop;
  SmallPool pool;
  Server srv(loop, pool);
  Client c(loop, pool);
  SessionRef last;
  int failed = 0, stale = 0;
  for (int round = 0; round < 300 && failed == 0; ++round) {
    if (!connect(loop, srv, c, "many-opens")) {
      ++failed;
      break;
    }
    if (last && srv.opened == last) ++stale;  // a new session never gets an old one's handle back
    if (last && srv.svc.context(last) != nullptr) ++stale;
    last = srv.opened;
    c.s.close();
    if (!testutil::run_until(loop, [&] { return srv.closes == round + 1; }, kWaitMs)) ++failed;
  }
  CHECK(failed == 0);
  CHECK(stale == 0);
  CHECK(srv.opens == 300);
  CHECK(srv.svc.session_count() == 0);
}

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

// The process-wide service table (LEMSG_MAX_SERVICES), exhausted. Each service
// has its own loop, so the watch and timer tables are not what runs out.
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

// ---- handlers that destroy their own service --------------------------------
//
// Doomed, open_doomed and send_note: see messaging_util.hpp.

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

}  // TEST_SUITE
