// Section 9 (channel): one connected socket, its outgoing queue, batched reads.
//
// What both ends get from their connected sockets: an outgoing queue that
// holds at most LEMSG_MAX_OUTGOING frames while the peer does not read (send
// returns Overflow, and nothing is lost), socket buffers raised so that frames
// at the protocol's maximum travel both ways, a frame the socket refuses
// completing its request with the reason (TooBigForSocket), and a protocol
// whose frames no socket here can carry refused at construction. The fault
// tests of the queue (a peer that never reads, LEMSG_MAX_DEFERRED, stalls)
// are in faults.cpp; the shared helpers in messaging_util.hpp.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"
#include "messaging_util.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

TEST_SUITE("channel") {

using namespace msgtest;

// ---- outgoing queue ---------------------------------------------------------

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

// ---- frames at the socket's limits ------------------------------------------

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

}  // TEST_SUITE
