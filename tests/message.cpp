// Section 8 (message): Protocol, Message, MessagePool.
//
// A protocol's rules, which Service and Session check alike (an id of
// 1..LEMSG_MAX_PROTOCOL_ID bytes, a largest payload the pool can hold, and no
// message above that payload on either end); Message handles, their
// references to one pool block, their sizes and the fd a message owns and
// carries across; that only a message's used bytes travel; and the assertion
// that stops a MessagePool destroyed while it is in use. The helpers shared
// with the other messaging sections are in messaging_util.hpp.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"
#include "messaging_util.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

TEST_SUITE("message") {

using namespace msgtest;

// ---- Protocol ---------------------------------------------------------------

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

// ---- Message ----------------------------------------------------------------

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

// ---- destruction order ------------------------------------------------------

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

}  // TEST_SUITE
