// Section 11 (session): Session, the client end of a session.
//
// open before the server exists, close, reopen and set_reconnect; requests
// and how each completes exactly once (Unanswered, Closed, PendingTableFull,
// transaction ids that wrap); a Session destroyed or closed inside each of
// its handlers, and open() that never calls back before it returns; the
// assertion that stops a Loop destroyed before its Services and Sessions;
// what the library logs at debug level; and synchronous calls across
// threads, where WouldDeadlock is about the thread that runs the loop (cases
// with "thread" in their names, for the TSan build). The helpers are in
// messaging_util.hpp, the fault tests (kill -9, timeouts, 64 clients) in
// faults.cpp.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"
#include "messaging_util.hpp"

#include <grp.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>

TEST_SUITE("session") {

using namespace msgtest;

// ---- open, close, reopen, reconnect -----------------------------------------

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
#if LEMSG_TXN_BITS >= 10
  constexpr int kRequests = 3000;
#else
  constexpr int kRequests = (1 << LEMSG_TXN_BITS) * 3;  // (clang 16 flags 1 << 32 even when not taken)
#endif
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

// ---- handlers that destroy or close their own session -----------------------
//
// Doomed, open_doomed and send_note: see messaging_util.hpp.

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

// ---- diagnostics ------------------------------------------------------------

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

// ---- threads ----------------------------------------------------------------

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
