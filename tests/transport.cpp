// Section 7 (transport): socket paths and the runtime dir, listen/connect,
// peer credentials, fd passing with every way control data can go wrong,
// and the parts of opening a session that depend on the transport: socket
// file modes, the allow-list, waiting for a server, protocol agreement and
// the session table's limit.
//
// Servers run in forked children (no exec: qemu-user cannot exec a target
// binary), because a synchronous open against a service this thread serves
// is refused with WouldDeadlock. A child is stopped through a pipe and
// always reaped with a timeout. Tests run as root in CI, where file modes
// never refuse anyone, so NotPermitted is shown with the allow-list, and the
// mode is checked with stat().
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

TEST_SUITE("transport") {

using lemsg::Loop;
using lemsg::Message;
using lemsg::Result;
using lemsg::Session;
using RuntimeDir = testutil::TidyRuntimeDir;

namespace {

const lemsg::Protocol kEcho{"test.transport.echo.v1", 64};

// Closes the fd it holds when it goes.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  ~Fd() { reset(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  void reset(int f = -1) {
    if (fd >= 0) ::close(fd);
    fd = f;
  }
};

bool fd_is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

bool seqpacket_pair(Fd& a, Fd& b) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return false;
  a.reset(sv[0]);
  b.reset(sv[1]);
  return true;
}

// A socket address for `path`; false when it does not fit.
bool address_of(const char* path, sockaddr_un& sa) {
  std::memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  const std::size_t n = std::strlen(path);
  if (n >= sizeof sa.sun_path) return false;
  std::memcpy(sa.sun_path, path, n + 1);
  return true;
}

// Restores LEMSG_RUNTIME_DIR to what it was when this was made.
struct EnvGuard {
  bool had = false;
  char value[512] = {};
  EnvGuard() {
    if (const char* v = std::getenv("LEMSG_RUNTIME_DIR")) {
      had = true;
      std::snprintf(value, sizeof value, "%s", v);
    }
  }
  ~EnvGuard() {
    if (had) setenv("LEMSG_RUNTIME_DIR", value, 1);
    else unsetenv("LEMSG_RUNTIME_DIR");
  }
};

// Names of the entries in `dir` other than . and .., comma separated.
// readdir64: a 32-bit readdir fails with EOVERFLOW on ext4's 64-bit
// directory offsets under a 64-bit kernel (qemu-user, or armhf on aarch64).
int list_dir(const char* dir, char* out, std::size_t cap) {
  int n = 0;
  out[0] = '\0';
  if (DIR* d = opendir(dir)) {
    while (struct dirent64* e = readdir64(d)) {
      if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
      const std::size_t used = std::strlen(out);
      std::snprintf(out + used, cap - used, "%s%s", n ? "," : "", e->d_name);
      ++n;
    }
    closedir(d);
  }
  return n;
}

// -- an echo server in a forked child --

struct ServerArgs {
  const char* name;
  lemsg::Protocol protocol;
  lemsg::ServiceOptions options;
  int delay_ms;
  bool remove_dir;  // after the delay, delete the runtime dir; advertise makes it again
};

// The child's body: advertise after `delay_ms`, answer each request with its
// own payload, stop when the parent writes to (or closes) `stop_fd`.
// Exit codes: 0 fine, 1 advertise failed, 2 loop failed, 3 setup failed.
int serve(const ServerArgs& a, int stop_fd) {
  if (a.delay_ms) usleep(static_cast<useconds_t>(a.delay_ms) * 1000);
  if (a.remove_dir) {
    const char* d = lemsg::runtime_dir();
    testutil::remove_entries(d);
    if (::rmdir(d) != 0) return 3;
    usleep(100 * 1000);  // let a waiting client see the directory gone
  }
  Loop loop;
  lemsg::MessagePool<256, 8> pool;
  lemsg::Service svc(loop, a.protocol, pool);
  if (svc.status() != Result::Ok) return 3;
  svc.set_receive_handler([&svc](Message& m) {
    if (m.needs_response()) {
      Result r = svc.respond(std::move(m));
      (void)r;
    }
  });
  // A timer looks at the stop pipe, so that every watch of the loop is free
  // for sessions; after a minute it stops anyway, so a parent that vanished
  // without a word leaves no child behind.
  struct Stop {
    Loop* loop;
    int fd;
    long long end;
  } stop{&loop, stop_fd, testutil::now_ms() + 60000};
  lemsg::TimerId tick;
  if (loop.add_timer(
          [&stop] {
            struct pollfd p = {stop.fd, POLLIN, 0};
            if (::poll(&p, 1, 0) != 0 || testutil::now_ms() > stop.end) stop.loop->stop();
          },
          tick) != Result::Ok ||
      loop.arm_timer(tick, 10, 10) != Result::Ok)
    return 3;
  if (svc.advertise(a.name, a.options) != Result::Ok) return 1;
  return loop.run() == Result::Ok ? 0 : 2;
}

// Starts serve() in a child. finish() stops it and returns its exit code;
// the destructor kills a child that was not finished.
struct ServerChild {
  testutil::Pipe stop;
  pid_t pid = -1;
  explicit ServerChild(const ServerArgs& a) {
    pid = testutil::spawn([&] {
      stop.close_write();
      return serve(a, stop.fd[0]);
    });
    stop.close_read();
  }
  ~ServerChild() {
    if (pid > 0) testutil::kill9(pid);
  }
  int finish() {
    if (pid <= 0) return -3;
    stop.put('q');
    const int rc = testutil::wait_exit(pid, 20000);
    pid = -1;
    return rc;
  }
};

ServerArgs echo_server(const char* name, int delay_ms = 0) {
  return ServerArgs{name, kEcho, lemsg::ServiceOptions{}, delay_ms, false};
}

// One request through the session, checking the echo.
Result echo_once(Session& s, const char* text) {
  Message req, resp;
  Result r = s.create_message(req);
  if (r == Result::Ok) r = req.assign(text, static_cast<std::uint32_t>(std::strlen(text)));
  if (r == Result::Ok) r = s.request_sync(std::move(req), resp, 10000);
  if (r != Result::Ok) return r;
  if (resp.size() != std::strlen(text) || std::memcmp(resp.payload(), text, resp.size()) != 0)
    return Result::BadFrame;
  return Result::Ok;
}

// A client: its own loop, pool and session.
struct Client {
  Loop loop;
  lemsg::MessagePool<64, 4> pool;
  Session s;
  explicit Client(const lemsg::Protocol& p = kEcho) : s(loop, p, pool) {}
};

// What an asynchronous open reported: how often its callback ran, and with what.
struct OpenReport {
  int calls = 0;
  Result r = Result::BadParameter;
};

// Starts c.s.open(name), recording every run of its callback in `got`.
Result start_open(Client& c, const char* name, OpenReport& got) {
  return c.s.open(name, [&got](Result r) {
    ++got.calls;
    got.r = r;
  });
}

}  // namespace

// ---- runtime dir and socket paths ----

TEST_CASE("transport: the runtime dir is LEMSG_RUNTIME_DIR when set and /run/lemsg otherwise") {
  EnvGuard env;
  unsetenv("LEMSG_RUNTIME_DIR");
  CHECK(std::strcmp(lemsg::runtime_dir(), "/run/lemsg") == 0);
  char path[sizeof(sockaddr_un::sun_path)];
  REQUIRE(lemsg::detail::socket_path("svc", path) == Result::Ok);
  CHECK(std::strcmp(path, "/run/lemsg/svc") == 0);
  setenv("LEMSG_RUNTIME_DIR", "", 1);  // empty counts as unset
  CHECK(std::strcmp(lemsg::runtime_dir(), "/run/lemsg") == 0);
  setenv("LEMSG_RUNTIME_DIR", "/var/tmp/x", 1);
  CHECK(std::strcmp(lemsg::runtime_dir(), "/var/tmp/x") == 0);
  REQUIRE(lemsg::detail::socket_path("svc", path) == Result::Ok);
  CHECK(std::strcmp(path, "/var/tmp/x/svc") == 0);
  {
    RuntimeDir dir;  // read at each call: a change is seen at once
    REQUIRE(lemsg::detail::socket_path("a.b", path) == Result::Ok);
    char want[256];
    dir.socket("a.b", want);
    CHECK(std::strcmp(path, want) == 0);
  }
}

TEST_CASE("transport: socket_path refuses bad names and accepts good ones") {
  RuntimeDir dir;
  char path[sizeof(sockaddr_un::sun_path)];
  const char* bad[] = {"", ".", "..", ".x", ".hidden", "a/b", "/abs", "../up", "a b", "a\tb", "a\nb", "a*",
                       "a?b", "a:b", "a\\b", "\xc3\xa9t\xc3\xa9", "a\x7f", "-\x01"};
  for (const char* name : bad) {
    INFO(doctest::String(name));
    CHECK(lemsg::detail::socket_path(name, path) == Result::BadParameter);
  }
  CHECK(lemsg::detail::socket_path(nullptr, path) == Result::BadParameter);
  const char* good[] = {"a", "echo", "x.y-z_0", "A9", "a.", "a..b", "-", "_x", "9"};
  for (const char* name : good) {
    INFO(doctest::String(name));
    REQUIRE(lemsg::detail::socket_path(name, path) == Result::Ok);
    char want[256];
    dir.socket(name, want);
    CHECK(std::strcmp(path, want) == 0);
  }
  // Exactly LEMSG_MAX_NAME characters is fine, one more is not.
  char name[LEMSG_MAX_NAME + 2];
  std::memset(name, 'n', sizeof name);
  name[LEMSG_MAX_NAME] = '\0';
  CHECK(lemsg::detail::socket_path(name, path) == Result::Ok);
  name[LEMSG_MAX_NAME] = 'n';
  name[LEMSG_MAX_NAME + 1] = '\0';
  CHECK(lemsg::detail::socket_path(name, path) == Result::BadParameter);
}

TEST_CASE("transport: socket_path refuses a path that does not fit a socket address") {
  EnvGuard env;
  char longdir[sizeof(sockaddr_un::sun_path) + 8];
  std::memset(longdir, 'd', sizeof longdir);
  longdir[0] = '/';
  longdir[sizeof longdir - 1] = '\0';
  setenv("LEMSG_RUNTIME_DIR", longdir, 1);
  char path[sizeof(sockaddr_un::sun_path)];
  CHECK(lemsg::detail::socket_path("svc", path) == Result::BadParameter);
  // Runtime dir + "/" + name of exactly sizeof(sun_path) - 1 bytes still fits.
  longdir[sizeof(sockaddr_un::sun_path) - 1 - 2] = '\0';
  setenv("LEMSG_RUNTIME_DIR", longdir, 1);
  CHECK(lemsg::detail::socket_path("s", path) == Result::Ok);
  CHECK(std::strlen(path) == sizeof(sockaddr_un::sun_path) - 1);
  CHECK(lemsg::detail::socket_path("st", path) == Result::BadParameter);
}

// ---- listen and connect ----

TEST_CASE("transport: listen_at creates a socket file with the requested mode and no temporary file") {
  RuntimeDir dir;
  char path[256];
  const mode_t modes[] = {0660, 0600, 0666};
  for (mode_t mode : modes) {
    CAPTURE(mode);
    dir.socket("svc", path);
    int fd = -1;
    REQUIRE(lemsg::detail::listen_at(path, mode, fd) == Result::Ok);
    Fd guard(fd);
    CHECK(fd >= 0);
    struct stat st;
    REQUIRE(::stat(path, &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK((st.st_mode & 07777) == mode);
    char names[512];
    CHECK(list_dir(dir.path, names, sizeof names) == 1);
    CHECK(std::strcmp(names, "svc") == 0);
    // Non-blocking and close-on-exec.
    CHECK((::fcntl(fd, F_GETFL) & O_NONBLOCK) != 0);
    CHECK((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
    // It listens: a client connects.
    int c = -1;
    CHECK(lemsg::detail::connect_to(path, c) == Result::Ok);
    Fd cg(c);
    guard.reset();
    ::unlink(path);
  }
}

TEST_CASE("transport: listen_at in a missing directory fails and creates nothing") {
  RuntimeDir dir;
  testutil::LogCapture log;  // the bind failure is logged as an error
  char path[256];
  std::snprintf(path, sizeof path, "%s/missing/svc", dir.path);
  int fd = 7;
  const Result r = lemsg::detail::listen_at(path, 0660, fd);
  CHECK(r == Result::SystemError);
  CHECK(fd == -1);
  char names[512];
  CHECK(list_dir(dir.path, names, sizeof names) == 0);
}

TEST_CASE("transport: a stale socket file is replaced and a live one is a Duplicate") {
  RuntimeDir dir;
  char path[256];
  dir.socket("svc", path);
  int fd1 = -1;
  REQUIRE(lemsg::detail::listen_at(path, 0660, fd1) == Result::Ok);
  Fd g1(fd1);
  int fd2 = -1;
  CHECK(lemsg::detail::listen_at(path, 0660, fd2) == Result::Duplicate);
  CHECK(fd2 == -1);
  struct stat before;
  REQUIRE(::stat(path, &before) == 0);
  // The listener goes; its file stays behind, stale.
  g1.reset();
  struct stat st;
  REQUIRE(::stat(path, &st) == 0);
  int c = -1;
  CHECK(lemsg::detail::connect_to(path, c) == Result::NotFound);
  CHECK(c == -1);
  REQUIRE(lemsg::detail::listen_at(path, 0600, fd2) == Result::Ok);
  Fd g2(fd2);
  REQUIRE(::stat(path, &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 07777) == 0600);
  CHECK(st.st_ino != before.st_ino);
  CHECK(lemsg::detail::connect_to(path, c) == Result::Ok);
  Fd cg(c);
  char names[512];
  CHECK(list_dir(dir.path, names, sizeof names) == 1);
}

TEST_CASE("transport: a live listener whose backlog is full is a Duplicate, not replaced") {
  RuntimeDir dir;
  char path[256];
  dir.socket("svc", path);
  // A raw listener with the smallest backlog, filled by connections nobody accepts.
  Fd l(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  REQUIRE(l.fd >= 0);
  sockaddr_un sa;
  REQUIRE(address_of(path, sa));
  REQUIRE(::bind(l.fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
  REQUIRE(::listen(l.fd, 0) == 0);
  Fd fill[8];
  Result last = Result::Ok;
  for (Fd& f : fill) {
    int c = -1;
    last = lemsg::detail::connect_to(path, c);
    f.reset(c);
    if (last != Result::Ok) break;
  }
  REQUIRE(last == Result::Busy);  // the backlog is full
  struct stat before, after;
  REQUIRE(::stat(path, &before) == 0);
  int fd = -1;
  CHECK(lemsg::detail::listen_at(path, 0660, fd) == Result::Duplicate);
  Fd g(fd);
  CHECK(fd == -1);
  REQUIRE(::stat(path, &after) == 0);
  CHECK(after.st_ino == before.st_ino);  // still the live listener's file
}

TEST_CASE("transport: connect_to a missing path or a stale file is NotFound") {
  RuntimeDir dir;
  char path[256];
  dir.socket("nobody", path);
  int fd = 5;
  CHECK(lemsg::detail::connect_to(path, fd) == Result::NotFound);
  CHECK(fd == -1);
  // A socket file bound but not listening is stale too.
  {
    Fd s(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    REQUIRE(s.fd >= 0);
    sockaddr_un sa;
    REQUIRE(address_of(path, sa));
    REQUIRE(::bind(s.fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
    CHECK(lemsg::detail::connect_to(path, fd) == Result::NotFound);
  }
  CHECK(lemsg::detail::connect_to(path, fd) == Result::NotFound);
  // A path whose directory is missing.
  char deep[256];
  std::snprintf(deep, sizeof deep, "%s/no/such/dir", dir.path);
  CHECK(lemsg::detail::connect_to(deep, fd) == Result::NotFound);
  CHECK(lemsg::detail::connect_to("", fd) == Result::BadParameter);
  char toolong[sizeof(sockaddr_un::sun_path) + 4];
  std::memset(toolong, 'x', sizeof toolong);
  toolong[0] = '/';
  toolong[sizeof toolong - 1] = '\0';
  CHECK(lemsg::detail::connect_to(toolong, fd) == Result::BadParameter);
  CHECK(fd == -1);
}

// ---- peer credentials ----

TEST_CASE("transport: peer_credentials reports our own pid, uid and gid over a socketpair") {
  Fd a, b;
  REQUIRE(seqpacket_pair(a, b));
  lemsg::Credentials c;
  REQUIRE(lemsg::detail::peer_credentials(a.fd, c) == Result::Ok);
  CHECK(c.pid == ::getpid());
  CHECK(c.uid == ::getuid());
  CHECK(c.gid == ::getgid());
  lemsg::Credentials d;
  REQUIRE(lemsg::detail::peer_credentials(b.fd, d) == Result::Ok);
  CHECK(d.pid == ::getpid());
  // Not a socket: an error, not garbage.
  testutil::Pipe p;
  lemsg::Credentials e;
  CHECK(lemsg::detail::peer_credentials(p.fd[0], e) == Result::SystemError);
}

TEST_CASE("transport: peer_credentials names the process at the other end of a connection") {
  RuntimeDir dir;
  char path[256];
  dir.socket("svc", path);
  int l = -1;
  REQUIRE(lemsg::detail::listen_at(path, 0660, l) == Result::Ok);
  Fd lg(l);
  testutil::Pipe done;
  const pid_t pid = testutil::spawn([&] {
    done.close_write();
    int c = -1;
    if (lemsg::detail::connect_to(path, c) != Result::Ok) return 1;
    return done.get(20000) == -1 ? 0 : 2;  // hold the connection until the parent is done
  });
  done.close_read();
  struct pollfd pfd = {l, POLLIN, 0};
  REQUIRE(::poll(&pfd, 1, 20000) == 1);
  Fd s(::accept4(l, nullptr, nullptr, SOCK_CLOEXEC));
  REQUIRE(s.fd >= 0);
  lemsg::Credentials c;
  REQUIRE(lemsg::detail::peer_credentials(s.fd, c) == Result::Ok);
  CHECK(c.pid == pid);
  CHECK(c.uid == ::getuid());
  CHECK(c.gid == ::getgid());
  done.close_write();
  CHECK(testutil::wait_exit(pid, 20000) == 0);
}

// ---- datagrams and fd passing ----

TEST_CASE("transport: a datagram with an fd arrives whole, with a working close-on-exec fd of its own") {
  Fd a, b;
  REQUIRE(seqpacket_pair(a, b));
  testutil::Pipe p;
  REQUIRE(lemsg::detail::send_datagram(a.fd, "hello", 5, p.fd[1]) == Result::Ok);
  CHECK(fd_is_open(p.fd[1]));  // sending does not close the sender's fd
  char buf[64];
  std::size_t len = 0;
  int fd = -1;
  REQUIRE(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::Ok);
  Fd got(fd);
  CHECK(len == 5);
  CHECK(std::memcmp(buf, "hello", 5) == 0);
  REQUIRE(fd >= 0);
  CHECK(fd != p.fd[1]);
  CHECK((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
  // The received fd is the pipe's write end.
  REQUIRE(::write(fd, "z", 1) == 1);
  CHECK(p.get(5000) == 'z');
  // Without an fd, fd_out is -1; an empty queue is WouldBlock.
  REQUIRE(lemsg::detail::send_datagram(a.fd, "x", 1, -1) == Result::Ok);
  REQUIRE(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::Ok);
  CHECK(len == 1);
  CHECK(fd == -1);
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::WouldBlock);
  CHECK(fd == -1);
  CHECK(len == 0);
}

TEST_CASE("transport: a directory fd is refused with BadFrame and closed") {
  Fd a, b;
  REQUIRE(seqpacket_pair(a, b));
  const int before = testutil::count_open_fds();
  {
    Fd d(::open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    REQUIRE(d.fd >= 0);
    REQUIRE(testutil::send_fds(a.fd, "dir", 3, &d.fd, 1));
  }
  char buf[64];
  std::size_t len = 0;
  int fd = -1;
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::BadFrame);
  CHECK(fd == -1);
  CHECK(testutil::count_open_fds() == before);
  // The socket goes on: the next datagram is fine.
  REQUIRE(lemsg::detail::send_datagram(a.fd, "ok", 2, -1) == Result::Ok);
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::Ok);
  CHECK(len == 2);
}

TEST_CASE("transport: two fds in one datagram are refused and both are closed") {
  Fd a, b;
  REQUIRE(seqpacket_pair(a, b));
  const int before = testutil::count_open_fds();
  {
    testutil::Pipe p;
    const int two[2] = {p.fd[0], p.fd[1]};
    REQUIRE(testutil::send_fds(a.fd, "two", 3, two, 2));
  }
  char buf[64];
  std::size_t len = 0;
  int fd = -1;
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::BadFrame);
  CHECK(fd == -1);
  CHECK(testutil::count_open_fds() == before);
}

TEST_CASE("transport: more fds than the control buffer holds are refused and nothing leaks") {
  // Under qemu-user the fds cut off by truncation stay open in the process
  // (the emulator's doing, out of any library's sight): then only those may
  // remain, and the count starts afresh after each.
  const bool dropped = testutil::truncated_fds_are_dropped();
  Fd a, b;
  REQUIRE(seqpacket_pair(a, b));
  int before = testutil::count_open_fds();
  // Four fit the receive buffer exactly (refused: more than one); five and
  // eight truncate the control data (MSG_CTRUNC; the kernel drops the rest).
  const std::size_t counts[] = {4, 5, 8};
  for (std::size_t n : counts) {
    CAPTURE(n);
    {
      Fd src[8];
      int fds[8];
      for (std::size_t i = 0; i < n; ++i) {
        src[i].reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
        REQUIRE(src[i].fd >= 0);
        fds[i] = src[i].fd;
      }
      REQUIRE(testutil::send_fds(a.fd, "many", 4, fds, n));
    }
    char buf[64];
    std::size_t len = 0;
    int fd = -1;
    CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::BadFrame);
    CHECK(fd == -1);
    if (dropped || n <= 4) {
      CHECK(testutil::count_open_fds() == before);
    } else {
      CHECK(testutil::count_open_fds() <= before + static_cast<int>(n) - 4);
      before = testutil::count_open_fds();
    }
  }
}

TEST_CASE("transport: a datagram larger than the buffer is TooLarge and its fd is closed") {
  Fd a, b;
  REQUIRE(seqpacket_pair(a, b));
  const int before = testutil::count_open_fds();
  char big[200];
  std::memset(big, 'b', sizeof big);
  {
    testutil::Pipe p;
    REQUIRE(lemsg::detail::send_datagram(a.fd, big, sizeof big, p.fd[0]) == Result::Ok);
  }
  REQUIRE(lemsg::detail::send_datagram(a.fd, big, sizeof big, -1) == Result::Ok);
  char buf[64];
  std::size_t len = 0;
  int fd = -1;
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::TooLarge);
  CHECK(fd == -1);
  CHECK(testutil::count_open_fds() == before);
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::TooLarge);
  // Exactly the buffer's size is fine.
  REQUIRE(lemsg::detail::send_datagram(a.fd, big, sizeof buf, -1) == Result::Ok);
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::Ok);
  CHECK(len == sizeof buf);
}

TEST_CASE("transport: a closed peer reads as Closed, after what it sent before closing") {
  Fd a, b;
  REQUIRE(seqpacket_pair(a, b));
  REQUIRE(lemsg::detail::send_datagram(a.fd, "last", 4, -1) == Result::Ok);
  a.reset();
  char buf[64];
  std::size_t len = 0;
  int fd = -1;
  REQUIRE(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::Ok);
  CHECK(len == 4);
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::Closed);
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::Closed);
  // Sending to it: Closed, and no SIGPIPE kills us.
  CHECK(lemsg::detail::send_datagram(b.fd, "x", 1, -1) == Result::Closed);
}

TEST_CASE("transport: what a peer sent before closing with our datagrams unread is still received") {
  // The kernel reports ECONNRESET once, before the queued datagrams, when
  // the peer closed with unread data: a server that refuses a client at
  // accept (its Hello unread) must still deliver the Refuse it sent.
  Fd a, b;
  REQUIRE(seqpacket_pair(a, b));
  REQUIRE(lemsg::detail::send_datagram(a.fd, "unread", 6, -1) == Result::Ok);
  REQUIRE(lemsg::detail::send_datagram(b.fd, "last words", 10, -1) == Result::Ok);
  b.reset();  // closes with "unread" still queued
  char buf[64];
  std::size_t len = 0;
  int fd = -1;
  REQUIRE(lemsg::detail::recv_datagram(a.fd, buf, sizeof buf, len, fd) == Result::Ok);
  CHECK(len == 10);
  CHECK(std::memcmp(buf, "last words", 10) == 0);
  CHECK(lemsg::detail::recv_datagram(a.fd, buf, sizeof buf, len, fd) == Result::Closed);
  // With nothing queued, the reset is simply the end.
  Fd c, d;
  REQUIRE(seqpacket_pair(c, d));
  REQUIRE(lemsg::detail::send_datagram(c.fd, "unread", 6, -1) == Result::Ok);
  d.reset();
  CHECK(lemsg::detail::recv_datagram(c.fd, buf, sizeof buf, len, fd) == Result::Closed);
}

TEST_CASE("transport: a peer that shut down its sending side reads as Closed") {
  Fd a, b;
  REQUIRE(seqpacket_pair(a, b));
  REQUIRE(::shutdown(a.fd, SHUT_WR) == 0);
  char buf[64];
  std::size_t len = 0;
  int fd = -1;
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::Closed);
}

TEST_CASE("transport: an empty datagram from a connected peer is a bad frame, not the end") {
  // SOCK_SEQPACKET reads 0 bytes both at the end of the connection and for
  // an empty datagram. An empty datagram is no frame (shorter than a
  // header); taking it for the end would close a session as "Closed" and
  // hide a misbehaving peer from the log.
  Fd a, b;
  REQUIRE(seqpacket_pair(a, b));
  const int before = testutil::count_open_fds();
  REQUIRE(::send(a.fd, "", 0, MSG_NOSIGNAL) == 0);
  char buf[64];
  std::size_t len = 0;
  int fd = -1;
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::BadFrame);
  CHECK(fd == -1);
  // The connection is still there.
  REQUIRE(lemsg::detail::send_datagram(a.fd, "more", 4, -1) == Result::Ok);
  CHECK(lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd) == Result::Ok);
  CHECK(len == 4);
  // An empty datagram with an fd: the fd comes back with it (the frame
  // layer refuses it as short and closes the fd).
  {
    testutil::Pipe p;
    REQUIRE(testutil::send_fds(a.fd, "", 0, &p.fd[1], 1));
  }
  const Result r = lemsg::detail::recv_datagram(b.fd, buf, sizeof buf, len, fd);
  CHECK((r == Result::Ok || r == Result::BadFrame));
  if (r == Result::Ok) {
    CHECK(len == 0);
    CHECK(fd >= 0);
    if (fd >= 0) ::close(fd);
  }
  CHECK(testutil::count_open_fds() == before);
}

// ---- fds held by messages ----

TEST_CASE("transport: Message::set_fd refuses a directory and a negative fd, leaving the fd the caller's") {
  lemsg::MessagePool<64, 2> pool;
  Message m;
  REQUIRE(pool.create(m) == Result::Ok);
  Fd d(::open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  REQUIRE(d.fd >= 0);
  CHECK(m.set_fd(d.fd) == Result::BadParameter);
  CHECK_FALSE(m.has_fd());
  CHECK(fd_is_open(d.fd));
  CHECK(m.set_fd(-1) == Result::BadParameter);
  CHECK(m.set_fd(-100) == Result::BadParameter);
  CHECK_FALSE(m.has_fd());
  m.release();
  CHECK(fd_is_open(d.fd));  // still open and still ours after the message went
  Message empty;
  testutil::Pipe p;
  CHECK(empty.set_fd(p.fd[0]) == Result::BadParameter);
}

TEST_CASE("transport: a message released with an fd closes it, and take_fd hands it back instead") {
  lemsg::MessagePool<64, 2> pool;
  const int before = testutil::count_open_fds();
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  {
    Message m;
    REQUIRE(pool.create(m) == Result::Ok);
    REQUIRE(m.set_fd(fds[0]) == Result::Ok);
    CHECK(m.has_fd());
    Message copy = m;  // a second reference keeps the fd open
    m.release();
    CHECK(fd_is_open(fds[0]));
    copy.release();
    CHECK_FALSE(fd_is_open(fds[0]));
  }
  {
    Message m;
    REQUIRE(pool.create(m) == Result::Ok);
    REQUIRE(m.set_fd(fds[1]) == Result::Ok);
    CHECK(m.take_fd() == fds[1]);
    CHECK_FALSE(m.has_fd());
    CHECK(m.take_fd() == -1);
    m.release();
    CHECK(fd_is_open(fds[1]));
    ::close(fds[1]);
  }
  {
    // Replacing an attached fd closes the old one.
    int p2[2];
    REQUIRE(::pipe2(p2, O_CLOEXEC) == 0);
    Message m;
    REQUIRE(pool.create(m) == Result::Ok);
    REQUIRE(m.set_fd(p2[0]) == Result::Ok);
    REQUIRE(m.set_fd(p2[1]) == Result::Ok);
    CHECK_FALSE(fd_is_open(p2[0]));
    CHECK(fd_is_open(p2[1]));
  }
  CHECK(testutil::count_open_fds() == before);
  CHECK(pool.in_use() == 0);
}

// ---- service options ----

TEST_CASE("transport: the service's socket file gets the mode from its options") {
  RuntimeDir dir;
  Loop loop;
  lemsg::MessagePool<64, 2> pool;
  char path[256];
  dir.socket("moded", path);
  const mode_t modes[] = {0660, 0600, 0640};
  for (mode_t mode : modes) {
    CAPTURE(mode);
    lemsg::Service svc(loop, kEcho, pool);
    lemsg::ServiceOptions opts;
    opts.mode = mode;
    REQUIRE(svc.advertise("moded", opts) == Result::Ok);
    struct stat st;
    REQUIRE(::stat(path, &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK((st.st_mode & 07777) == mode);
    CHECK(svc.hide() == Result::Ok);
    CHECK(::stat(path, &st) != 0);  // hide() removes the file
  }
  {
    lemsg::Service svc(loop, kEcho, pool);
    REQUIRE(svc.advertise("moded") == Result::Ok);  // default options
    struct stat st;
    REQUIRE(::stat(path, &st) == 0);
    CHECK((st.st_mode & 07777) == 0660);
  }
}

TEST_CASE("transport: the allow-list refuses a client whose uid and gid are not listed") {
  RuntimeDir dir;
  testutil::LogCapture log;  // made before the fork: quiets the server child too
  static uid_t other_uid[1];
  static gid_t other_gid[1];
  other_uid[0] = ::getuid() + 4242;
  other_gid[0] = ::getgid() + 4242;
  ServerArgs args = echo_server("guarded");
  args.options.uids = other_uid;
  args.options.uid_count = 1;
  args.options.gids = other_gid;
  args.options.gid_count = 1;
  ServerChild server(args);
  char path[256];
  dir.socket("guarded", path);
  REQUIRE(testutil::wait_for_path(path, 20000));
  Client c;
  CHECK(c.s.try_open("guarded") == Result::NotPermitted);
  CHECK_FALSE(c.s.is_open());
  CHECK(c.s.open_sync("guarded", 10000) == Result::NotPermitted);
  CHECK_FALSE(c.s.is_open());
  // The asynchronous open ends with NotPermitted as well.
  OpenReport got;
  REQUIRE(start_open(c, "guarded", got) == Result::Ok);
  CHECK(testutil::run_until(c.loop, [&] { return got.calls > 0; }, 20000));
  CHECK(got.calls == 1);
  CHECK(got.r == Result::NotPermitted);
  CHECK_FALSE(c.s.is_open());
  CHECK(log.warnings() > 0);  // the refused open was logged
  CHECK(server.finish() == 0);
}

TEST_CASE("transport: the allow-list lets in a client whose uid or gid is listed") {
  RuntimeDir dir;
  static uid_t uids[2];
  static gid_t gids[2];
  uids[0] = ::getuid() + 4242;
  uids[1] = ::getuid();
  gids[0] = ::getgid() + 4242;
  gids[1] = ::getgid();
  ServerArgs by_uid = echo_server("by-uid");
  by_uid.options.uids = uids;
  by_uid.options.uid_count = 2;
  by_uid.options.gids = gids;
  by_uid.options.gid_count = 1;  // only the other gid: the uid lets us in
  ServerArgs by_gid = echo_server("by-gid");
  by_gid.options.uids = uids;
  by_gid.options.uid_count = 1;  // only the other uid: the gid lets us in
  by_gid.options.gids = gids;
  by_gid.options.gid_count = 2;
  ServerArgs gid_only = echo_server("gid-only");
  gid_only.options.gids = gids + 1;
  gid_only.options.gid_count = 1;
  ServerChild s1(by_uid), s2(by_gid), s3(gid_only);
  const char* names[] = {"by-uid", "by-gid", "gid-only"};
  for (const char* name : names) {
    INFO(doctest::String(name));
    char path[256];
    dir.socket(name, path);
    REQUIRE(testutil::wait_for_path(path, 20000));
    Client c;
    REQUIRE(c.s.try_open(name) == Result::Ok);
    CHECK(c.s.is_open());
    CHECK(echo_once(c.s, "allowed") == Result::Ok);
  }
  CHECK(s1.finish() == 0);
  CHECK(s2.finish() == 0);
  CHECK(s3.finish() == 0);
}

// ---- waiting for a server ----

TEST_CASE("transport: an asynchronous open waits for a server that starts later") {
  RuntimeDir dir;
  Client c;
  OpenReport got;
  REQUIRE(start_open(c, "late", got) == Result::Ok);
  CHECK_FALSE(c.s.is_open());
  // Nothing there yet: the loop runs a while without an answer.
  CHECK_FALSE(testutil::run_until(c.loop, [&] { return got.calls > 0; }, 50));
  ServerChild server(echo_server("late", 100));
  CHECK(testutil::run_until(c.loop, [&] { return got.calls > 0; }, 20000));
  CHECK(got.calls == 1);
  CHECK(got.r == Result::Ok);
  REQUIRE(c.s.is_open());
  CHECK(echo_once(c.s, "late hello") == Result::Ok);
  c.s.close();
  CHECK(server.finish() == 0);
}

TEST_CASE("transport: open_sync waits for a server that starts later") {
  RuntimeDir dir;
  ServerChild server(echo_server("later", 100));
  Client c;
  CHECK(c.s.open_sync("later", 20000) == Result::Ok);
  REQUIRE(c.s.is_open());
  CHECK(echo_once(c.s, "ping") == Result::Ok);
  c.s.close();
  CHECK(server.finish() == 0);
}

TEST_CASE("transport: with no server, open_sync times out and try_open is NotFound") {
  RuntimeDir dir;
  Client c;
  CHECK(c.s.try_open("absent") == Result::NotFound);
  CHECK(c.s.open_sync("absent", 100) == Result::Timeout);
  CHECK_FALSE(c.s.is_open());
  // Also when the runtime dir itself is missing (no inotify watch possible).
  EnvGuard env;
  char missing[128];
  std::snprintf(missing, sizeof missing, "%s/missing", dir.path);
  setenv("LEMSG_RUNTIME_DIR", missing, 1);
  CHECK(c.s.try_open("absent") == Result::NotFound);
  CHECK(c.s.open_sync("absent", 100) == Result::Timeout);
  CHECK(c.s.open_sync("absent", 0) == Result::BadParameter);
  CHECK(c.s.try_open("bad/name") == Result::BadParameter);
}

TEST_CASE("transport: open_sync finds a server whose runtime dir was deleted and made again while it waited") {
  RuntimeDir dir;
  ServerArgs args = echo_server("phoenix", 300);
  args.remove_dir = true;  // the server deletes the dir the client watches, then advertises in a new one
  ServerChild server(args);
  Client c;
  CHECK(c.s.open_sync("phoenix", 20000) == Result::Ok);
  REQUIRE(c.s.is_open());
  CHECK(echo_once(c.s, "back") == Result::Ok);
  c.s.close();
  CHECK(server.finish() == 0);
}

TEST_CASE("transport: an asynchronous open finds a server whose runtime dir was deleted and made again while it waited") {
  RuntimeDir dir;
  Client c;
  OpenReport got;
  REQUIRE(start_open(c, "phoenix", got) == Result::Ok);
  CHECK_FALSE(testutil::run_until(c.loop, [&] { return got.calls > 0; }, 50));  // waiting on the dir
  ServerArgs args = echo_server("phoenix", 100);
  args.remove_dir = true;
  ServerChild server(args);
  CHECK(testutil::run_until(c.loop, [&] { return got.calls > 0; }, 20000));
  CHECK(got.calls == 1);
  CHECK(got.r == Result::Ok);
  REQUIRE(c.s.is_open());
  CHECK(echo_once(c.s, "back again") == Result::Ok);
  c.s.close();
  CHECK(server.finish() == 0);
}

TEST_CASE("transport: open and open_sync wait for a runtime dir that does not exist yet") {
  RuntimeDir dir;
  EnvGuard env;
  char sub[128];
  std::snprintf(sub, sizeof sub, "%s/later", dir.path);
  setenv("LEMSG_RUNTIME_DIR", sub, 1);  // the server's advertise makes it
  {
    ServerChild server(echo_server("nodir", 200));
    Client c;
    CHECK(c.s.open_sync("nodir", 20000) == Result::Ok);
    CHECK(echo_once(c.s, "made") == Result::Ok);
    c.s.close();
    CHECK(server.finish() == 0);
  }
  REQUIRE(::rmdir(sub) == 0);
  {
    Client c;
    OpenReport got;
    REQUIRE(start_open(c, "nodir", got) == Result::Ok);
    CHECK_FALSE(testutil::run_until(c.loop, [&] { return got.calls > 0; }, 50));
    ServerChild server(echo_server("nodir", 100));
    CHECK(testutil::run_until(c.loop, [&] { return got.calls > 0; }, 20000));
    CHECK(got.r == Result::Ok);
    CHECK(echo_once(c.s, "made again") == Result::Ok);
    c.s.close();
    CHECK(server.finish() == 0);
  }
  ::rmdir(sub);
}

// ---- protocol agreement ----

TEST_CASE("transport: a client with another protocol id is refused and the server goes on serving") {
  RuntimeDir dir;
  testutil::LogCapture log;  // made before the fork: quiets the server child too
  ServerChild server(echo_server("proto"));
  char path[256];
  dir.socket("proto", path);
  REQUIRE(testutil::wait_for_path(path, 20000));
  const lemsg::Protocol others[] = {
      {"test.transport.other.v1", 64},
      {"test.transport.echo.v2", 64},
      {"test.transport.echo.v1x", 64},  // the server's id is a prefix of this one
      {"test.transport.echo", 64},      // and this one a prefix of the server's
  };
  for (const lemsg::Protocol& p : others) {
    INFO(doctest::String(p.id));
    Client bad(p);
    CHECK(bad.s.try_open("proto") == Result::ProtocolMismatch);
    CHECK(bad.s.open_sync("proto", 10000) == Result::ProtocolMismatch);
    CHECK_FALSE(bad.s.is_open());
  }
  {
    Client bad(others[0]);
    OpenReport got;
    REQUIRE(start_open(bad, "proto", got) == Result::Ok);
    CHECK(testutil::run_until(bad.loop, [&] { return got.calls > 0; }, 20000));
    CHECK(got.r == Result::ProtocolMismatch);
  }
  Client good;
  REQUIRE(good.s.try_open("proto") == Result::Ok);
  CHECK(echo_once(good.s, "still serving") == Result::Ok);
  good.s.close();
  CHECK(server.finish() == 0);
}

TEST_CASE("transport: a client with another maximum payload is refused with SizeMismatch") {
  RuntimeDir dir;
  testutil::LogCapture log;  // made before the fork: quiets the server child too
  ServerChild server(echo_server("sized"));
  char path[256];
  dir.socket("sized", path);
  REQUIRE(testutil::wait_for_path(path, 20000));
  const lemsg::Protocol smaller{kEcho.id, 32};
  const lemsg::Protocol larger{kEcho.id, 64 + 1};
  {
    Client bad(smaller);
    CHECK(bad.s.try_open("sized") == Result::SizeMismatch);
    CHECK(bad.s.open_sync("sized", 10000) == Result::SizeMismatch);
  }
  {
    lemsg::MessagePool<128, 2> pool;
    Loop loop;
    Session bad(loop, larger, pool);
    REQUIRE(bad.status() == Result::Ok);
    CHECK(bad.try_open("sized") == Result::SizeMismatch);
  }
  Client good;
  REQUIRE(good.s.try_open("sized") == Result::Ok);
  CHECK(echo_once(good.s, "same size") == Result::Ok);
  good.s.close();
  CHECK(server.finish() == 0);
}

// ---- the session table ----

TEST_CASE("transport: a client beyond the session table gets SessionTableFull until one closes") {
  // The server's loop watches its listening socket and one socket per
  // session; a build whose watch table is the smaller limit refuses with
  // WatchTableFull instead.
  constexpr int table = LEMSG_MAX_SESSIONS < LEMSG_MAX_WATCHES - 1 ? LEMSG_MAX_SESSIONS : LEMSG_MAX_WATCHES - 1;
  const Result full = LEMSG_MAX_SESSIONS <= LEMSG_MAX_WATCHES - 1 ? Result::SessionTableFull : Result::WatchTableFull;
  RuntimeDir dir;
  testutil::LogCapture log;  // made before the fork: quiets the server child too
  ServerChild server(echo_server("full"));
  char path[256];
  dir.socket("full", path);
  REQUIRE(testutil::wait_for_path(path, 20000));
  // Each client has its own loop, so the parent's tables never limit the test.
  std::unique_ptr<Client> clients[table];
  for (std::size_t i = 0; i < table; ++i) {
    CAPTURE(i);
    clients[i].reset(new Client);
    REQUIRE(clients[i]->s.status() == Result::Ok);
    REQUIRE(clients[i]->s.try_open("full") == Result::Ok);
  }
  Client extra;
  // Both retry while the table stays full, then say why they gave up.
  CHECK(extra.s.try_open("full") == full);
  CHECK(extra.s.open_sync("full", 300) == full);
  CHECK_FALSE(extra.s.is_open());
  // The ones inside are still served.
  CHECK(echo_once(clients[table - 1]->s, "inside") == Result::Ok);
  // One leaves; the server notices asynchronously, so retry for a while.
  clients[0]->s.close();
  Result r = full;
  const long long end = testutil::now_ms() + 20000;
  while (r == full && testutil::now_ms() < end) {
    r = extra.s.try_open("full");
    if (r == full) usleep(5000);
  }
  CHECK(r == Result::Ok);
  CHECK(extra.s.is_open());
  CHECK(echo_once(extra.s, "got in") == Result::Ok);
  extra.s.close();
  for (auto& c : clients) c.reset();
  CHECK(server.finish() == 0);
}

// ---- socket files: who may create, replace and remove them ----

TEST_CASE("transport: of several processes advertising one name at once exactly one wins, and the losers leave its file") {
  RuntimeDir dir;
  testutil::LogCapture log;  // made before the forks: quiets the children too
  char path[256];
  dir.socket("race", path);
  constexpr int procs = 4;
  const int rounds = 20;
  int multiple_winners = 0;
  for (int round = 0; round < rounds; ++round) {
    CAPTURE(round);
    testutil::Pipe go;  // every child holds its write end until ready; then all start at once
    testutil::Pipe results;
    testutil::Pipe stop[procs];
    pid_t pids[procs];
    for (int i = 0; i < procs; ++i) {
      pids[i] = testutil::spawn([&, i] {
        testutil::die_with_parent();
        results.close_read();
        Loop loop;
        lemsg::MessagePool<64, 2> pool;
        lemsg::Service svc(loop, kEcho, pool);
        CHILD_CHECK(svc.status() == Result::Ok);
        go.close_write();
        char c;
        struct pollfd p = {go.fd[0], POLLIN, 0};
        CHILD_CHECK(::poll(&p, 1, 20000) == 1 && ::read(go.fd[0], &c, 1) == 0);  // end of file: go
        const Result r = svc.advertise("race");
        const char msg[2] = {static_cast<char>('0' + i), r == Result::Ok ? 'W' : r == Result::Duplicate ? 'D' : 'E'};
        CHILD_CHECK(::write(results.fd[1], msg, 2) == 2);
        CHILD_CHECK(stop[i].get(30000) == 'q');
        return 0;  // the Service's destructor runs here: a loser must not remove the winner's file
      });
    }
    go.close_write();
    results.close_write();
    int winner = -1, winners = 0, losers = 0;
    for (int n = 0; n < procs; ++n) {
      const int who = results.get(20000);
      const int what = results.get(20000);
      REQUIRE(who >= '0');
      REQUIRE(who < '0' + procs);
      if (what == 'W') {
        ++winners;
        winner = who - '0';
      } else if (what == 'D') {
        ++losers;
      }
    }
    CHECK(winners == 1);
    CHECK(losers == procs - 1);
    if (winners > 1) ++multiple_winners;
    // The losers leave; the winner's file must stay, and answer.
    for (int i = 0; i < procs; ++i) {
      if (i == winner) continue;
      CHECK(stop[i].put('q'));
      CHECK(testutil::wait_exit(pids[i], 20000) == 0);
    }
    struct stat st;
    CHECK(::lstat(path, &st) == 0);
    int c = -1;
    CHECK(lemsg::detail::connect_to(path, c) == Result::Ok);
    Fd cg(c);
    if (winner >= 0) {
      CHECK(stop[winner].put('q'));
      CHECK(testutil::wait_exit(pids[winner], 20000) == 0);
    }
    CHECK(::lstat(path, &st) != 0);  // the winner removed its own file
    ::unlink(path);
  }
  CHECK(multiple_winners == 0);
}

TEST_CASE("transport: a forked child that destroys its copy of a service leaves the parent's socket file") {
  RuntimeDir dir;
  Loop loop;
  lemsg::MessagePool<64, 2> pool;
  std::unique_ptr<lemsg::Service> svc(new lemsg::Service(loop, kEcho, pool));
  REQUIRE(svc->advertise("forked") == Result::Ok);
  char path[256];
  dir.socket("forked", path);
  struct stat before, after;
  REQUIRE(::lstat(path, &before) == 0);
  // As at exit() with a static Service: its destructor runs in the child.
  pid_t pid = testutil::spawn([&] {
    svc.reset();
    return 0;
  });
  CHECK(testutil::wait_exit(pid, 20000) == 0);
  REQUIRE(::lstat(path, &after) == 0);
  CHECK(after.st_ino == before.st_ino);
  // A child's own hide() leaves it as well.
  pid = testutil::spawn([&] { return svc->hide() == Result::Ok ? 0 : 1; });
  CHECK(testutil::wait_exit(pid, 20000) == 0);
  REQUIRE(::lstat(path, &after) == 0);
  CHECK(after.st_ino == before.st_ino);
  int c = -1;
  CHECK(lemsg::detail::connect_to(path, c) == Result::Ok);  // still the parent's listener
  Fd cg(c);
  CHECK(svc->hide() == Result::Ok);  // the process that advertised removes it
  CHECK(::lstat(path, &after) != 0);
}

TEST_CASE("transport: hide() leaves a socket file that another server put in place of its own") {
  RuntimeDir dir;
  Loop loop;
  lemsg::MessagePool<64, 2> pool;
  lemsg::Service svc(loop, kEcho, pool);
  REQUIRE(svc.advertise("moved") == Result::Ok);
  char path[256];
  dir.socket("moved", path);
  REQUIRE(::unlink(path) == 0);  // someone removed our file, and another server advertised
  int fd = -1;
  REQUIRE(lemsg::detail::listen_at(path, 0660, fd) == Result::Ok);
  Fd other(fd);
  struct stat before, after;
  REQUIRE(::lstat(path, &before) == 0);
  CHECK(svc.hide() == Result::Ok);
  REQUIRE(::lstat(path, &after) == 0);
  CHECK(after.st_ino == before.st_ino);
  int c = -1;
  CHECK(lemsg::detail::connect_to(path, c) == Result::Ok);
  Fd cg(c);
}

TEST_CASE("transport: advertise never replaces a file that is not a socket") {
  RuntimeDir dir;
  testutil::LogCapture log;
  Loop loop;
  lemsg::MessagePool<64, 2> pool;
  lemsg::Service svc(loop, kEcho, pool);
  char path[256];
  dir.socket("taken", path);
  const int f = ::open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
  REQUIRE(f >= 0);
  CHECK(::write(f, "data", 4) == 4);
  ::close(f);
  CHECK(svc.advertise("taken") == Result::Duplicate);
  CHECK_FALSE(svc.is_advertised());
  int fd = -1;
  CHECK(lemsg::detail::listen_at(path, 0660, fd) == Result::Duplicate);
  CHECK(fd == -1);
  struct stat st;
  REQUIRE(::lstat(path, &st) == 0);
  CHECK(S_ISREG(st.st_mode));
  CHECK(st.st_size == 4);
  CHECK(log.count[0] > 0);  // said why, as an error
  REQUIRE(::unlink(path) == 0);
  // Nor a directory, nor a symbolic link (even to a stale socket).
  REQUIRE(::mkdir(path, 0755) == 0);
  CHECK(svc.advertise("taken") == Result::Duplicate);
  REQUIRE(::lstat(path, &st) == 0);
  CHECK(S_ISDIR(st.st_mode));
  REQUIRE(::rmdir(path) == 0);
  char stale[256];
  dir.socket("stale", stale);
  {
    Fd s(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un sa;
    REQUIRE(address_of(stale, sa));
    REQUIRE(::bind(s.fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
  }
  REQUIRE(::symlink(stale, path) == 0);
  CHECK(svc.advertise("taken") == Result::Duplicate);
  REQUIRE(::lstat(path, &st) == 0);
  CHECK(S_ISLNK(st.st_mode));
  REQUIRE(::unlink(path) == 0);
  // A stale socket is replaced.
  CHECK(svc.advertise("stale") == Result::Ok);
  REQUIRE(::lstat(stale, &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK(svc.hide() == Result::Ok);
}

TEST_CASE("transport: the runtime dir a service makes is 0755 whatever the umask") {
  RuntimeDir dir;
  EnvGuard env;
  char sub[128];
  std::snprintf(sub, sizeof sub, "%s/run", dir.path);
  setenv("LEMSG_RUNTIME_DIR", sub, 1);
  Loop loop;
  lemsg::MessagePool<64, 2> pool;
  {
    lemsg::Service svc(loop, kEcho, pool);
    const mode_t old = ::umask(077);
    const Result r = svc.advertise("masked");
    ::umask(old);
    REQUIRE(r == Result::Ok);
    struct stat st;
    REQUIRE(::stat(sub, &st) == 0);
    CHECK(S_ISDIR(st.st_mode));
    CHECK((st.st_mode & 07777) == 0755);
    char path[256];
    std::snprintf(path, sizeof path, "%s/masked", sub);
    REQUIRE(::stat(path, &st) == 0);
    CHECK((st.st_mode & 07777) == 0660);
  }
  CHECK(::rmdir(sub) == 0);
}

TEST_CASE("transport: the socket file gets the group from the service's options") {
  RuntimeDir dir;
  Loop loop;
  lemsg::MessagePool<64, 2> pool;
  lemsg::Service svc(loop, kEcho, pool);
  lemsg::ServiceOptions opts;
  opts.mode = 0660;
  opts.group = ::getegid() == 0 ? 12345 : ::getegid();  // root may give any group; others their own
  REQUIRE(svc.advertise("grouped", opts) == Result::Ok);
  char path[256];
  dir.socket("grouped", path);
  struct stat st;
  REQUIRE(::stat(path, &st) == 0);
  CHECK(st.st_gid == opts.group);
  CHECK((st.st_mode & 07777) == 0660);
  CHECK(svc.hide() == Result::Ok);
}

// ---- the runtime dir must be safe ----

TEST_CASE("transport: a service refuses a runtime dir another user owns or others may write") {
  if (::geteuid() != 0) {
    MESSAGE("skipped: needs root to chown a directory to another user");
    return;
  }
  RuntimeDir dir;
  testutil::LogCapture log;
  Loop loop;
  lemsg::MessagePool<64, 2> pool;
  lemsg::Service svc(loop, kEcho, pool);
  struct Case {
    uid_t owner;
    mode_t mode;
    Result want;
  } const cases[] = {
      {12345, 0755, Result::UnsafeRuntimeDir},  // owned by another user
      {0, 0777, Result::UnsafeRuntimeDir},      // anyone may write
      {0, 0775, Result::UnsafeRuntimeDir},      // its group may write
      {0, 01777, Result::UnsafeRuntimeDir},     // sticky or not: another user could squat the name
      {0, 0755, Result::Ok},
      {0, 0700, Result::Ok},
  };
  for (const Case& c : cases) {
    CAPTURE(c.owner);
    CAPTURE(c.mode);
    REQUIRE(::chown(dir.path, c.owner, static_cast<gid_t>(-1)) == 0);
    REQUIRE(::chmod(dir.path, c.mode) == 0);
    const int errors = log.count[0];
    CHECK(svc.advertise("safe") == c.want);
    if (c.want != Result::Ok) {
      CHECK(log.count[0] > errors);  // and says which directory and why
      CHECK(std::strstr(log.last, dir.path) != nullptr);
    }
    if (svc.is_advertised()) CHECK(svc.hide() == Result::Ok);
  }
  // A directory above it that others may write lets them swap the runtime
  // dir itself, unless it is sticky (like /tmp).
  char sub[128];
  std::snprintf(sub, sizeof sub, "%s/run", dir.path);
  EnvGuard env;
  setenv("LEMSG_RUNTIME_DIR", sub, 1);
  REQUIRE(::chmod(dir.path, 0777) == 0);
  CHECK(svc.advertise("safe") == Result::UnsafeRuntimeDir);
  REQUIRE(::chmod(dir.path, 01777) == 0);
  CHECK(svc.advertise("safe") == Result::Ok);
  CHECK(svc.hide() == Result::Ok);
  REQUIRE(::chown(dir.path, 12345, static_cast<gid_t>(-1)) == 0);
  REQUIRE(::chmod(dir.path, 0755) == 0);
  CHECK(svc.advertise("safe") == Result::UnsafeRuntimeDir);
  REQUIRE(::chown(dir.path, 0, static_cast<gid_t>(-1)) == 0);
  CHECK(::rmdir(sub) == 0);
}

TEST_CASE("transport: a client refuses a runtime dir another user owns or others may write") {
  if (::geteuid() != 0) {
    MESSAGE("skipped: needs root to chown a directory to another user");
    return;
  }
  RuntimeDir dir;
  testutil::LogCapture log;  // made before the fork: quiets the server child too
  ServerChild server(echo_server("impostor"));
  char path[256];
  dir.socket("impostor", path);
  REQUIRE(testutil::wait_for_path(path, 20000));
  // The server is there; only the directory is wrong.
  REQUIRE(::chown(dir.path, 12345, static_cast<gid_t>(-1)) == 0);
  {
    Client c;
    CHECK(c.s.try_open("impostor") == Result::UnsafeRuntimeDir);
    CHECK(c.s.open_sync("impostor", 10000) == Result::UnsafeRuntimeDir);
    CHECK_FALSE(c.s.is_open());
    OpenReport got;
    REQUIRE(start_open(c, "impostor", got) == Result::Ok);
    CHECK(testutil::run_until(c.loop, [&] { return got.calls > 0; }, 20000));
    CHECK(got.calls == 1);
    CHECK(got.r == Result::UnsafeRuntimeDir);
    CHECK_FALSE(c.s.is_open());
  }
  REQUIRE(::chown(dir.path, 0, static_cast<gid_t>(-1)) == 0);
  REQUIRE(::chmod(dir.path, 0777) == 0);
  {
    Client c;
    CHECK(c.s.try_open("impostor") == Result::UnsafeRuntimeDir);
  }
  REQUIRE(::chmod(dir.path, 0755) == 0);
  {
    Client c;
    CHECK(c.s.try_open("impostor") == Result::Ok);
    CHECK(echo_once(c.s, "safe again") == Result::Ok);
  }
  CHECK(server.finish() == 0);
}

TEST_CASE("transport: a client that requires another server uid is refused with UntrustedServer") {
  RuntimeDir dir;
  testutil::LogCapture log;  // made before the fork: quiets the server child too
  ServerChild server(echo_server("root-only"));
  char path[256];
  dir.socket("root-only", path);
  REQUIRE(testutil::wait_for_path(path, 20000));
  {
    Client c;
    c.s.require_server_uid(::geteuid() + 12345);
    const int warnings = log.warnings();
    CHECK(c.s.try_open("root-only") == Result::UntrustedServer);
    CHECK(log.warnings() > warnings);
    CHECK(c.s.open_sync("root-only", 10000) == Result::UntrustedServer);
    CHECK_FALSE(c.s.is_open());
    OpenReport got;
    REQUIRE(start_open(c, "root-only", got) == Result::Ok);
    CHECK(testutil::run_until(c.loop, [&] { return got.calls > 0; }, 20000));
    CHECK(got.calls == 1);
    CHECK(got.r == Result::UntrustedServer);
    CHECK_FALSE(c.s.is_open());
    // The server's real uid lets it in.
    c.s.require_server_uid(::geteuid());
    CHECK(c.s.try_open("root-only") == Result::Ok);
    CHECK(echo_once(c.s, "trusted") == Result::Ok);
    lemsg::Credentials creds;
    REQUIRE(c.s.server_credentials(creds) == Result::Ok);
    CHECK(creds.uid == ::geteuid());
  }
  CHECK(server.finish() == 0);
}

TEST_CASE("transport: a server that cannot create or write its runtime dir gets NoRuntimeDir, not NotPermitted") {
  if (::geteuid() != 0) {
    MESSAGE("skipped: needs root to drop to another uid");
    return;
  }
  RuntimeDir dir;  // root's, 0755: another user may look in, not create
  REQUIRE(::chmod(dir.path, 0755) == 0);
  testutil::LogCapture log;  // made before the fork: quiets the child too
  char sub[128];
  std::snprintf(sub, sizeof sub, "%s/run", dir.path);
  const pid_t pid = testutil::spawn([&] {
    testutil::die_with_parent();
    CHILD_CHECK(::setgroups(0, nullptr) == 0);
    CHILD_CHECK(::setresgid(65534, 65534, 65534) == 0);
    CHILD_CHECK(::setresuid(65534, 65534, 65534) == 0);
    Loop loop;
    lemsg::MessagePool<64, 2> pool;
    lemsg::Service svc(loop, kEcho, pool);
    CHILD_CHECK(svc.status() == Result::Ok);
    setenv("LEMSG_RUNTIME_DIR", sub, 1);  // cannot be created
    CHILD_CHECK(svc.advertise("x") == Result::NoRuntimeDir);
    CHILD_CHECK(std::strstr(log.last, sub) != nullptr);
    setenv("LEMSG_RUNTIME_DIR", dir.path, 1);  // exists, but is not ours to write
    CHILD_CHECK(svc.advertise("x") == Result::NoRuntimeDir);
    CHILD_CHECK(std::strstr(lemsg::to_string(Result::NoRuntimeDir), "LEMSG_RUNTIME_DIR") != nullptr);
    return 0;
  });
  CHECK(testutil::wait_exit(pid, 20000) == 0);
  struct stat st;
  CHECK(::stat(sub, &st) != 0);
  char names[512];
  CHECK(list_dir(dir.path, names, sizeof names) == 0);
}

TEST_CASE("transport: open_sync and try_open refused with SessionTableFull retry within their time and get in when a session closes") {
  // The table is full but a session closes soon: waiting is worth it.
  constexpr int table = LEMSG_MAX_SESSIONS < LEMSG_MAX_WATCHES - 1 ? LEMSG_MAX_SESSIONS : LEMSG_MAX_WATCHES - 1;
  RuntimeDir dir;
  testutil::LogCapture log;
  ServerChild server(echo_server("soon"));
  char path[256];
  dir.socket("soon", path);
  REQUIRE(testutil::wait_for_path(path, 20000));
  std::unique_ptr<Client> clients[table];
  for (std::size_t i = 0; i + 1 < table; ++i) {
    clients[i].reset(new Client);
    REQUIRE(clients[i]->s.try_open("soon") == Result::Ok);
  }
  for (int round = 0; round < 2; ++round) {
    CAPTURE(round);
    // A child takes the last slot and leaves after a moment.
    testutil::Pipe opened;
    const pid_t holder = testutil::spawn([&] {
      testutil::die_with_parent();
      opened.close_read();
      Client c;
      CHILD_CHECK(c.s.try_open("soon") == Result::Ok);
      opened.put('o');
      usleep(300 * 1000);
      return 0;
    });
    opened.close_write();
    REQUIRE(opened.get(20000) == 'o');
    // The table is full now, yet both get in once the holder's session closes.
    Client extra;
    if (round == 0) CHECK(extra.s.open_sync("soon", 20000) == Result::Ok);
    else CHECK(extra.s.try_open("soon") == Result::Ok);
    CHECK(echo_once(extra.s, "waited") == Result::Ok);
    CHECK(testutil::wait_exit(holder, 20000) == 0);
  }
  for (auto& c : clients) c.reset();
  CHECK(server.finish() == 0);
}

}  // TEST_SUITE
