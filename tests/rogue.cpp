// Rogue peers (issue fault test 3): a process that connects to a service
// socket and sends garbage - short frames, wrong lengths, unknown types,
// responses from a client, oversized frames, unexpected fds - has only its
// own session closed and logged. The other clients go on being served and
// nothing leaks: not an fd, not a pool block, not a session slot.
//
// The server runs in this process, driven with run_until, so its log, close
// handler, fd count and pool are all visible. One well-behaved client runs
// in a forked child (forked before any session exists, so it holds no copy
// of a server-side socket), doing request_sync in a loop and writing a byte
// to a pipe after each correct answer. Rogues are raw sockets of this
// process that send hand-made bytes with sendmsg.
//
// The client side gets the mirror test: a fake server (a raw socket in a
// child) that says Welcome and then sends garbage. A response to a
// transaction that is not pending is discarded by design (a request that
// timed out may be answered late), so that one must not close the session.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"

#include <fcntl.h>
#include <poll.h>
#include <grp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

TEST_SUITE("transport") {

using lemsg::Loop;
using lemsg::Message;
using lemsg::Result;
using lemsg::SessionRef;
namespace wire = lemsg::wire;
using wire::FrameType;

namespace {

const lemsg::Protocol kProto{"test.rogue.v1", 64};
// The pools' blocks are larger than the protocol's payload, so a frame can
// be above the protocol maximum yet fit a block, or above both.
constexpr std::uint32_t kBlock = 128;
constexpr std::uint32_t kAboveBlock = 300;
const char* const kName = "rogue-target";
// Sessions the server here can hold: its loop watches the listening socket
// and one socket per session, so a small watch table may be the limit.
constexpr int kTable = LEMSG_MAX_SESSIONS < LEMSG_MAX_WATCHES - 1 ? LEMSG_MAX_SESSIONS : LEMSG_MAX_WATCHES - 1;

// -- frames by hand --

struct Raw {
  unsigned char b[wire::header_size + kAboveBlock + 16] = {};
  std::size_t len = 0;
};

std::uint8_t t(FrameType type) { return static_cast<std::uint8_t>(type); }

// A header with the given fields and `payload` bytes of filler after it.
void frame(Raw& r, std::uint8_t type, std::uint8_t flags, std::uint32_t txn, std::uint32_t length,
           std::size_t payload, std::uint8_t magic = wire::magic, std::uint8_t version = wire::version,
           std::uint32_t reserved = 0) {
  r.b[0] = magic;
  r.b[1] = version;
  r.b[2] = type;
  r.b[3] = flags;
  std::memcpy(r.b + 4, &txn, 4);
  std::memcpy(r.b + 8, &length, 4);
  std::memcpy(r.b + 12, &reserved, 4);
  std::memset(r.b + wire::header_size, 'p', payload);
  r.len = wire::header_size + payload;
}

// A Hello for `id` and `max`; `idlen_delta` makes the id length field lie.
void hello(Raw& r, const char* id, std::uint32_t max, std::uint8_t flags = 0, std::uint32_t idlen_delta = 0) {
  const std::uint32_t idlen = static_cast<std::uint32_t>(std::strlen(id));
  frame(r, t(FrameType::Hello), flags, 0, 8 + idlen, 8 + idlen);
  const std::uint32_t field = idlen + idlen_delta;
  std::memcpy(r.b + wire::header_size, &max, 4);
  std::memcpy(r.b + wire::header_size + 4, &field, 4);
  std::memcpy(r.b + wire::header_size + 8, id, idlen);
}

// What rides with a frame.
enum class Fds { None, Pipe, Dir, Two, Five };

bool send_raw(int sock, const Raw& r, Fds kind) {
  int fds[5] = {-1, -1, -1, -1, -1};
  std::size_t n = 0;
  switch (kind) {
    case Fds::None: break;
    case Fds::Pipe: {
      int p[2];
      if (::pipe2(p, O_CLOEXEC) != 0) return false;
      ::close(p[0]);
      fds[n++] = p[1];
      break;
    }
    case Fds::Dir: fds[n++] = ::open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC); break;
    case Fds::Two: {
      int p[2];
      if (::pipe2(p, O_CLOEXEC) != 0) return false;
      fds[n++] = p[0];
      fds[n++] = p[1];
      break;
    }
    case Fds::Five:
      for (int i = 0; i < 5; ++i) fds[n++] = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
      break;
  }
  bool ok = true;
  for (std::size_t i = 0; i < n; ++i) ok = ok && fds[i] >= 0;
  if (ok) ok = testutil::send_fds(sock, r.b, r.len, fds, n);
  // Our copies go at once: whatever the peer received is its to close.
  for (std::size_t i = 0; i < n; ++i)
    if (fds[i] >= 0) ::close(fds[i]);
  return ok;
}

int connect_raw(const char* path) {
  const int s = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s < 0) return -1;
  sockaddr_un sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  const std::size_t n = std::strlen(path);
  if (n >= sizeof sa.sun_path) {
    ::close(s);
    return -1;
  }
  std::memcpy(sa.sun_path, path, n + 1);
  if (::connect(s, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    ::close(s);
    return -1;
  }
  return s;
}

// The far end of a raw socket as this side sees it.
struct Peer {
  int fd = -1;
  int frames = 0;      // frames received
  bool welcome = false;
  bool refuse = false;
  std::int32_t refuse_code = 0;
  bool hung_up = false;
  bool reset = false;
  ~Peer() {
    if (fd >= 0) ::close(fd);
  }
  // Reads what is there; true once the other side has closed.
  bool poll_closed() {
    if (hung_up) return true;
    for (;;) {
      unsigned char buf[512];
      const ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) {
        ++frames;
        if (n >= static_cast<ssize_t>(wire::header_size) && buf[0] == wire::magic) {
          if (buf[2] == t(FrameType::Welcome)) welcome = true;
          if (buf[2] == t(FrameType::Refuse) && n >= static_cast<ssize_t>(wire::header_size + 4)) {
            refuse = true;
            std::memcpy(&refuse_code, buf + wire::header_size, 4);
          }
        }
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return false;
      if (n < 0 && errno == EINTR) continue;
      // A server that closed with our frames unread leaves ECONNRESET, before
      // what it sent first (a Refuse): read on once.
      if (n < 0 && errno == ECONNRESET && !reset) {
        reset = true;
        continue;
      }
      hung_up = true;  // 0: the orderly end; an error: reset
      return true;
    }
  }
};

// -- the server under attack, in this process --

struct CloseRecord {
  std::uint32_t ref;
  Result reason;
};

struct Server {
  Loop loop;
  lemsg::MessagePool<kBlock, 8> pool;
  lemsg::Service svc{loop, kProto, pool};
  int opens = 0;
  SessionRef last_open;
  CloseRecord closes[256] = {};
  int close_count = 0;

  Server() {
    svc.set_open_handler([this](SessionRef s) {
      ++opens;
      last_open = s;
    });
    svc.set_close_handler([this](SessionRef s, Result why) {
      if (close_count < 256) closes[close_count] = CloseRecord{s.value, why};
      ++close_count;
    });
    // Answers a request with each payload byte plus one.
    svc.set_receive_handler([this](Message& m) {
      if (!m.needs_response()) return;
      unsigned char* p = static_cast<unsigned char*>(m.payload());
      for (std::uint32_t i = 0; i < m.size(); ++i) p[i] = static_cast<unsigned char>(p[i] + 1);
      Result r = svc.respond(std::move(m));
      (void)r;
    });
  }
};

// The well-behaved client (in a child). Exit codes: 0 fine, 10 no open,
// 11 setup, 12 request failed, 13 wrong answer.
int good_client(int stop_fd, int progress_fd) {
  ::fcntl(progress_fd, F_SETFL, O_NONBLOCK);
  Loop loop;
  lemsg::MessagePool<64, 4> pool;
  lemsg::Session s(loop, kProto, pool);
  auto report = [progress_fd](char c) {
    const ssize_t w = ::write(progress_fd, &c, 1);
    (void)w;  // a full pipe only drops progress marks
  };
  if (s.open_sync(kName, 30000) != Result::Ok) {
    report('F');
    return 10;
  }
  for (unsigned i = 0;; ++i) {
    struct pollfd p = {stop_fd, POLLIN, 0};
    if (::poll(&p, 1, 0) != 0) return 0;
    char text[24];
    const int n = std::snprintf(text, sizeof text, "ping %u", i);
    Message req, resp;
    if (s.create_message(req) != Result::Ok || req.assign(text, static_cast<std::uint32_t>(n)) != Result::Ok) {
      report('F');
      return 11;
    }
    if (s.request_sync(std::move(req), resp, 30000) != Result::Ok) {
      report('F');
      return 12;
    }
    bool right = resp.size() == static_cast<std::uint32_t>(n);
    const unsigned char* got = static_cast<const unsigned char*>(resp.payload());
    for (int k = 0; right && k < n; ++k) right = got[k] == static_cast<unsigned char>(text[k] + 1);
    if (!right) {
      report('F');
      return 13;
    }
    report('k');
    usleep(1000);
  }
}

struct Bench {
  testutil::TidyRuntimeDir dir;
  testutil::LogCapture log;
  Server server;
  testutil::Pipe stop, progress;
  pid_t good = -1;
  char path[256] = {};
  int base_fds = 0;
  bool failed = false;  // the good client reported a failure
  // False under qemu-user, which keeps fds cut off by MSG_CTRUNC open in
  // the process (see testutil::truncated_fds_are_dropped).
  bool dropped = true;

  ~Bench() {
    if (good > 0) testutil::kill9(good);
  }

  bool start() {
    dir.socket(kName, path);
    dropped = testutil::truncated_fds_are_dropped();
    if (server.svc.status() != Result::Ok) return false;
    good = testutil::spawn([this] {
      stop.close_write();
      progress.close_read();
      return good_client(stop.fd[0], progress.fd[1]);
    });
    stop.close_read();
    progress.close_write();
    ::fcntl(progress.fd[0], F_SETFL, O_NONBLOCK);
    if (server.svc.advertise(kName) != Result::Ok) return false;
    if (!testutil::run_until(server.loop, [this] { return server.opens == 1; }, 30000)) return false;
    if (!served()) return false;
    base_fds = testutil::count_open_fds();
    return true;
  }

  // Reads progress marks; returns how many successes were read.
  int read_progress() {
    int k = 0;
    char buf[256];
    ssize_t n;
    while ((n = ::read(progress.fd[0], buf, sizeof buf)) > 0) {
      for (ssize_t i = 0; i < n; ++i) {
        if (buf[i] == 'k') ++k;
        else failed = true;
      }
    }
    return k;
  }

  // True when the good client gets two more correct answers from now on.
  bool served() {
    read_progress();
    int k = 0;
    testutil::run_until(
        server.loop,
        [this, &k] {
          k += read_progress();
          return k >= 2 || failed;
        },
        30000);
    return k >= 2 && !failed;
  }

  // Stops the good client (running the loop while it finishes its request)
  // and returns its exit code.
  int finish() {
    if (good <= 0) return -3;
    stop.put('q');
    int status = -1;
    const bool exited = testutil::run_until(
        server.loop,
        [this, &status] {
          int st = 0;
          if (::waitpid(good, &st, WNOHANG) != good) return false;
          status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
          return true;
        },
        30000);
    if (!exited) testutil::kill9(good);
    good = -1;
    return status;
  }

  // Connects a rogue and, when asked, has it complete a proper Hello first.
  // Returns the server-side session of a hello'd rogue in `ref`.
  bool connect_rogue(Peer& p, bool with_hello, std::uint32_t& ref) {
    ref = 0;
    p.fd = connect_raw(path);
    if (p.fd < 0) return false;
    if (!with_hello) return true;
    Raw h;
    hello(h, kProto.id, kProto.max_payload);
    const int opens = server.opens;
    if (!send_raw(p.fd, h, Fds::None)) return false;
    if (!testutil::run_until(
            server.loop,
            [&] {
              p.poll_closed();
              return p.welcome && server.opens == opens + 1;
            },
            30000))
      return false;
    ref = server.last_open.value;
    return true;
  }
};

// One kind of garbage.
struct Garbage {
  const char* what;
  void (*build)(Raw&);
  Fds fds;
  Result reason;  // the close handler's reason, for a rogue past its Hello
  bool after_hello_only;
  bool before_hello_only;
};

const Garbage kGarbage[] = {
    {"an empty datagram", [](Raw& r) { r.len = 0; }, Fds::None, Result::BadFrame, false, false},
    {"a one-byte frame",
     [](Raw& r) {
       r.b[0] = wire::magic;
       r.len = 1;
     },
     Fds::None, Result::BadFrame, false, false},
    {"a frame one byte short of a header",
     [](Raw& r) {
       frame(r, t(FrameType::Message), 0, 0, 0, 0);
       r.len = wire::header_size - 1;
     },
     Fds::None, Result::BadFrame, false, false},
    {"a bad magic", [](Raw& r) { frame(r, t(FrameType::Message), 0, 0, 4, 4, 0x5E); }, Fds::None, Result::BadFrame,
     false, false},
    {"a bad version", [](Raw& r) { frame(r, t(FrameType::Message), 0, 0, 4, 4, wire::magic, 9); }, Fds::None,
     Result::BadFrame, false, false},
    {"type 0", [](Raw& r) { frame(r, 0, 0, 0, 4, 4); }, Fds::None, Result::BadFrame, false, false},
    {"type 7", [](Raw& r) { frame(r, 7, 0, 0, 4, 4); }, Fds::None, Result::BadFrame, false, false},
    {"type 255", [](Raw& r) { frame(r, 255, 0, 1, 4, 4); }, Fds::None, Result::BadFrame, false, false},
    {"an unknown flag bit", [](Raw& r) { frame(r, t(FrameType::Message), 0x04, 0, 4, 4); }, Fds::None,
     Result::BadFrame, false, false},
    {"non-zero reserved bytes",
     [](Raw& r) { frame(r, t(FrameType::Message), 0, 0, 4, 4, wire::magic, wire::version, 1); }, Fds::None,
     Result::BadFrame, false, false},
    {"a length field above what arrived", [](Raw& r) { frame(r, t(FrameType::Message), 0, 0, 40, 10); },
     Fds::None, Result::BadFrame, false, false},
    {"a length field of 0xFFFFFFFF", [](Raw& r) { frame(r, t(FrameType::Request), 0, 1, 0xFFFFFFFFu, 10); },
     Fds::None, Result::BadFrame, false, false},
    {"a length field that wraps 32-bit sums",
     [](Raw& r) { frame(r, t(FrameType::Message), 0, 0, 0xFFFFFFF0u, 0); }, Fds::None, Result::BadFrame, false,
     false},
    {"a length field below what arrived", [](Raw& r) { frame(r, t(FrameType::Message), 0, 0, 2, 10); },
     Fds::None, Result::BadFrame, false, false},
    {"a Response from a client", [](Raw& r) { frame(r, t(FrameType::Response), 0, 1, 4, 4); }, Fds::None,
     Result::BadFrame, false, false},
    {"an error Response from a client",
     [](Raw& r) {
       frame(r, t(FrameType::Response), wire::FlagError, 1, 4, 4);
       const std::int32_t code = static_cast<std::int32_t>(Result::Closed);
       std::memcpy(r.b + wire::header_size, &code, 4);
     },
     Fds::None, Result::BadFrame, false, false},
    {"a Request with txn 0", [](Raw& r) { frame(r, t(FrameType::Request), 0, 0, 4, 4); }, Fds::None,
     Result::BadFrame, false, false},
    {"a Message with a txn", [](Raw& r) { frame(r, t(FrameType::Message), 0, 5, 4, 4); }, Fds::None,
     Result::BadFrame, false, false},
    {"a Welcome from a client", [](Raw& r) { frame(r, t(FrameType::Welcome), 0, 0, 0, 0); }, Fds::None,
     Result::BadFrame, false, false},
    {"a Refuse from a client",
     [](Raw& r) {
       frame(r, t(FrameType::Refuse), wire::FlagError, 0, 4, 4);
       const std::int32_t code = static_cast<std::int32_t>(Result::NotPermitted);
       std::memcpy(r.b + wire::header_size, &code, 4);
     },
     Fds::None, Result::BadFrame, false, false},
    {"a second Hello", [](Raw& r) { hello(r, kProto.id, kProto.max_payload); }, Fds::None, Result::BadFrame, true,
     false},
    {"a Message above the protocol maximum",
     [](Raw& r) { frame(r, t(FrameType::Message), 0, 0, kProto.max_payload + 1, kProto.max_payload + 1); },
     Fds::None, Result::TooLarge, false, false},
    {"a Request above the protocol maximum", [](Raw& r) { frame(r, t(FrameType::Request), 0, 3, 100, 100); },
     Fds::None, Result::TooLarge, false, false},
    {"a Request above the pool's block",
     [](Raw& r) { frame(r, t(FrameType::Request), 0, 3, kAboveBlock, kAboveBlock); }, Fds::None, Result::TooLarge,
     false, false},
    {"an fd with a frame above the pool's block",
     [](Raw& r) { frame(r, t(FrameType::Message), wire::FlagFd, 0, kAboveBlock, kAboveBlock); }, Fds::Pipe,
     Result::TooLarge, false, false},
    {"an fd without the fd flag", [](Raw& r) { frame(r, t(FrameType::Message), 0, 0, 4, 4); }, Fds::Pipe,
     Result::BadFrame, false, false},
    {"the fd flag without an fd", [](Raw& r) { frame(r, t(FrameType::Message), wire::FlagFd, 0, 4, 4); },
     Fds::None, Result::BadFrame, false, false},
    {"a directory fd with the fd flag on a Request",
     [](Raw& r) { frame(r, t(FrameType::Request), wire::FlagFd, 1, 4, 4); }, Fds::Dir, Result::BadFrame, false,
     false},
    {"two fds", [](Raw& r) { frame(r, t(FrameType::Message), wire::FlagFd, 0, 4, 4); }, Fds::Two,
     Result::BadFrame, false, false},
    {"five fds (truncated control data)",
     [](Raw& r) { frame(r, t(FrameType::Request), wire::FlagFd, 2, 4, 4); }, Fds::Five, Result::BadFrame, false,
     false},
    // Only meaningful as the first frame.
    {"a Hello with the fd flag and an fd",
     [](Raw& r) { hello(r, kProto.id, kProto.max_payload, wire::FlagFd); }, Fds::Pipe, Result::BadFrame, false,
     true},
    {"a Hello with an fd but no flag", [](Raw& r) { hello(r, kProto.id, kProto.max_payload); }, Fds::Pipe,
     Result::BadFrame, false, true},
    {"a Hello with a directory fd", [](Raw& r) { hello(r, kProto.id, kProto.max_payload, wire::FlagFd); },
     Fds::Dir, Result::BadFrame, false, true},
    {"a Hello whose id length field lies", [](Raw& r) { hello(r, kProto.id, kProto.max_payload, 0, 1); },
     Fds::None, Result::BadFrame, false, true},
    {"a Hello longer than any protocol id",
     [](Raw& r) { frame(r, t(FrameType::Hello), 0, 0, 8 + LEMSG_MAX_PROTOCOL_ID + 1, 8 + LEMSG_MAX_PROTOCOL_ID + 1); },
     Fds::None, Result::BadFrame, false, true},
    {"a Hello larger than the hello buffer",
     [](Raw& r) { frame(r, t(FrameType::Hello), 0, 0, kAboveBlock, kAboveBlock); }, Fds::None, Result::BadFrame,
     false, true},
    {"a Message before any Hello", [](Raw& r) { frame(r, t(FrameType::Message), 0, 0, 4, 4); }, Fds::None,
     Result::BadFrame, false, true},
    {"a Request before any Hello", [](Raw& r) { frame(r, t(FrameType::Request), 0, 1, 4, 4); }, Fds::None,
     Result::BadFrame, false, true},
};

// Sends one kind of garbage from a fresh rogue and checks every promise.
void rogue_round(Bench& b, const Garbage& g, bool with_hello) {
  INFO(doctest::String(g.what));
  CAPTURE(with_hello);
  Server& s = b.server;
  const int opens = s.opens;
  const int closes = s.close_count;
  Peer rogue;
  std::uint32_t ref = 0;
  REQUIRE(b.connect_rogue(rogue, with_hello, ref));
  const int warnings = b.log.warnings();
  Raw r;
  g.build(r);
  REQUIRE(send_raw(rogue.fd, r, g.fds));
  // The server closes the rogue's socket...
  CHECK(testutil::run_until(s.loop, [&] { return rogue.poll_closed(); }, 30000));
  CHECK(b.log.warnings() > warnings);  // ...says so in the log...
  ::close(rogue.fd);
  rogue.fd = -1;
  // ...and is left as it was: one session, no block, no extra fd.
  CHECK(s.svc.session_count() == 1);
  CHECK(testutil::run_until(s.loop, [&] { return s.pool.in_use() == 0; }, 30000));
  if (g.fds == Fds::Five && !b.dropped) {
    // Only what the emulator kept back may remain; count afresh from here.
    CHECK(testutil::count_open_fds() <= b.base_fds + 1);
    b.base_fds = testutil::count_open_fds();
  } else {
    CHECK(testutil::count_open_fds() == b.base_fds);
  }
  if (with_hello) {
    // The session was open: its close handler runs exactly once, for it.
    CHECK(s.opens == opens + 1);
    REQUIRE(s.close_count == closes + 1);
    CHECK(s.closes[closes].ref == ref);
    CHECK(s.closes[closes].reason == g.reason);
  } else {
    // It never was: no open, no close handler, no Welcome.
    CHECK(s.opens == opens);
    CHECK(s.close_count == closes);
    CHECK_FALSE(rogue.welcome);
  }
  CHECK(b.served());
}

}  // namespace

TEST_CASE("transport: a rogue that sends garbage instead of a Hello is closed and logged, and the others are served") {
  Bench b;
  REQUIRE(b.start());
  int rounds = 0;
  for (const Garbage& g : kGarbage) {
    if (g.after_hello_only) continue;
    rogue_round(b, g, false);
    ++rounds;
  }
  CHECK(rounds >= 30);
  CHECK(b.server.close_count == 0);
  CHECK(b.server.opens == 1);
  CHECK(b.finish() == 0);
}

TEST_CASE("transport: a rogue that sends garbage after its Hello is closed once with BadFrame or TooLarge") {
  Bench b;
  REQUIRE(b.start());
  int rounds = 0;
  for (const Garbage& g : kGarbage) {
    if (g.before_hello_only) continue;
    rogue_round(b, g, true);
    ++rounds;
  }
  CHECK(rounds >= 25);
  CHECK(b.finish() == 0);
  // The good client left cleanly; nobody else is left.
  CHECK(testutil::run_until(b.server.loop, [&] { return b.server.svc.session_count() == 0; }, 30000));
  CHECK(b.server.close_count == rounds + 1);
  CHECK(b.server.closes[rounds].reason == Result::Closed);
}

// A peer that sends frame after frame is read in recvmmsg() batches once a
// probe finds more than one frame waiting (the first reads take one frame
// each): `total` one-way frames, queued before the server runs, optionally
// with an fd on frame `fd_at` and a bad frame after frame `bad_after` (0:
// none). Every frame before the bad one arrives in order; nothing after it.
struct StreamCase {
  int total;
  int fd_at;
  int bad_after;
};
void stream_frames(const StreamCase& c) {
  testutil::RuntimeDir dir;
  Loop loop;
  lemsg::MessagePool<kBlock, 16> pool;
  lemsg::Service svc{loop, kProto, pool};
  int got[64] = {};
  int n = 0, with_fd = 0, fd_frame = 0, closes = 0;
  Result why = Result::Ok;
  svc.set_receive_handler([&](Message& m) {
    if (n < 64 && m.size() == 1) got[n++] = static_cast<const unsigned char*>(m.payload())[0];
    if (m.has_fd()) {
      ++with_fd;
      fd_frame = n;
    }
  });
  svc.set_close_handler([&](SessionRef, Result r) {
    ++closes;
    why = r;
  });
  testutil::LogCapture log;
  REQUIRE(svc.advertise(kName) == Result::Ok);
  const int base_fds = testutil::count_open_fds();
  char path[256];
  dir.socket(kName, path);
  Peer rogue;
  rogue.fd = connect_raw(path);
  REQUIRE(rogue.fd >= 0);
  Raw h;
  hello(h, kProto.id, kProto.max_payload);
  REQUIRE(send_raw(rogue.fd, h, Fds::None));
  for (int i = 1; i <= c.total; ++i) {
    Raw m;
    const bool fd = i == c.fd_at;
    frame(m, t(FrameType::Message), fd ? wire::FlagFd : 0, 0, 1, 1);
    m.b[wire::header_size] = static_cast<unsigned char>(i);
    REQUIRE(send_raw(rogue.fd, m, fd ? Fds::Pipe : Fds::None));
    if (i == c.bad_after) {
      Raw bad;
      frame(bad, t(FrameType::Message), 0, 0, 1, 1, 0x00);  // wrong magic
      REQUIRE(send_raw(rogue.fd, bad, Fds::None));
    }
  }
  const int want = c.bad_after ? c.bad_after : c.total;
  if (c.bad_after) {
    CHECK(testutil::run_until(loop, [&] { return rogue.poll_closed() && closes > 0; }, 30000));
    CHECK(closes == 1);
    CHECK(why == Result::BadFrame);
    CHECK(log.warnings() >= 1);
    CHECK(svc.session_count() == 0);
  } else {
    CHECK(testutil::run_until(loop, [&] { return n == want; }, 30000));
    (void)loop.run_once(20);
    CHECK(closes == 0);
    CHECK(svc.session_count() == 1);
  }
  CHECK(n == want);
  for (int i = 0; i < n; ++i) CHECK(got[i] == i + 1);
  CHECK(with_fd == (c.fd_at && c.fd_at <= want ? 1 : 0));
  if (with_fd) CHECK(fd_frame == c.fd_at);
  ::close(rogue.fd);
  rogue.fd = -1;
  CHECK(testutil::run_until(loop, [&] { return svc.session_count() == 0; }, 30000));
  CHECK(pool.in_use() == 0);
  CHECK(testutil::count_open_fds() == base_fds);
}

// Frames that arrived before a bad one are still delivered, in order and
// with their fds; nothing after it is; the session then closes once, and
// nothing is left behind. Six frames are read one at a time.
TEST_CASE("transport: frames queued ahead of a bad frame are delivered in order, then the session closes once") {
  stream_frames(StreamCase{6, 3, 5});
}

TEST_CASE("transport: a streaming peer's frames, read in growing batches, arrive in order with their fd") {
  // 60 frames: single reads, then a probe, then batches up to max_batch
  // (8), which read on while they come back full.
  stream_frames(StreamCase{60, 37, 0});
}

TEST_CASE("transport: a bad frame inside a streamed batch closes the session after the frames before it") {
  // Frames 1..7 are single reads, the 8th read probes two (8, 9), then a
  // batch of four (10..13): the fd on 10 and the bad frame after 11 fall
  // inside that batch.
  stream_frames(StreamCase{14, 10, 11});
  // And further in, where batches are at their largest.
  stream_frames(StreamCase{40, 30, 33});
}

TEST_CASE("transport: a rogue whose Hello names another protocol or size is refused without a close handler call") {
  Bench b;
  REQUIRE(b.start());
  struct Case {
    const char* id;
    std::uint32_t max;
    Result expect;
  };
  const Case cases[] = {
      {"test.rogue.v2", kProto.max_payload, Result::ProtocolMismatch},
      {"test.rogue", kProto.max_payload, Result::ProtocolMismatch},
      {"test.rogue.v1.extra", kProto.max_payload, Result::ProtocolMismatch},
      {"x", kProto.max_payload, Result::ProtocolMismatch},
      {kProto.id, kProto.max_payload + 1, Result::SizeMismatch},
      {kProto.id, 0, Result::SizeMismatch},
      {kProto.id, 0xFFFFFFFFu, Result::SizeMismatch},
  };
  for (const Case& c : cases) {
    INFO(doctest::String(c.id));
    CAPTURE(c.max);
    Peer rogue;
    std::uint32_t ref = 0;
    REQUIRE(b.connect_rogue(rogue, false, ref));
    const int warnings = b.log.warnings();
    Raw h;
    hello(h, c.id, c.max);
    REQUIRE(send_raw(rogue.fd, h, Fds::None));
    CHECK(testutil::run_until(b.server.loop, [&] { return rogue.poll_closed(); }, 30000));
    CHECK(rogue.refuse);
    CHECK(rogue.refuse_code == static_cast<std::int32_t>(c.expect));
    CHECK_FALSE(rogue.welcome);
    CHECK(b.log.warnings() > warnings);
    ::close(rogue.fd);
    rogue.fd = -1;
    CHECK(b.server.svc.session_count() == 1);
    CHECK(testutil::count_open_fds() == b.base_fds);
    CHECK(b.served());
  }
  CHECK(b.server.opens == 1);
  CHECK(b.server.close_count == 0);
  CHECK(b.finish() == 0);
}

TEST_CASE("transport: silent clients take no session slot; beyond the handshake table the oldest are closed") {
  // A connection that sends no Hello waits in the handshake table, not in the
  // session table (it is closed after LEMSG_OPEN_TIMEOUT_MS, too long to wait
  // for here). When that table is full, the oldest one makes room.
  Bench b;
  REQUIRE(b.start());
  constexpr int kExtra = 2;
  Peer silent[LEMSG_MAX_HANDSHAKES + kExtra];
  for (Peer& p : silent) {
    std::uint32_t ref = 0;
    REQUIRE(b.connect_rogue(p, false, ref));
  }
  const int warnings = b.log.warnings();
  CHECK(testutil::run_until(
      b.server.loop, [&] { return silent[0].poll_closed() && silent[1].poll_closed(); }, 30000));
  for (int i = kExtra; i < LEMSG_MAX_HANDSHAKES + kExtra; ++i) {
    CAPTURE(i);
    CHECK_FALSE(silent[i].poll_closed());
    CHECK_FALSE(silent[i].refuse);
  }
  CHECK(b.log.warnings() == warnings + 1);  // one warning per flood
  CHECK(b.server.svc.session_count() == 1);
  // A client that says Hello gets in while the table is full of silent ones.
  Peer late;
  std::uint32_t ref = 0;
  REQUIRE(b.connect_rogue(late, true, ref));
  CHECK(b.server.svc.session_count() == 2);
  CHECK(b.served());
  for (Peer& p : silent) {
    ::close(p.fd);
    p.fd = -1;
  }
  ::close(late.fd);
  late.fd = -1;
  CHECK(testutil::run_until(b.server.loop, [&] { return b.server.svc.session_count() == 1; }, 30000));
  CHECK(testutil::run_until(b.server.loop, [&] { return testutil::count_open_fds() == b.base_fds; }, 30000));
  CHECK(b.server.opens == 2);
  CHECK(b.server.close_count == 1);
  CHECK(b.served());
  CHECK(b.finish() == 0);
}

TEST_CASE("transport: a rogue that completed its Hello and then vanishes is closed with Closed, once") {
  Bench b;
  REQUIRE(b.start());
  Peer rogue;
  std::uint32_t ref = 0;
  REQUIRE(b.connect_rogue(rogue, true, ref));
  CHECK(b.server.svc.session_count() == 2);
  // A request left unread by its sender's death is not answered to anyone.
  Raw req;
  frame(req, t(FrameType::Request), 0, 77, 4, 4);
  REQUIRE(send_raw(rogue.fd, req, Fds::None));
  ::close(rogue.fd);
  rogue.fd = -1;
  CHECK(testutil::run_until(b.server.loop, [&] { return b.server.close_count == 1; }, 30000));
  CHECK(b.server.closes[0].ref == ref);
  CHECK(b.server.closes[0].reason == Result::Closed);
  CHECK(b.server.svc.session_count() == 1);
  CHECK(testutil::run_until(b.server.loop, [&] { return b.server.pool.in_use() == 0; }, 30000));
  CHECK(testutil::count_open_fds() == b.base_fds);
  CHECK(b.served());
  CHECK(b.server.close_count == 1);
  CHECK(b.finish() == 0);
}

TEST_CASE("transport: several rogues sending garbage at once are each closed, and only they") {
  Bench b;
  REQUIRE(b.start());
  // Every other rogue is silent, and silent ones wait in the handshake table.
  const int n = kTable - 1 < 2 * LEMSG_MAX_HANDSHAKES + 1 ? kTable - 1 : 2 * LEMSG_MAX_HANDSHAKES + 1;
  Peer rogues[LEMSG_MAX_SESSIONS];
  std::uint32_t refs[LEMSG_MAX_SESSIONS] = {};
  int hellod = 0;
  for (int i = 0; i < n; ++i) {
    const bool with_hello = i % 2 == 0;
    REQUIRE(b.connect_rogue(rogues[i], with_hello, refs[i]));
    if (with_hello) ++hellod;
  }
  // All send before the server looks at any of them.
  const std::size_t kinds = sizeof kGarbage / sizeof kGarbage[0];
  for (int i = 0; i < n; ++i) {
    const Garbage& g = kGarbage[(static_cast<std::size_t>(i) * 7 + 3) % kinds];
    // Garbage for either state; truncated fds only where they cannot leak.
    const bool plain = g.after_hello_only || g.before_hello_only || (g.fds == Fds::Five && !b.dropped);
    Raw r;
    if (plain) frame(r, 7, 0, 0, 0, 0);
    else g.build(r);
    REQUIRE(send_raw(rogues[i].fd, r, plain ? Fds::None : g.fds));
  }
  CHECK(testutil::run_until(
      b.server.loop,
      [&] {
        bool all = true;
        for (int i = 0; i < n; ++i) all = rogues[i].poll_closed() && all;
        return all;
      },
      30000));
  for (int i = 0; i < n; ++i) {
    ::close(rogues[i].fd);
    rogues[i].fd = -1;
  }
  CHECK(b.server.svc.session_count() == 1);
  CHECK(b.server.close_count == hellod);
  for (int i = 0; i < b.server.close_count && i < 256; ++i) {
    CHECK((b.server.closes[i].reason == Result::BadFrame || b.server.closes[i].reason == Result::TooLarge));
  }
  CHECK(testutil::run_until(b.server.loop, [&] { return b.server.pool.in_use() == 0; }, 30000));
  CHECK(testutil::count_open_fds() == b.base_fds);
  CHECK(b.served());
  CHECK(b.finish() == 0);
}

// ---- the client's side: a fake server ----

namespace {

enum class Fake {
  Empty,
  Short,
  LengthTooBig,
  UnknownType,
  RequestFromServer,
  HelloFromServer,
  SecondWelcome,
  ResponseTxn0,
  ErrorUnknownCode,
  ErrorNegativeCode,
  ErrorOkCode,
  AboveProtocol,
  AbovePool,
  FdWithoutFlag,
  FlagWithoutFd,
  DirFdResponse,
  TwoFds,
  StrayResponse,  // harmless: a response to no pending request, then real traffic
};

const std::int32_t kUnanswered = static_cast<std::int32_t>(Result::Unanswered);

bool recv_frame(int s, unsigned char* buf, std::size_t cap, ssize_t& n) {
  struct pollfd p = {s, POLLIN, 0};
  if (::poll(&p, 1, 30000) != 1) return false;
  n = ::recv(s, buf, cap, MSG_DONTWAIT);
  return n > 0;
}

bool send_frame(int s, std::uint8_t type, std::uint8_t flags, std::uint32_t txn, const void* payload,
                std::uint32_t len, Fds fds = Fds::None, std::uint32_t length_field = 0xFFFFFFFFu) {
  Raw r;
  frame(r, type, flags, txn, length_field == 0xFFFFFFFFu ? len : length_field, len);
  if (payload) std::memcpy(r.b + wire::header_size, payload, len);
  return send_raw(s, r, fds);
}

// The fake server's body, in a child. Exit codes: 0 fine (the client closed
// the connection), 20.. the step that failed.
int fake_server(const char* path, Fake kind) {
  int l = -1;
  if (lemsg::detail::listen_at(path, 0660, l) != Result::Ok) return 20;
  struct pollfd p = {l, POLLIN, 0};
  if (::poll(&p, 1, 30000) != 1) return 21;
  const int s = ::accept4(l, nullptr, nullptr, SOCK_CLOEXEC);
  if (s < 0) return 22;
  unsigned char buf[512];
  ssize_t n = 0;
  if (!recv_frame(s, buf, sizeof buf, n) || buf[2] != t(FrameType::Hello)) return 23;
  if (!send_frame(s, t(FrameType::Welcome), 0, 0, nullptr, 0)) return 24;
  if (!recv_frame(s, buf, sizeof buf, n) || buf[2] != t(FrameType::Request)) return 25;
  std::uint32_t txn = 0;
  std::memcpy(&txn, buf + 4, 4);
  std::int32_t code = 0;
  const char four[4] = {'a', 'b', 'c', 'd'};
  bool ok = true;
  switch (kind) {
    case Fake::Empty: ok = ::send(s, "", 0, MSG_NOSIGNAL) == 0; break;
    case Fake::Short: ok = ::send(s, "\xE5\x01\x04", 3, MSG_NOSIGNAL) == 3; break;
    case Fake::LengthTooBig: ok = send_frame(s, t(FrameType::Message), 0, 0, four, 4, Fds::None, 40); break;
    case Fake::UnknownType: ok = send_frame(s, 7, 0, 0, four, 4); break;
    case Fake::RequestFromServer: ok = send_frame(s, t(FrameType::Request), 0, 1, four, 4); break;
    case Fake::HelloFromServer: {
      Raw h;
      hello(h, kProto.id, kProto.max_payload);
      ok = send_raw(s, h, Fds::None);
      break;
    }
    case Fake::SecondWelcome: ok = send_frame(s, t(FrameType::Welcome), 0, 0, nullptr, 0); break;
    case Fake::ResponseTxn0: ok = send_frame(s, t(FrameType::Response), 0, 0, four, 4); break;
    case Fake::ErrorUnknownCode:
      code = lemsg::result_count + 100;
      ok = send_frame(s, t(FrameType::Response), wire::FlagError, txn, &code, 4);
      break;
    case Fake::ErrorNegativeCode:
      code = -1;
      ok = send_frame(s, t(FrameType::Response), wire::FlagError, txn, &code, 4);
      break;
    case Fake::ErrorOkCode:
      code = 0;
      ok = send_frame(s, t(FrameType::Response), wire::FlagError, txn, &code, 4);
      break;
    case Fake::AboveProtocol:
      ok = send_frame(s, t(FrameType::Message), 0, 0, nullptr, kProto.max_payload + 1);
      break;
    case Fake::AbovePool: ok = send_frame(s, t(FrameType::Response), 0, txn, nullptr, kAboveBlock); break;
    case Fake::FdWithoutFlag: ok = send_frame(s, t(FrameType::Message), 0, 0, four, 4, Fds::Pipe); break;
    case Fake::FlagWithoutFd: ok = send_frame(s, t(FrameType::Response), wire::FlagFd, txn, four, 4); break;
    case Fake::DirFdResponse:
      ok = send_frame(s, t(FrameType::Response), wire::FlagFd, txn, four, 4, Fds::Dir);
      break;
    case Fake::TwoFds: ok = send_frame(s, t(FrameType::Message), wire::FlagFd, 0, four, 4, Fds::Two); break;
    case Fake::StrayResponse: {
      std::uint32_t stray = txn ^ 0x5A5A0000u;
      if (stray == 0) stray = 1;
      ok = send_frame(s, t(FrameType::Response), wire::FlagFd, stray, "stray", 5, Fds::Pipe) &&
           send_frame(s, t(FrameType::Response), wire::FlagError, stray ^ 1u, &kUnanswered, 4) &&
           send_frame(s, t(FrameType::Message), 0, 0, "marker", 6) &&
           send_frame(s, t(FrameType::Response), 0, txn, "answer", 6);
      break;
    }
  }
  if (!ok) return 26;
  // Wait for the client to close the connection.
  for (;;) {
    struct pollfd q = {s, POLLIN, 0};
    if (::poll(&q, 1, 30000) != 1) return 27;
    n = ::recv(s, buf, sizeof buf, MSG_DONTWAIT);
    if (n == 0) return 0;
    if (n < 0 && errno == ECONNRESET) return 0;
    if (n < 0 && errno != EAGAIN && errno != EINTR) return 28;
  }
}

struct ClientState {
  int closes = 0;
  Result reason = Result::Ok;
  int done = 0;
  int done_closed = 0;
  int done_ok = 0;
  char answer[16] = {};
  int received = 0;
};

struct FakeClient {
  testutil::TidyRuntimeDir dir;
  testutil::LogCapture log;
  Loop loop;
  lemsg::MessagePool<kBlock, 4> pool;
  lemsg::Session s{loop, kProto, pool};
  ClientState st;
  pid_t pid = -1;
  int base_fds = 0;

  ~FakeClient() {
    if (pid > 0) testutil::kill9(pid);
  }
  bool start(Fake kind) {
    s.set_close_handler([this](Result why) {
      ++st.closes;
      st.reason = why;
    });
    s.set_receive_handler([this](Message&) { ++st.received; });
    base_fds = testutil::count_open_fds();
    char path[256];
    dir.socket(kName, path);
    pid = testutil::spawn([&path, kind] { return fake_server(path, kind); });
    if (!testutil::wait_for_path(path, 30000)) return false;
    return s.open_sync(kName, 30000) == Result::Ok;
  }
  Result request() {
    Message m;
    Result r = s.create_message(m);
    if (r == Result::Ok) r = m.assign("q", 1);
    if (r != Result::Ok) return r;
    return s.request(std::move(m), [this](Result why, Message& resp) {
      ++st.done;
      if (why == Result::Closed) ++st.done_closed;
      if (why == Result::Ok) {
        ++st.done_ok;
        std::snprintf(st.answer, sizeof st.answer, "%.*s", static_cast<int>(resp.size()),
                      static_cast<const char*>(resp.payload()));
      }
    });
  }
  int finish() {
    const int rc = testutil::wait_exit(pid, 30000);
    pid = -1;
    return rc;
  }
};

}  // namespace

TEST_CASE("transport: a server that sends garbage closes the client's session once; pending requests end Closed") {
  struct Case {
    const char* what;
    Fake kind;
    Result reason;
  };
  const Case cases[] = {
      {"an empty datagram", Fake::Empty, Result::BadFrame},
      {"a short frame", Fake::Short, Result::BadFrame},
      {"a length field above what arrived", Fake::LengthTooBig, Result::BadFrame},
      {"an unknown type", Fake::UnknownType, Result::BadFrame},
      {"a Request from the server", Fake::RequestFromServer, Result::BadFrame},
      {"a Hello from the server", Fake::HelloFromServer, Result::BadFrame},
      {"a second Welcome", Fake::SecondWelcome, Result::BadFrame},
      {"a Response with txn 0", Fake::ResponseTxn0, Result::BadFrame},
      {"an error response with an unknown result code", Fake::ErrorUnknownCode, Result::BadFrame},
      {"an error response with a negative result code", Fake::ErrorNegativeCode, Result::BadFrame},
      {"an error response that claims Ok", Fake::ErrorOkCode, Result::BadFrame},
      {"a Message above the protocol maximum", Fake::AboveProtocol, Result::TooLarge},
      {"a Response above the pool's block", Fake::AbovePool, Result::TooLarge},
      {"an fd without the fd flag", Fake::FdWithoutFlag, Result::BadFrame},
      {"the fd flag without an fd", Fake::FlagWithoutFd, Result::BadFrame},
      {"a directory fd on a Response", Fake::DirFdResponse, Result::BadFrame},
      {"two fds", Fake::TwoFds, Result::BadFrame},
  };
  for (const Case& c : cases) {
    INFO(doctest::String(c.what));
    FakeClient f;
    REQUIRE(f.start(c.kind));
    const int warnings = f.log.warnings();
    REQUIRE(f.request() == Result::Ok);
    REQUIRE(f.request() == Result::Ok);
    CHECK(f.s.pending_count() == 2);
    CHECK(testutil::run_until(f.loop, [&] { return f.st.closes > 0; }, 30000));
    CHECK(f.st.closes == 1);
    CHECK(f.st.reason == c.reason);
    CHECK(f.st.done == 2);
    CHECK(f.st.done_closed == 2);
    CHECK(f.st.received == 0);
    CHECK_FALSE(f.s.is_open());
    CHECK(f.s.pending_count() == 0);
    CHECK(f.pool.in_use() == 0);
    CHECK(testutil::count_open_fds() == f.base_fds);
    CHECK(f.log.warnings() > warnings);
    CHECK(f.finish() == 0);
    CHECK(f.st.closes == 1);
  }
}

TEST_CASE("transport: a bad frame that arrives during request_sync ends it with Closed, then the close handler runs") {
  FakeClient f;
  REQUIRE(f.start(Fake::ErrorUnknownCode));
  Message req, resp;
  REQUIRE(f.s.create_message(req) == Result::Ok);
  REQUIRE(req.assign("q", 1) == Result::Ok);
  CHECK(f.s.request_sync(std::move(req), resp, 30000) == Result::Closed);
  CHECK_FALSE(resp);
  CHECK_FALSE(f.s.is_open());
  CHECK(f.st.closes == 0);  // not inside request_sync...
  CHECK(testutil::run_until(f.loop, [&] { return f.st.closes > 0; }, 30000));
  CHECK(f.st.closes == 1);  // ...but from the loop, once
  CHECK(f.st.reason == Result::BadFrame);
  CHECK(f.pool.in_use() == 0);
  CHECK(testutil::count_open_fds() == f.base_fds);
  CHECK(f.finish() == 0);
}

TEST_CASE("transport: a response to no pending request is discarded, with its fd, and the session goes on") {
  FakeClient f;
  REQUIRE(f.start(Fake::StrayResponse));
  REQUIRE(f.request() == Result::Ok);
  // The server sends a stray response carrying an fd, a stray error
  // response, a message, then the real answer.
  CHECK(testutil::run_until(f.loop, [&] { return f.st.done > 0 && f.st.received > 0; }, 30000));
  CHECK(f.st.done == 1);
  CHECK(f.st.done_ok == 1);
  CHECK(std::strcmp(f.st.answer, "answer") == 0);
  CHECK(f.st.received == 1);
  CHECK(f.st.closes == 0);
  CHECK(f.s.is_open());
  CHECK(f.s.pending_count() == 0);
  CHECK(f.pool.in_use() == 0);
  CHECK(testutil::count_open_fds() == f.base_fds + 1);  // the session's socket, not the stray fd
  CHECK(f.log.warnings() == 0);
  f.s.close();
  CHECK(f.st.closes == 0);  // closing our own side does not call the close handler
  CHECK(testutil::count_open_fds() == f.base_fds);
  CHECK(f.finish() == 0);
}


// ---- denial of service: a peer that keeps its own connection alive ----

TEST_CASE("transport: a client that sends its own connection socket as an fd is closed as bad input, so its death is seen") {
  // The D-Bus CVE-2014-3637 class: a server that keeps a received fd which
  // is the client's end of the very same connection never sees a hang-up
  // after the client dies. The fd must be refused and the session closed.
  Bench b;
  REQUIRE(b.start());
  int kept[8];
  int kept_count = 0;
  b.server.svc.set_receive_handler([&](Message& m) {
    if (m.has_fd() && kept_count < 8) kept[kept_count++] = m.take_fd();  // the application keeps it
    if (!m.needs_response()) return;
    unsigned char* p = static_cast<unsigned char*>(m.payload());
    for (std::uint32_t i = 0; i < m.size(); ++i) p[i] = static_cast<unsigned char>(p[i] + 1);
    Result rr = b.server.svc.respond(std::move(m));
    (void)rr;
  });
  Peer rogue;
  std::uint32_t ref = 0;
  REQUIRE(b.connect_rogue(rogue, true, ref));
  Raw r;
  frame(r, t(FrameType::Message), wire::FlagFd, 0, 4, 4);
  REQUIRE(testutil::send_fds(rogue.fd, r.b, r.len, &rogue.fd, 1));
  ::close(rogue.fd);  // the rogue "dies"; only the fd in flight keeps its end alive
  rogue.fd = -1;
  CHECK(testutil::run_until(b.server.loop, [&] { return b.server.close_count == 1; }, 5000));
  CHECK(b.server.closes[0].ref == ref);
  CHECK(b.server.closes[0].reason == Result::BadFrame);
  CHECK(kept_count == 0);
  for (int i = 0; i < kept_count; ++i) ::close(kept[i]);
  CHECK(b.server.svc.session_count() == 1);
  CHECK(testutil::run_until(b.server.loop, [&] { return b.server.pool.in_use() == 0; }, 30000));
  CHECK(testutil::count_open_fds() == b.base_fds);
  CHECK(b.served());
  CHECK(b.finish() == 0);
}

TEST_CASE("transport: a Unix socket fd is refused unless the service opts in, and one connected to the server always") {
  // A child sends, on one session, first one end of a socketpair of its own,
  // then a second connection of its to the server (connected to us).
  for (int opt_in = 0; opt_in < 2; ++opt_in) {
    CAPTURE(opt_in);
    testutil::TidyRuntimeDir dir;
    testutil::LogCapture log;
    Server server;
    int kept[4];
    int kept_count = 0;
    bool kept_unix = false;
    server.svc.set_receive_handler([&](Message& m) {
      if (!m.has_fd() || kept_count >= 4) return;
      kept[kept_count] = m.take_fd();
      kept_unix = lemsg::detail::is_unix_socket(kept[kept_count]);
      ++kept_count;
    });
    lemsg::ServiceOptions opts;
    opts.accept_socket_fds = opt_in != 0;
    REQUIRE(server.svc.advertise(kName, opts) == Result::Ok);
    char path[256];
    dir.socket(kName, path);
    testutil::Pipe go;
    const pid_t child = testutil::spawn([&] {
      testutil::die_with_parent();
      go.close_write();
      const int s = connect_raw(path);
      CHILD_CHECK(s >= 0);
      Raw h;
      hello(h, kProto.id, kProto.max_payload);
      CHILD_CHECK(send_raw(s, h, Fds::None));
      int sv[2];
      CHILD_CHECK(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
      Raw m;
      frame(m, t(FrameType::Message), wire::FlagFd, 0, 4, 4);
      CHILD_CHECK(testutil::send_fds(s, m.b, m.len, &sv[0], 1));
      const int c = go.get(30000);  // 'n': the parent saw the first frame; 'q': done
      if (c != 'n') return c == 'q' ? 0 : 2;
      const int other = connect_raw(path);
      CHILD_CHECK(other >= 0);
      CHILD_CHECK(testutil::send_fds(s, m.b, m.len, &other, 1));
      go.get(30000);  // until the parent is done
      return 0;
    });
    go.close_read();
    if (opt_in) {
      // Connected elsewhere (to the child): delivered.
      CHECK(testutil::run_until(server.loop, [&] { return kept_count == 1; }, 30000));
      CHECK(kept_unix);
      CHECK(server.close_count == 0);
      go.put('n');
    } else {
      // Refused by default: the session closes as bad input.
      CHECK(testutil::run_until(server.loop, [&] { return server.close_count == 1; }, 30000));
      CHECK(kept_count == 0);
    }
    if (opt_in) {
      // Connected to this server: refused even so.
      CHECK(testutil::run_until(server.loop, [&] { return server.close_count == 1; }, 30000));
      CHECK(kept_count == 1);
    }
    CHECK(server.close_count == 1);
    CHECK(server.closes[0].reason == Result::BadFrame);
    for (int i = 0; i < kept_count; ++i) ::close(kept[i]);
    go.put('q');
    go.close_write();
    CHECK(testutil::wait_exit(child, 30000) == 0);
    CHECK(testutil::run_until(server.loop, [&] { return server.pool.in_use() == 0; }, 30000));
  }
}

TEST_CASE("transport: a service out of file descriptors pauses accepting, logs once, and lets the client in when fds are free") {
  // accept() failing with EMFILE leaves the listening socket readable: a
  // service that only logs and returns makes every run_once return at once.
  testutil::TidyRuntimeDir dir;
  char path[256];
  dir.socket(kName, path);
  testutil::Pipe full, go;
  const pid_t server = testutil::spawn([&] {
    testutil::die_with_parent();
    full.close_read();
    go.close_write();
    testutil::LogCapture log;
    Loop loop;
    lemsg::MessagePool<kBlock, 8> pool;
    lemsg::Service svc(loop, kProto, pool);
    CHILD_CHECK(svc.advertise(kName) == Result::Ok);
    // Leave no fd free.
    struct rlimit rl;
    CHILD_CHECK(::getrlimit(RLIMIT_NOFILE, &rl) == 0);
    rl.rlim_cur = static_cast<rlim_t>(testutil::count_open_fds() + 8);
    CHILD_CHECK(::setrlimit(RLIMIT_NOFILE, &rl) == 0);
    int spare[64];
    int n = 0;
    while (n < 64) {
      const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (fd < 0) break;
      spare[n++] = fd;
    }
    CHILD_CHECK(n < 64 && errno == EMFILE);
    full.put('f');
    CHILD_CHECK(go.get(30000) == 'c');  // a client waits in the backlog
    const int warnings = log.warnings();
    int busy = 0;
    for (int i = 0; i < 200; ++i)
      if (loop.run_once(10) == Result::Ok) ++busy;
    const int episode_warnings = log.warnings() - warnings;
    for (int i = 0; i < n; ++i) ::close(spare[i]);
    if (episode_warnings != 1 || busy >= 100)
      std::fprintf(stderr, "EMFILE: %d of 200 run_once calls dispatched, %d warnings\n", busy, episode_warnings);
    CHILD_CHECK(episode_warnings == 1);
    CHILD_CHECK(busy < 100);  // a spinning listener dispatches on every call
    // fds are free again: the waiting client gets in, and others after it.
    CHILD_CHECK(testutil::run_until(loop, [&] { return svc.session_count() == 1; }, 30000));
    struct pollfd p = {go.fd[0], POLLIN, 0};
    const long long end = testutil::now_ms() + 30000;
    while (::poll(&p, 1, 0) == 0 && testutil::now_ms() < end) {
      Result r = loop.run_once(20);
      (void)r;
    }
    return 0;
  });
  full.close_write();
  go.close_read();
  REQUIRE(full.get(30000) == 'f');
  Peer waiting;
  waiting.fd = connect_raw(path);
  REQUIRE(waiting.fd >= 0);
  Raw h;
  hello(h, kProto.id, kProto.max_payload);
  REQUIRE(send_raw(waiting.fd, h, Fds::None));
  go.put('c');
  const long long end = testutil::now_ms() + 30000;
  while (!waiting.welcome && !waiting.poll_closed() && testutil::now_ms() < end) usleep(2000);
  CHECK(waiting.welcome);
  {
    Loop loop;
    lemsg::MessagePool<kBlock, 4> pool;
    lemsg::Session s(loop, kProto, pool);
    CHECK(s.open_sync(kName, 30000) == Result::Ok);
  }
  go.put('q');
  CHECK(testutil::wait_exit(server, 30000) == 0);
}

TEST_CASE("transport: a client that reads nothing while frames wait for it is closed with Stalled after the stall timeout") {
  // The client's socket stays open in another process after the client
  // dies (a received copy, a forked child...), so no hang-up ever comes. A
  // session whose peer read nothing for the stall timeout while frames
  // waited must be closed anyway, with what the queue held.
  testutil::TidyRuntimeDir dir;
  testutil::LogCapture log;
  Server server;
  lemsg::ServiceOptions opts;
  opts.stall_timeout_ms = 300;
  REQUIRE(server.svc.advertise(kName, opts) == Result::Ok);
  char path[256];
  dir.socket(kName, path);
  testutil::Pipe hold;
  const pid_t client = testutil::spawn([&] {
    testutil::die_with_parent();
    hold.close_write();
    const int s = connect_raw(path);
    CHILD_CHECK(s >= 0);
    Raw h;
    hello(h, kProto.id, kProto.max_payload);
    CHILD_CHECK(send_raw(s, h, Fds::None));
    // A grandchild keeps the socket, reads nothing, and outlives the client.
    const pid_t keeper = testutil::spawn([&] {
      hold.get(30000);
      return 0;
    });
    CHILD_CHECK(keeper > 0);
    return 0;
  });
  hold.close_read();
  const int base_fds = testutil::count_open_fds();
  CHECK(testutil::wait_exit(client, 30000) == 0);
  CHECK(testutil::run_until(server.loop, [&] { return server.opens == 1; }, 30000));
  // Frames for it pile up until its queue (or the pool) is full.
  Result r = Result::Ok;
  for (int sent = 0; sent < 100000 && r == Result::Ok; ++sent) {
    Message m;
    r = server.svc.create_message(m);
    if (r == Result::Ok) r = m.assign("stuck", 5);
    if (r == Result::Ok) r = server.svc.send(server.last_open, std::move(m));
  }
  CHECK((r == Result::Overflow || r == Result::PoolEmpty));
  CHECK(server.pool.in_use() > 0);
  CHECK(testutil::run_until(server.loop, [&] { return server.close_count == 1; }, 5000));
  CHECK(server.closes[0].ref == server.last_open.value);
  CHECK(server.closes[0].reason == Result::Stalled);
  CHECK(server.svc.session_count() == 0);
  CHECK(server.pool.in_use() == 0);
  CHECK(testutil::count_open_fds() == base_fds);
  hold.put('q');  // the keeper goes (it is the parent's grandchild: init reaps it)
}

// ---- denial of service: another uid floods the service ----

namespace {

constexpr uid_t kFloodUid = 12345;
constexpr int kFlood = 200;

// Becomes uid/gid kFloodUid, as another local user would be.
bool become_flooder() {
  return ::setgroups(0, nullptr) == 0 && ::setresgid(kFloodUid, kFloodUid, kFloodUid) == 0 &&
         ::setresuid(kFloodUid, kFloodUid, kFloodUid) == 0;
}

// A service (run by root) in a child that serves until told 'q'; it
// reports its largest session count and then exits 0.
struct FloodedServer {
  testutil::Pipe quit;
  pid_t pid = -1;
  ~FloodedServer() {
    if (pid > 0) testutil::kill9(pid);
  }
  bool start(const char* path) {
    pid = testutil::spawn([this] {
      testutil::die_with_parent();
      quit.close_write();
      testutil::LogCapture quiet;
      Loop loop;
      lemsg::MessagePool<kBlock, 8> pool;
      lemsg::Service svc(loop, kProto, pool);
      svc.set_receive_handler([&](Message& m) {
        if (m.needs_response()) {
          Result r = svc.respond(std::move(m));
          (void)r;
        }
      });
      lemsg::ServiceOptions opts;
      opts.mode = 0666;  // the flooding uid may connect
      CHILD_CHECK(svc.advertise(kName, opts) == Result::Ok);
      struct pollfd p = {quit.fd[0], POLLIN, 0};
      const long long end = testutil::now_ms() + 120000;
      while (::poll(&p, 1, 0) == 0 && testutil::now_ms() < end) {
        Result r = loop.run_once(20);
        (void)r;
      }
      return 0;
    });
    quit.close_read();
    return pid > 0 && testutil::wait_for_path(path, 30000);
  }
  int finish() {
    quit.put('q');
    const int rc = testutil::wait_exit(pid, 30000);
    pid = -1;
    return rc;
  }
};

// Opens a client of the flooded service; Ok within a second is the promise.
Result legit_open() {
  Loop loop;
  lemsg::MessagePool<kBlock, 4> pool;
  lemsg::Session s(loop, kProto, pool);
  Result r = s.open_sync(kName, 1000);
  if (r != Result::Ok) return r;
  Message req, resp;
  r = s.create_message(req);
  if (r == Result::Ok) r = req.assign("hi", 2);
  if (r == Result::Ok) r = s.request_sync(std::move(req), resp, 30000);
  return r;
}

}  // namespace

TEST_CASE("transport: 200 silent connections from another uid take no session slot, and a client still opens within 1 s") {
  if (::geteuid() != 0) {
    MESSAGE("skipped: needs root to run the flooder as another uid");
    return;
  }
  testutil::TidyRuntimeDir dir;
  REQUIRE(::chmod(dir.path, 0755) == 0);
  char path[256];
  dir.socket(kName, path);
  FloodedServer server;
  REQUIRE(server.start(path));
  testutil::Pipe up, stop;
  const pid_t flooder = testutil::spawn([&] {
    testutil::die_with_parent();
    up.close_read();
    stop.close_write();
    CHILD_CHECK(become_flooder());
    // kFlood silent connections, each replaced as soon as the server drops it.
    int fds[kFlood];
    int made = 0;
    const long long end = testutil::now_ms() + 60000;
    for (int i = 0; i < kFlood && testutil::now_ms() < end;) {
      fds[i] = connect_raw(path);
      if (fds[i] >= 0) {
        ++i;
        ++made;
      } else {
        CHILD_CHECK(errno == EAGAIN);  // the backlog is full for a moment
        usleep(1000);
      }
    }
    CHILD_CHECK(made == kFlood);
    up.put('f');
    struct pollfd q = {stop.fd[0], POLLIN, 0};
    while (::poll(&q, 1, 0) == 0 && testutil::now_ms() < end) {
      for (int i = 0; i < kFlood; ++i) {
        struct pollfd p = {fds[i], 0, 0};
        if (fds[i] >= 0 && ::poll(&p, 1, 0) == 1) {
          ::close(fds[i]);
          fds[i] = connect_raw(path);
        } else if (fds[i] < 0) {
          fds[i] = connect_raw(path);
        }
      }
      usleep(5000);
    }
    return 0;
  });
  up.close_write();
  stop.close_read();
  REQUIRE(up.get(60000) == 'f');
  // While the flood goes on, clients of other uids get in, each within 1 s.
  for (int i = 0; i < 3; ++i) {
    CAPTURE(i);
    CHECK(legit_open() == Result::Ok);
  }
  stop.put('q');
  CHECK(testutil::wait_exit(flooder, 30000) == 0);
  CHECK(server.finish() == 0);
}

TEST_CASE("transport: one uid holds at most its share of the sessions, and a client of another uid still opens within 1 s") {
  if (::geteuid() != 0) {
    MESSAGE("skipped: needs root to run the flooder as another uid");
    return;
  }
  testutil::TidyRuntimeDir dir;
  REQUIRE(::chmod(dir.path, 0755) == 0);
  char path[256];
  dir.socket(kName, path);
  FloodedServer server;
  REQUIRE(server.start(path));
  testutil::Pipe up, stop;
  const pid_t flooder = testutil::spawn([&] {
    testutil::die_with_parent();
    up.close_read();
    stop.close_write();
    CHILD_CHECK(become_flooder());
    // Opens as many sessions as it can, keeping them all.
    int fds[kFlood];
    int welcomed = 0, refused = 0;
    for (int i = 0; i < LEMSG_MAX_SESSIONS + 4; ++i) {
      Peer p;
      p.fd = connect_raw(path);
      CHILD_CHECK(p.fd >= 0);
      Raw h;
      hello(h, kProto.id, kProto.max_payload);
      // Refused at accept, the hello may meet a closed socket: read the answer anyway.
      const bool sent = send_raw(p.fd, h, Fds::None);
      (void)sent;
      const long long end = testutil::now_ms() + 30000;
      while (!p.welcome && !p.poll_closed() && testutil::now_ms() < end) usleep(1000);
      if (p.welcome) {
        fds[welcomed++] = p.fd;
        p.fd = -1;
      } else {
        CHILD_CHECK(p.refuse);
        CHILD_CHECK(p.refuse_code == static_cast<std::int32_t>(Result::UidShareFull));
        ++refused;
      }
    }
    CHILD_CHECK(welcomed == LEMSG_MAX_SESSIONS_PER_UID);
    CHILD_CHECK(refused == LEMSG_MAX_SESSIONS + 4 - LEMSG_MAX_SESSIONS_PER_UID);
    up.put('f');
    stop.get(60000);
    for (int i = 0; i < welcomed; ++i) ::close(fds[i]);
    return 0;
  });
  up.close_write();
  stop.close_read();
  REQUIRE(up.get(60000) == 'f');
  CHECK(legit_open() == Result::Ok);
  stop.put('q');
  CHECK(testutil::wait_exit(flooder, 30000) == 0);
  CHECK(server.finish() == 0);
}

}  // TEST_SUITE
