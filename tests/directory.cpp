// Section 13, directory mode: the directory (class Directory, the core of
// lemsg-dir), Services that register with it and Sessions that ask it for an
// interface, with real processes (fork without exec), real sockets and real
// kill -9. The directory, and each server, is a forked child; the client is
// this process unless a case needs another uid (then a child that calls
// setresuid: those cases run only as root and say so otherwise).
//
// Every case runs in a private runtime dir with LEMSG_DIRECTORY=1, so the
// same Service and Session code as in direct mode takes the directory path.
// Bindings files are written into the runtime dir; a uid in them is numeric
// (this process's own, unless a case runs as root).
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "messaging_util.hpp"

#include <grp.h>
#include <sys/prctl.h>
#include <sys/stat.h>

TEST_SUITE("directory") {
using namespace msgtest;
using lemsg::Directory;
using lemsg::DirectoryEntry;
using lemsg::DirectoryOptions;

namespace {

// LEMSG_DIRECTORY=1 while it lives, with a private runtime dir.
struct DirEnv : testutil::TidyRuntimeDir {
  char bindings[300];
  DirEnv() {
    setenv("LEMSG_DIRECTORY", "1", 1);
    std::snprintf(bindings, sizeof bindings, "%s/bindings", path);
  }
  ~DirEnv() { unsetenv("LEMSG_DIRECTORY"); }
  // Writes the bindings file: each line as given.
  bool write_bindings(const char* text) const {
    char tmp[320];
    std::snprintf(tmp, sizeof tmp, "%s.new", bindings);
    FILE* f = std::fopen(tmp, "w");
    if (!f) return false;
    const bool ok = std::fputs(text, f) >= 0;
    return std::fclose(f) == 0 && ok && std::rename(tmp, bindings) == 0;
  }
};

// "<uid>.<iface> -> <uid>.<service>\n" for this process's uid on both sides.
inline void own_binding(char* out, std::size_t n, const char* iface, const char* service) {
  const unsigned u = static_cast<unsigned>(geteuid());
  std::snprintf(out, n, "%u.%s -> %u.%s\n", u, iface, u, service);
}

// The directory in a child: started with env's bindings file, SIGHUP
// reloads, SIGTERM stops it. Its exit code: 0 when its fd count after the
// loop equals the count right after start (no fd leaked), 3 when they differ,
// 2 when it could not start. `ready` gets 'r' once it listens.
inline pid_t start_directory(const DirEnv& env, testutil::Pipe& ready) {
  return testutil::spawn([&] {
    testutil::die_with_parent();
    ready.close_read();
    Loop loop;
    int rc = 2;
    {
      Directory dir(loop);
      DirectoryOptions o;
      o.bindings_path = env.bindings;
      char err[256];
      if (dir.start(o, err, sizeof err) != Result::Ok || dir.handle_signals() != Result::Ok) {
        std::fprintf(stderr, "directory: %s\n", err);
        return 2;
      }
      const int base = testutil::count_open_fds();
      ready.put('r');
      Result r = loop.run();
      (void)r;
      const int end = testutil::count_open_fds();
      if (end != base) std::fprintf(stderr, "directory: %d fds at start, %d at the end\n", base, end);
      rc = end == base ? 0 : 3;
    }
    return rc;
  });
}

// A server child: a Service registered as `name` in directory mode that
// echoes (msgtest::Server). It puts 'r' on `ready` when advertise() returned
// Ok, or 'd' for Duplicate, 'p' for NotPermitted, 'f' for RegistryFull, 'e'
// otherwise, then serves until it is killed or `stop` (when given) becomes
// readable; then it exits 0 when its fd count is back to what it was after
// advertise, 3 otherwise.
// Becomes user `uid` (group `uid`, no supplementary groups); the caller is root.
inline bool become(uid_t uid) {
  return setgroups(0, nullptr) == 0 && setresgid(uid, uid, uid) == 0 && setresuid(uid, uid, uid) == 0;
}

inline pid_t start_server(const char* name, testutil::Pipe& ready, testutil::Pipe* stop = nullptr,
                          uid_t as = static_cast<uid_t>(-1)) {
  return testutil::spawn([&] {
    if (as != static_cast<uid_t>(-1) && !become(as)) return 6;
    testutil::die_with_parent();  // after the uid change, which clears it
    ready.close_read();
    if (stop) stop->close_write();
    Loop loop;
    SmallPool pool;
    int rc = 0;
    {
      Server srv(loop, pool);
      const Result r = srv.svc.advertise(name);
      // 'w': Ok, but not registered yet (the directory did not answer).
      const char c = r == Result::Ok && !srv.svc.is_registered() ? 'w'
                     : r == Result::Ok             ? 'r'
                     : r == Result::Duplicate    ? 'd'
                     : r == Result::NotPermitted ? 'p'
                     : r == Result::RegistryFull ? 'f'
                                                 : 'e';
      const int base = testutil::count_open_fds();
      ready.put(c);
      if (c != 'r') return 1;
      bool stopping = false;
      lemsg::WatchId w;
      if (stop && loop.add_watch(stop->fd[0], lemsg::Readable, [&](int, short) { stopping = true; }, w) != Result::Ok)
        return 4;
      while (!stopping) {
        const Result r1 = loop.run_once(1000);
        if (r1 != Result::Ok && r1 != Result::Timeout) return 5;
      }
      if (stop) {
        Result x = loop.remove_watch(w);
        (void)x;
      }
      // Sessions closed by their clients are gone by now; count with the
      // stop pipe's read end still open, as at the start.
      const int end = testutil::count_open_fds();
      if (end != base) std::fprintf(stderr, "server: %d fds at start, %d at the end\n", base, end);
      rc = end == base ? 0 : 3;
    }
    return rc;
  });
}

inline bool ready(testutil::Pipe& p, char want = 'r') { return p.get(kWaitMs) == want; }

// One echo request on an open session.
inline bool echoes(Session& s, std::uint32_t v) {
  Body b{0, 0};
  return call(s, OpEcho, v, b) == Result::Ok && b.value == echo_of(v);
}

// The directory's registered services named `name` (0 or 1).
inline int registered(const char* name) {
  int n = 0;
  const Result r = lemsg::directory_list(
      [&](const DirectoryEntry& e) {
        if (e.kind == DirectoryEntry::Service && std::strcmp(e.name, name) == 0) ++n;
      },
      kWaitMs);
  return r == Result::Ok ? n : -1;
}

// Waits (bounded) until the directory has `name` registered `want` times.
inline bool registered_becomes(const char* name, int want) {
  const long long end = testutil::now_ms() + kWaitMs;
  while (testutil::now_ms() < end) {
    if (registered(name) == want) return true;
    usleep(5000);
  }
  return false;
}

// Opens `n` connections asking the directory at `path` to wait for
// interface `name`, one at a time, each seen waiting (directory_list) before
// the next: more than the directory's silent-connection share unread at
// once would make it close the oldest. The fds go to `fds`; false on failure.
inline bool hold_waiting(const char* path, const char* name, int* fds, int n) {
  lemsg::detail::dirwire::Record req;
  req.op = lemsg::detail::dirwire::Open;
  req.flags = lemsg::detail::dirwire::FlagWait;
  std::snprintf(req.name, sizeof req.name, "%s", name);
  auto waiting_now = [] {
    int seen = 0;
    const Result r = lemsg::directory_list(
        [&](const DirectoryEntry& e) { seen += e.kind == DirectoryEntry::WaitingClient; }, kWaitMs);
    return r == Result::Ok ? seen : -1;
  };
  // Clients already waiting when we began. (-1: the List was closed to
  // make room, as a tiny build's directory may: ask again.)
  int before = -1;
  const long long start_end = testutil::now_ms() + kWaitMs;
  while (before < 0 && testutil::now_ms() < start_end) before = waiting_now();
  if (before < 0) return false;
  // A request may be dropped before the directory reads it: a tiny build's
  // directory keeps 2 connections that have not spoken, and closes the
  // oldest for a new one, which on a loaded machine can be this request
  // rather than a listing of ours it has not reaped yet. A request that does
  // not show up as waiting within 5 s is asked again, until kWaitMs.
  for (int i = 0; i < n; ++i) {
    const long long end = testutil::now_ms() + kWaitMs;
    bool held = false;
    while (!held && testutil::now_ms() < end) {
      if (lemsg::detail::dirwire::ask(path, req, fds[i]) != Result::Ok) continue;
      const long long settle = testutil::now_ms() + 5000;
      int seen = 0;
      do {
        seen = waiting_now();
      } while (seen < before + i + 1 && testutil::now_ms() < settle);
      held = seen >= before + i + 1;
      if (!held) ::close(fds[i]);
    }
    if (!held) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("directory: a bound client opens through the directory; the session is direct and carries requests") {
  DirEnv env;
  char line[200];
  own_binding(line, sizeof line, "echo-client", "echo");
  REQUIRE(env.write_bindings(line));
  testutil::Pipe dready, sready;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));
  const pid_t srv = start_server("echo", sready);
  REQUIRE(ready(sready));

  Loop loop;
  SmallPool pool;
  Session s(loop, kProto, pool);
  // The client's own name for the interface, not the service's.
  REQUIRE(s.open_sync("echo-client", kWaitMs) == Result::Ok);
  lemsg::Credentials c;
  REQUIRE(s.server_credentials(c) == Result::Ok);
  CHECK(c.pid == srv);  // the server, as the directory saw it: not the directory
  CHECK(c.uid == geteuid());
  for (std::uint32_t i = 0; i < 20; ++i) CHECK(echoes(s, i));
  s.close();

  // The directory is off the path: kill it, and a session opened before
  // carries on.
  REQUIRE(s.open_sync("echo-client", kWaitMs) == Result::Ok);
  testutil::kill9(dir);
  for (std::uint32_t i = 0; i < 20; ++i) CHECK(echoes(s, 100 + i));
  s.close();
  testutil::kill9(srv);
}

TEST_CASE("directory: try_open is NotPermitted without a binding and NotFound while the bound server is away") {
  DirEnv env;
  char line[200];
  own_binding(line, sizeof line, "bound", "svc");
  REQUIRE(env.write_bindings(line));
  Loop loop;
  SmallPool pool;
  Session s(loop, kProto, pool);
  // No directory at all: nothing to ask.
  CHECK(s.try_open("bound") == Result::NotFound);
  testutil::Pipe dready, sready;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));
  CHECK(s.try_open("unbound") == Result::NotPermitted);
  CHECK(s.try_open("bound") == Result::NotFound);
  CHECK(s.try_open("bad/name") == Result::BadParameter);
  // Waiting, an unbound client times out (the directory holds it meanwhile).
  CHECK(s.open_sync("unbound", 200) == Result::Timeout);
  const pid_t srv = start_server("svc", sready);
  REQUIRE(ready(sready));
  CHECK(s.try_open("bound") == Result::Ok);
  CHECK(echoes(s, 7));
  s.close();
  CHECK(s.try_open("unbound") == Result::NotPermitted);
  testutil::kill9(srv);
  testutil::kill9(dir);
}

TEST_CASE("directory: clients waiting for a server that starts later are handed over when it registers") {
  DirEnv env;
  char line[200];
  own_binding(line, sizeof line, "later", "late-svc");
  REQUIRE(env.write_bindings(line));
  testutil::Pipe dready, sready;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));

  Loop loop;
  SmallPool pool;
  // An asynchronous client waits in the directory (no polling: nothing runs
  // until the directory answers) ...
  Client async(loop, pool);
  REQUIRE(async.open("later") == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return false; }, 100) == false);
  CHECK(async.opens == 0);
  // ... and so does a synchronous one, in a child, when the directory lets
  // one user have two waiting (a tiny build may not).
  const bool two = geteuid() == 0 || (LEMSG_DIR_MAX_WAITING + 1) / 2 >= 2;
  const pid_t sync_client = !two ? 0 : testutil::spawn([&] {
    testutil::die_with_parent();
    Loop l;
    SmallPool p;
    Session s(l, kProto, p);
    if (s.open_sync("later", kWaitMs) != Result::Ok) return 1;
    return echoes(s, 5) ? 0 : 2;
  });
  int waiting = 0;
  const long long end = testutil::now_ms() + kWaitMs;
  while (waiting < 1 + two && testutil::now_ms() < end) {
    // (A List may be closed to make room in a tiny build's directory: look again.)
    int n = 0;
    if (lemsg::directory_list(
            [&](const DirectoryEntry& e) {
              if (e.kind == DirectoryEntry::WaitingClient && std::strcmp(e.name, "later") == 0) ++n;
            },
            kWaitMs) == Result::Ok)
      waiting = n;
    if (waiting < 1 + two) usleep(5000);
  }
  CHECK(waiting == 1 + two);
  const pid_t srv = start_server("late-svc", sready);
  REQUIRE(ready(sready));
  CHECK(testutil::run_until(loop, [&] { return async.opens == 1; }, kWaitMs));
  CHECK(async.open_result == Result::Ok);
  CHECK(echoes(async.s, 9));
  if (two) CHECK(testutil::wait_exit(sync_client, kWaitMs) == 0);
  async.s.close();
  testutil::kill9(srv);
  testutil::kill9(dir);
}

TEST_CASE("directory: a binding added by SIGHUP reaches a client already waiting; a bad file keeps the old bindings") {
  DirEnv env;
  REQUIRE(env.write_bindings("# nothing bound yet\n"));
  testutil::Pipe dready, sready;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));
  const pid_t srv = start_server("hup-svc", sready);
  REQUIRE(ready(sready));
  Loop loop;
  SmallPool pool;
  Session probe(loop, kProto, pool);
  CHECK(probe.try_open("hup") == Result::NotPermitted);
  Client c(loop, pool);
  REQUIRE(c.open("hup") == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return c.opens > 0; }, 200) == false);
  char line[200];
  own_binding(line, sizeof line, "hup", "hup-svc");
  REQUIRE(env.write_bindings(line));
  REQUIRE(kill(dir, SIGHUP) == 0);
  CHECK(testutil::run_until(loop, [&] { return c.opens == 1; }, kWaitMs));
  CHECK(c.open_result == Result::Ok);
  CHECK(echoes(c.s, 1));
  // A file with an error: the directory logs it and keeps what it had.
  REQUIRE(env.write_bindings("this is not a binding\n"));
  REQUIRE(kill(dir, SIGHUP) == 0);
  // The signal is pending before the first List connects: once that List
  // is answered, the reload has run (the same dispatch or an earlier one),
  // so the second List and the open below come after it.
  int bound = -1;
  for (int i = 0; i < 2; ++i) {
    bound = 0;
    CHECK(lemsg::directory_list([&](const DirectoryEntry& e) { bound += e.kind == DirectoryEntry::Binding; },
                                kWaitMs) == Result::Ok);
  }
  CHECK(bound == 1);
  CHECK(probe.try_open("hup") == Result::Ok);
  probe.close();
  // Removing the binding: new opens are refused; the session handed over
  // before goes on (the directory is not on its path).
  REQUIRE(env.write_bindings("# none\n"));
  REQUIRE(kill(dir, SIGHUP) == 0);
  const long long end = testutil::now_ms() + kWaitMs;
  Result r = Result::Ok;
  while (testutil::now_ms() < end) {
    r = probe.try_open("hup");
    if (r == Result::Ok) probe.close();
    if (r == Result::NotPermitted) break;
    usleep(5000);
  }
  CHECK(r == Result::NotPermitted);
  CHECK(echoes(c.s, 2));
  c.s.close();
  testutil::kill9(srv);
  testutil::kill9(dir);
}

TEST_CASE("directory: a second server registering a name gets Duplicate and the first is untouched; a dead server is unregistered at once") {
  DirEnv env;
  char line[200];
  own_binding(line, sizeof line, "dup", "dup-svc");
  REQUIRE(env.write_bindings(line));
  testutil::Pipe dready, s1, s2, s3;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));
  const pid_t first = start_server("dup-svc", s1);
  REQUIRE(ready(s1));
  const pid_t second = start_server("dup-svc", s2);
  CHECK(ready(s2, 'd'));
  CHECK(testutil::wait_exit(second, kWaitMs) == 1);
  Loop loop;
  SmallPool pool;
  Session s(loop, kProto, pool);
  REQUIRE(s.open_sync("dup", kWaitMs) == Result::Ok);
  lemsg::Credentials c;
  REQUIRE(s.server_credentials(c) == Result::Ok);
  CHECK(c.pid == first);
  CHECK(echoes(s, 3));
  CHECK(registered("dup-svc") == 1);
  testutil::kill9(first);
  // Unregistered as soon as the directory sees the hang-up.
  CHECK(registered_becomes("dup-svc", 0));
  s.close();
  CHECK(s.try_open("dup") == Result::NotFound);
  // A new server takes the name.
  const pid_t third = start_server("dup-svc", s3);
  REQUIRE(ready(s3));
  REQUIRE(s.open_sync("dup", kWaitMs) == Result::Ok);
  REQUIRE(s.server_credentials(c) == Result::Ok);
  CHECK(c.pid == third);
  s.close();
  testutil::kill9(third);
  testutil::kill9(dir);
}

TEST_CASE("directory: kill -9 of the directory under load: sessions carry on with 0 errors, servers register again, waiting clients keep waiting") {
  DirEnv env;
  char line[400];
  own_binding(line, sizeof line, "load", "load-svc");
  char more[200];
  own_binding(more, sizeof more, "idle", "idle-svc");
  std::strncat(line, more, sizeof line - std::strlen(line) - 1);
  REQUIRE(env.write_bindings(line));
  testutil::Pipe d1, d2, sready;
  pid_t dir = start_directory(env, d1);
  REQUIRE(ready(d1));
  const pid_t srv = start_server("load-svc", sready);
  REQUIRE(ready(sready));

  // Two clients in children send requests throughout.
  testutil::Pipe go;
  auto loader = [&] {
    return testutil::spawn([&] {
      testutil::die_with_parent();
      Loop l;
      SmallPool p;
      Session s(l, kProto, p);
      if (s.open_sync("load", kWaitMs) != Result::Ok) return 1;
      int errors = 0;
      std::uint32_t i = 0;
      // Until the parent writes to `go` (not consumed: both loaders see it).
      for (;;) {
        struct pollfd pf = {go.fd[0], POLLIN, 0};
        if (poll(&pf, 1, 0) == 1) break;
        if (!echoes(s, i++)) ++errors;
      }
      return errors == 0 && i > 0 ? 0 : 2;
    });
  };
  const pid_t a = loader(), b = loader();
  // A client waiting for a server that is not there yet.
  Loop loop;
  SmallPool pool;
  Client waiter(loop, pool);
  REQUIRE(waiter.open("idle") == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return false; }, 100) == false);

  testutil::kill9(dir);
  CHECK(testutil::run_until(loop, [&] { return false; }, 200) == false);  // the waiter notices, and waits for the directory
  CHECK(waiter.opens == 0);
  // A synchronous client that starts while no directory runs waits for one.
  const pid_t sync_waiter = testutil::spawn([&] {
    testutil::die_with_parent();
    Loop l;
    SmallPool p;
    Session s(l, kProto, p);
    if (s.open_sync("idle", kWaitMs) != Result::Ok) return 1;
    return echoes(s, 6) ? 0 : 2;
  });
  usleep(100000);  // (not needed for correctness: lets it reach its wait)
  dir = start_directory(env, d2);
  REQUIRE(ready(d2));
  // The server is back in the directory by itself.
  CHECK(registered_becomes("load-svc", 1));
  // The waiting client asked again: a server for it now hands it over.
  testutil::Pipe iready;
  const pid_t idle = start_server("idle-svc", iready);
  REQUIRE(ready(iready));
  CHECK(testutil::run_until(loop, [&] { return waiter.opens == 1; }, kWaitMs));
  CHECK(waiter.open_result == Result::Ok);
  CHECK(echoes(waiter.s, 4));
  waiter.s.close();
  CHECK(testutil::wait_exit(sync_waiter, kWaitMs) == 0);
  // And new clients find the load server through the new directory.
  Session s(loop, kProto, pool);
  CHECK(s.open_sync("load", kWaitMs) == Result::Ok);
  CHECK(echoes(s, 8));
  s.close();
  REQUIRE(go.put('x'));
  CHECK(testutil::wait_exit(a, kWaitMs) == 0);
  CHECK(testutil::wait_exit(b, kWaitMs) == 0);
  testutil::kill9(idle);
  testutil::kill9(srv);
  testutil::kill9(dir);
}

TEST_CASE("directory: 1,000 opens through the directory leave the fd counts of client, server and directory where they began") {
  DirEnv env;
  char line[200];
  own_binding(line, sizeof line, "many", "many-svc");
  REQUIRE(env.write_bindings(line));
  testutil::Pipe dready, sready, stop;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));
  const pid_t srv = start_server("many-svc", sready, &stop);
  REQUIRE(ready(sready));
  stop.close_read();
  Loop loop;
  SmallPool pool;
  Session s(loop, kProto, pool);
  // One open first: the client's lazily made fds (none expected) are counted.
  REQUIRE(s.open_sync("many", kWaitMs) == Result::Ok);
  s.close();
  const int base = testutil::count_open_fds();
  int failed = 0;
  for (int i = 0; i < 1000; ++i) {
    if (s.open_sync("many", kWaitMs) != Result::Ok) {
      ++failed;
      continue;
    }
    if (i % 100 == 0 && !echoes(s, static_cast<std::uint32_t>(i))) ++failed;
    s.close();
  }
  CHECK(failed == 0);
  CHECK(testutil::count_open_fds() == base);
  // The server sees each close; let it finish, then it compares its count.
  usleep(100000);
  REQUIRE(stop.put('x'));
  CHECK(testutil::wait_exit(srv, kWaitMs) == 0);
  REQUIRE(kill(dir, SIGTERM) == 0);
  CHECK(testutil::wait_exit(dir, kWaitMs) == 0);
}

TEST_CASE("directory: what the directory is sent wrong closes that connection only") {
  DirEnv env;
  char line[200];
  own_binding(line, sizeof line, "ok", "ok-svc");
  REQUIRE(env.write_bindings(line));
  testutil::Pipe dready, sready;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));
  const pid_t srv = start_server("ok-svc", sready);
  REQUIRE(ready(sready));
  char path[256];
  env.socket("directory", path);
  auto closed_by_directory = [&](int fd) {
    char buf[64];
    for (;;) {
      const long n = raw_recv(fd, buf, sizeof buf, kWaitMs);
      if (n <= 0) return n == 0;
    }
  };
  // Garbage, a short frame, a wrong length, an unknown op, a name with a NUL, an fd.
  {
    const int fd = raw_connect(path);
    REQUIRE(fd >= 0);
    CHECK(send(fd, "garbage!", 8, MSG_NOSIGNAL) == 8);
    CHECK(closed_by_directory(fd));
    close(fd);
  }
  auto frame = [](unsigned char* buf, std::uint8_t op, std::uint8_t nl, const char* name, std::uint32_t extra) {
    const std::uint32_t len = static_cast<std::uint32_t>(20 + nl + extra);
    lemsg::wire::encode(lemsg::wire::Header{lemsg::wire::FrameType::Message, 0, 0, len}, buf);
    unsigned char* p = buf + lemsg::wire::header_size;
    std::memset(p, 0, 20);
    p[0] = op;
    p[2] = nl;
    std::memcpy(p + 20, name, nl);
    return lemsg::wire::header_size + len;
  };
  struct Bad {
    std::uint8_t op, nl;
    const char* name;
    std::uint32_t extra;  // bytes the lengths do not account for
  } bads[] = {{9, 2, "ok", 0}, {2, 2, "o\0", 0}, {2, 2, "ok", 3}, {2, 0, "", 0}, {2, 3, "../", 0}};
  for (const Bad& b : bads) {
    unsigned char buf[128] = {};
    const std::size_t n = frame(buf, b.op, b.nl, b.name, b.extra);
    const int fd = raw_connect(path);
    REQUIRE(fd >= 0);
    CHECK(send(fd, buf, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n));
    CHECK(closed_by_directory(fd));
    close(fd);
  }
  {
    unsigned char buf[128] = {};
    const std::size_t n = frame(buf, 2, 2, "ok", 0);
    const int fd = raw_connect(path);
    REQUIRE(fd >= 0);
    const int fds[1] = {0};
    CHECK(testutil::send_fds(fd, buf, n, fds, 1));
    CHECK(closed_by_directory(fd));
    close(fd);
  }
  // Silent connections: more than the directory holds, from one uid. They
  // do not lock a real client out: the oldest make room.
  int silent[LEMSG_DIR_MAX_CONNECTIONS + 4];
  for (int& fd : silent) {
    fd = raw_connect(path);
    CHECK(fd >= 0);
  }
  Loop loop;
  SmallPool pool;
  Session s(loop, kProto, pool);
  CHECK(s.open_sync("ok", kWaitMs) == Result::Ok);
  CHECK(echoes(s, 11));
  s.close();
  for (int fd : silent)
    if (fd >= 0) close(fd);
  testutil::kill9(srv);
  testutil::kill9(dir);
}

namespace {
// Clients the directory lists as waiting (-1 when it does not answer).
int waiting_clients() {
  int n = 0;
  const Result r = lemsg::directory_list(
      [&](const DirectoryEntry& e) {
        if (e.kind == DirectoryEntry::WaitingClient) ++n;
      },
      kWaitMs);
  return r == Result::Ok ? n : -1;
}

// A client child that asks for unbound interface "unbound" (waiting for a
// binding) and queues its hello behind the question, as a Session does.
// Without `own_socket` it waits until the directory lists it, then dies.
// With `own_socket` it then sends its own socket as an fd too (which, left
// in the directory's receive queue, would keep the connection alive after
// the client died) and waits for the directory to end the wait (hang-up),
// then dies. Returns whether the directory lists no waiting client after.
bool dead_waiting_client_is_forgotten(bool own_socket) {
  char path[sizeof(sockaddr_un::sun_path)];
  lemsg::detail::directory_path(path);
  const pid_t client = testutil::spawn([&] {
    // A silent connection may be closed to make room for the list's own
    // (tiny builds hold one): then ask again.
    for (int attempt = 0; attempt < 50; ++attempt) {
      const int fd = raw_connect(path);
      if (fd < 0) return 2;
      lemsg::detail::dirwire::Record req;
      req.op = lemsg::detail::dirwire::Open;
      req.flags = lemsg::detail::dirwire::FlagWait;
      lemsg::detail::dirwire::set_text(req.name, sizeof req.name, "unbound");
      if (lemsg::detail::dirwire::send(fd, req) != Result::Ok) return 3;
      if (!raw_hello(fd, kProto)) return 4;
      // Until the directory lists it.
      bool listed = false;
      for (int i = 0; i < 1000 && !listed; ++i) {
        listed = waiting_clients() == 1;
        struct pollfd p = {fd, 0, 0};
        if (!listed && poll(&p, 1, 0) == 1) break;  // closed by the directory to make room
        if (!listed) usleep(2000);
      }
      if (!listed) {
        close(fd);
        continue;
      }
      if (!own_socket) return 0;  // dies, closing nothing itself
      if (!testutil::send_fds(fd, "x", 1, &fd, 1)) return 5;
      struct pollfd p = {fd, 0, 0};
      return poll(&p, 1, kWaitMs) == 1 && (p.revents & POLLHUP) ? 0 : 7;
    }
    return 6;
  });
  REQUIRE(testutil::wait_exit(client, kWaitMs) == 0);
  for (int i = 0; i < 200; ++i) {
    if (waiting_clients() == 0) return true;
    usleep(10000);
  }
  return false;
}
}  // namespace

TEST_CASE("directory: a waiting client that dies is forgotten at once") {
  DirEnv env;
  REQUIRE(env.write_bindings("# nothing bound\n"));
  testutil::Pipe dready;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));
  CHECK(dead_waiting_client_is_forgotten(false));
  testutil::kill9(dir);
}

// Found by the directory fuzz target: a waiting client's connection was
// watched for the hang-up only, and a client that queued its own socket as
// an fd behind its question kept its connection alive in the directory's
// receive queue after it died, its waiting slot and an fd taken until its
// server registered. The directory now reads what a waiting client sends
// (its hello, forwarded with the hand-over) and ends the wait on anything
// else.
TEST_CASE("directory: a waiting client that dies after passing its own socket is forgotten") {
  DirEnv env;
  REQUIRE(env.write_bindings("# nothing bound\n"));
  testutil::Pipe dready;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));
  CHECK(dead_waiting_client_is_forgotten(true));
  testutil::kill9(dir);
}

TEST_CASE("directory: capacities: RegistryFull past LEMSG_DIR_MAX_SERVICES, WaitTableFull past LEMSG_DIR_MAX_WAITING") {
  DirEnv env;
  REQUIRE(env.write_bindings("# none\n"));
  testutil::Pipe dready;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));
  pid_t servers[LEMSG_DIR_MAX_SERVICES];
  testutil::Pipe pipes[LEMSG_DIR_MAX_SERVICES + 1];
  for (int i = 0; i < LEMSG_DIR_MAX_SERVICES; ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "cap-%d", i);
    servers[i] = start_server(name, pipes[i]);
    CHECK(ready(pipes[i]));
  }
  const pid_t extra = start_server("cap-extra", pipes[LEMSG_DIR_MAX_SERVICES]);
  CHECK(ready(pipes[LEMSG_DIR_MAX_SERVICES], 'f'));
  CHECK(testutil::wait_exit(extra, kWaitMs) == 1);
  for (pid_t p : servers) testutil::kill9(p);

  // Waiting clients: a uid other than root holds at most half the table
  // (so one user cannot lock the others out); root may fill it. Unbound
  // clients wait too (for a binding).
  const int fill = geteuid() == 0 ? LEMSG_DIR_MAX_WAITING : (LEMSG_DIR_MAX_WAITING + 1) / 2;
  char path[256];
  env.socket("directory", path);
  int waiting[LEMSG_DIR_MAX_WAITING];
  REQUIRE(hold_waiting(path, "nobody", waiting, fill));
  Loop loop;
  SmallPool pool;
  Session one_more(loop, kProto, pool);
  CHECK(one_more.open_sync("nobody", kWaitMs) == Result::WaitTableFull);
  for (int i = 0; i < fill; ++i) close(waiting[i]);
  testutil::kill9(dir);
}

TEST_CASE("directory: bindings by uid: the bound user opens, others are NotPermitted, and nobody squats a bound name") {
  if (geteuid() != 0) {
    MESSAGE("not root: the cases with several users need setresuid; skipped");
    return;
  }
  DirEnv env;
  REQUIRE(chmod(env.path, 0755) == 0);  // the other users reach the directory's socket
  // uid 2001's "modem" is uid 2003's "modem-svc"; 2002 has no binding.
  REQUIRE(env.write_bindings("2001.modem -> 2003.modem-svc\n2002.other -> 2003.other-svc\n"));
  testutil::Pipe dready, squat, sready;
  const pid_t dir = start_directory(env, dready);
  REQUIRE(ready(dready));
  // Another user registering the bound name first is refused.
  const pid_t squatter = start_server("modem-svc", squat, nullptr, 2002);
  CHECK(ready(squat, 'p'));
  CHECK(testutil::wait_exit(squatter, kWaitMs) == 1);
  const pid_t srv = start_server("modem-svc", sready, nullptr, 2003);
  REQUIRE(ready(sready));
  auto client = [&](uid_t as, auto&& body) {
    return testutil::spawn([&] {
      if (!become(as)) return 6;
      testutil::die_with_parent();
      Loop l;
      SmallPool p;
      Session s(l, kProto, p);
      return body(s);
    });
  };
  const pid_t bound = client(2001, [](Session& s) {
    if (s.open_sync("modem", kWaitMs) != Result::Ok) return 1;
    lemsg::Credentials c;
    if (s.server_credentials(c) != Result::Ok || c.uid != 2003 || c.gid != 2003) return 2;
    return echoes(s, 42) ? 0 : 3;
  });
  CHECK(testutil::wait_exit(bound, kWaitMs) == 0);
  const pid_t unbound = client(2002, [](Session& s) {
    if (s.try_open("modem") != Result::NotPermitted) return 1;
    // Bound, but to a service that is not registered: NotFound.
    if (s.try_open("other") != Result::NotFound) return 2;
    // Waiting, it is held until its timeout: never handed to 2003's service.
    return s.open_sync("modem", 300) == Result::Timeout ? 0 : 3;
  });
  CHECK(testutil::wait_exit(unbound, kWaitMs) == 0);
  // A client that asks for its server to be a given user, and the directory
  // names another: UntrustedServer, before anything reaches that server.
  const pid_t picky = client(2001, [](Session& s) {
    s.require_server_uid(0);
    return s.try_open("modem") == Result::UntrustedServer ? 0 : 1;
  });
  CHECK(testutil::wait_exit(picky, kWaitMs) == 0);
  // One user's flood of waiting clients takes half the directory's table,
  // not all of it: another user still gets through.
  testutil::Pipe flooded, done;
  char path[256];
  env.socket("directory", path);
  const pid_t flood = testutil::spawn([&] {
    if (!become(2002)) return 6;
    testutil::die_with_parent();
    done.close_write();
    int fds[LEMSG_DIR_MAX_WAITING];
    if (!hold_waiting(path, "modem", fds, (LEMSG_DIR_MAX_WAITING + 1) / 2)) return 1;
    Loop l;
    SmallPool p;
    Session s(l, kProto, p);
    // Once its share waits, the next one is refused.
    if (s.open_sync("modem", kWaitMs) != Result::WaitTableFull) return 2;
    flooded.put('f');
    (void)done.get(kWaitMs);  // holds them until the parent has checked
    return 0;
  });
  done.close_read();
  CHECK(flooded.get(kWaitMs) == 'f');
  const pid_t other = client(2001, [](Session& s) { return s.open_sync("modem", kWaitMs) == Result::Ok ? 0 : 1; });
  CHECK(testutil::wait_exit(other, kWaitMs) == 0);
  done.put('x');
  CHECK(testutil::wait_exit(flood, kWaitMs) == 0);
  // Root has no binding either: bindings are per user.
  Loop loop;
  SmallPool pool;
  Session s(loop, kProto, pool);
  CHECK(s.try_open("modem") == Result::NotPermitted);
  testutil::kill9(srv);
  testutil::kill9(dir);
}

}  // TEST_SUITE
