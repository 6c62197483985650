// The programs of section 13, run as tests: examples/lemsg.cpp (the `lemsg`
// tool) and examples/lemsg-dir.cpp (the directory daemon), each main()
// renamed and run in a forked child whose standard output goes to a pipe (no
// exec: under qemu-user a child cannot exec a target binary), so every
// target checks the same code `make install` puts in bin/. Also the
// directory example (examples/directory) end to end.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "messaging_util.hpp"

#include <dirent.h>
#include <sys/stat.h>

#include <cstdlib>

namespace tool {
#define main lemsg_tool_main
#include "examples/lemsg.cpp"
#undef main
}  // namespace tool
namespace dird {
#define main lemsg_dir_main
#include "examples/lemsg-dir.cpp"
#undef main
}  // namespace dird
// One namespace for both: they share location_api.hpp (#pragma once).
namespace location {
#define main location_server_main
#include "examples/directory/server.cpp"
#undef main
#define main location_client_main
#include "examples/directory/client.cpp"
#undef main
}  // namespace location

TEST_SUITE("tools") {
using namespace msgtest;

namespace {

// What a program printed and how it ended.
struct Run {
  int status = -1;
  char out[8192] = {};
  bool has(const char* s) const { return std::strstr(out, s) != nullptr; }
};

// Runs main(argv) in a child; its standard output (and error, when
// `with_err`) is collected. Bounded by kWaitMs.
template <typename Main>
Run run(Main program, std::initializer_list<const char*> args, bool with_err = false) {
  Run r;
  testutil::Pipe out;
  char* argv[16] = {};
  int argc = 0;
  for (const char* a : args)
    if (argc < 15) argv[argc++] = const_cast<char*>(a);
  const pid_t child = testutil::spawn([&] {
    testutil::die_with_parent();
    out.close_read();
    dup2(out.fd[1], 1);
    if (with_err) dup2(out.fd[1], 2);
    lemsg::set_log_level(lemsg::LogLevel::Error);
    const int rc = program(argc, argv);
    std::fflush(nullptr);
    return rc;
  });
  out.close_write();
  std::size_t used = 0;
  for (;;) {
    struct pollfd p = {out.fd[0], POLLIN, 0};
    if (poll(&p, 1, kWaitMs) != 1) break;
    const ssize_t n = read(out.fd[0], r.out + used, sizeof r.out - 1 - used);
    if (n <= 0) break;
    used += static_cast<std::size_t>(n);
    if (used == sizeof r.out - 1) break;
  }
  r.status = testutil::wait_exit(child, kWaitMs);
  return r;
}

int tool_main(int argc, char** argv) { return tool::lemsg_tool_main(argc, argv); }
int dir_main(int argc, char** argv) { return dird::lemsg_dir_main(argc, argv); }

// A file in the runtime dir with `text`; its path in `out`.
bool write_file(const testutil::RuntimeDir& d, const char* name, const char* text, char (&out)[256]) {
  std::snprintf(out, sizeof out, "%s/%s", d.path, name);
  FILE* f = std::fopen(out, "w");
  if (!f) return false;
  const bool ok = std::fputs(text, f) >= 0;
  return std::fclose(f) == 0 && ok;
}

// lemsg-dir itself (its main, with -b FILE) in a child; stopped by SIGTERM.
pid_t start_lemsg_dir(const char* bindings) {
  return testutil::spawn([bindings] {
    testutil::die_with_parent();
    lemsg::set_log_level(lemsg::LogLevel::Error);
    char a0[] = "lemsg-dir", a1[] = "-b";
    char* argv[] = {a0, a1, const_cast<char*>(bindings), nullptr};
    return dird::lemsg_dir_main(3, argv);
  });
}

bool socket_appears(const testutil::RuntimeDir& d, const char* name) {
  char path[256];
  d.socket(name, path);
  return testutil::wait_for_path(path, kWaitMs);
}

}  // namespace

TEST_CASE("tools: lemsg list and lemsg wait in direct mode: live and stale services, up and not up") {
  testutil::TidyRuntimeDir d;
  unsetenv("LEMSG_DIRECTORY");
  Run r = run(tool_main, {"lemsg", "list"});
  CHECK(r.status == 0);
  CHECK(r.has("(no services)"));
  CHECK(run(tool_main, {"lemsg", "wait", "svc-a", "0"}).status == 1);
  CHECK(run(tool_main, {"lemsg", "wait", "svc-a", "200"}).status == 1);
  // A server that appears while `lemsg wait` waits.
  testutil::Pipe ready;
  const pid_t waiter = testutil::spawn([&] {
    testutil::die_with_parent();
    return run(tool_main, {"lemsg", "wait", "svc-a", "20000"}).status;
  });
  Loop loop;
  SmallPool pool;
  Server a(loop, pool);
  REQUIRE(a.svc.advertise("svc-a") == Result::Ok);
  CHECK(run_until_exit(loop, waiter, kWaitMs) == 0);
  // A stale socket file: a server killed with -9 leaves it.
  const pid_t dead = testutil::spawn([&] {
    testutil::die_with_parent();
    Loop l;
    SmallPool p;
    Server b(l, p);
    if (b.svc.advertise("svc-b") != Result::Ok) return 1;
    ready.put('r');
    for (;;) pause();
  });
  REQUIRE(ready.get(kWaitMs) == 'r');
  testutil::kill9(dead);
  // The tool runs in a child while this loop is not running: the live
  // service's answer to its probe (accept) is the kernel's, not the loop's.
  r = run(tool_main, {"lemsg", "list"});
  CHECK(r.status == 0);
  CHECK(r.has("svc-a"));
  CHECK(r.has("live"));
  CHECK(r.has("svc-b"));
  CHECK(r.has("stale"));
  r = run(tool_main, {"lemsg", "list", "--json"});
  CHECK(r.status == 0);
  CHECK(r.has("\"mode\":\"direct\""));
  CHECK(r.has("{\"name\":\"svc-a\",\"state\":\"live\""));
  CHECK(r.has("{\"name\":\"svc-b\",\"state\":\"stale (nobody listens)\""));
  CHECK(run(tool_main, {"lemsg", "wait", "svc-a", "0"}).status == 0);
  CHECK(run(tool_main, {"lemsg", "wait", "svc-b", "0"}).status == 1);
  // Bad command lines.
  CHECK(run(tool_main, {"lemsg"}, true).status == 2);
  CHECK(run(tool_main, {"lemsg", "frobnicate"}, true).status == 2);
  CHECK(run(tool_main, {"lemsg", "wait", "svc-a", "soon"}, true).status == 2);
  CHECK(run(tool_main, {"lemsg", "wait", "../etc", "0"}, true).status == 2);
}

TEST_CASE("tools: lemsg list, bindings and wait in directory mode, against lemsg-dir") {
  testutil::TidyRuntimeDir d;
  setenv("LEMSG_DIRECTORY", "1", 1);
  char bindings[256], line[200];
  const unsigned u = static_cast<unsigned>(geteuid());
  // How the tool names this user: from the passwd file, else the uid.
  char me[80];
  if (!lemsg::detail::user_name(u, me, sizeof me)) std::snprintf(me, sizeof me, "%u", u);
  std::snprintf(line, sizeof line, "# the test's bindings\n%u.front -> %u.back\n", u, u);
  REQUIRE(write_file(d, "bindings", line, bindings));
  // No directory yet: the tool says it cannot reach it.
  Run r = run(tool_main, {"lemsg", "list"}, true);
  CHECK(r.status == 1);
  CHECK(r.has("the directory"));
  const pid_t dir = start_lemsg_dir(bindings);
  REQUIRE(socket_appears(d, "directory"));
  CHECK(run(tool_main, {"lemsg", "wait", "back", "0"}).status == 1);
  // A server registers while `lemsg wait` waits.
  const pid_t waiter = testutil::spawn([&] {
    testutil::die_with_parent();
    return run(tool_main, {"lemsg", "wait", "back", "20000"}).status;
  });
  Loop loop;
  SmallPool pool;
  Server back(loop, pool);
  REQUIRE(back.svc.advertise("back") == Result::Ok);
  CHECK(run_until_exit(loop, waiter, kWaitMs) == 0);
  // (Registered by now: a directory that closed our first try, as a tiny
  // build's may to make room, is asked again from the loop.)
  CHECK(back.svc.is_registered());
  // A client waiting for an interface nobody bound.
  Client lost(loop, pool);
  REQUIRE(lost.open("elsewhere") == Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return false; }, 100) == false);
  char want[200];
  r = run(tool_main, {"lemsg", "list"});
  CHECK(r.status == 0);
  CHECK(r.has("services:"));
  std::snprintf(want, sizeof want, "back                     owner %s", me);
  CHECK(r.has(want));
  CHECK(r.has(kProto.id));
  CHECK(r.has("waits for elsewhere"));
  std::snprintf(want, sizeof want, "%s.front -> %s.back", me, me);
  CHECK(r.has(want));
  r = run(tool_main, {"lemsg", "list", "--json"});
  CHECK(r.status == 0);
  std::snprintf(want, sizeof want,
                "\"services\":[{\"name\":\"back\",\"owner\":\"%s\",\"uid\":%u,\"pid\":%ld,\"protocol\":\"%s\"", me, u,
                static_cast<long>(getpid()), kProto.id);
  CHECK(r.has(want));
  CHECK(r.has("\"waiting\":[{\"interface\":\"elsewhere\""));
  r = run(tool_main, {"lemsg", "bindings"});
  CHECK(r.status == 0);
  std::snprintf(want, sizeof want, "%s.front -> %s.back", me, me);
  CHECK(r.has(want));
  CHECK(!r.has("services:"));
  lost.s.close();
  kill(dir, SIGTERM);
  CHECK(testutil::wait_exit(dir, kWaitMs) == 0);
  unsetenv("LEMSG_DIRECTORY");
}

TEST_CASE("tools: lemsg-dir --check accepts a good bindings file and rejects a bad one with its line") {
  testutil::TidyRuntimeDir d;
  char good[256], bad[256];
  REQUIRE(write_file(d, "good", "# ok\n0.a -> 0.b\n\n1.c -> 2.d  # trailing comment\n", good));
  REQUIRE(write_file(d, "bad", "0.a -> 0.b\n0.c => 0.d\n", bad));
  Run r = run(dir_main, {"lemsg-dir", "--check", good});
  CHECK(r.status == 0);
  CHECK(r.has("2 bindings, no errors"));
  r = run(dir_main, {"lemsg-dir", "--check", bad}, true);
  CHECK(r.status == 1);
  char want[300];
  std::snprintf(want, sizeof want, "%s:2:", bad);
  CHECK(r.has(want));
  r = run(dir_main, {"lemsg-dir", "--check", "/nonexistent/bindings"}, true);
  CHECK(r.status == 1);
  CHECK(r.has("/nonexistent/bindings"));
  CHECK(run(dir_main, {"lemsg-dir", "--frob"}, true).status == 2);
}

TEST_CASE("tools: examples/directory: the client's \"position\" reaches the server's \"location\" through lemsg-dir") {
  testutil::TidyRuntimeDir d;
  setenv("LEMSG_DIRECTORY", "1", 1);
  char bindings[256], line[200];
  const unsigned u = static_cast<unsigned>(geteuid());
  std::snprintf(line, sizeof line, "%u.position -> %u.location\n", u, u);
  REQUIRE(write_file(d, "bindings", line, bindings));
  const pid_t dir = start_lemsg_dir(bindings);
  REQUIRE(socket_appears(d, "directory"));
  // The client first: it waits for its server in the directory.
  const pid_t client = testutil::spawn([] {
    testutil::die_with_parent();
    return location::location_client_main();
  });
  const pid_t server = testutil::spawn([] {
    testutil::die_with_parent();
    return location::location_server_main();
  });
  CHECK(testutil::wait_exit(client, kWaitMs) == 0);
  CHECK(testutil::wait_exit(server, kWaitMs) == 0);
  kill(dir, SIGTERM);
  CHECK(testutil::wait_exit(dir, kWaitMs) == 0);
  unsetenv("LEMSG_DIRECTORY");
}

namespace {

// The info and monitor story, in the mode the environment sets: a server
// child, a client child that sends echo requests until told to stop, and the
// tool in a third child.
void info_and_monitor(const char* mode) {
  testutil::Pipe ready, stop;
  const pid_t server = testutil::spawn([&] {
    testutil::die_with_parent();
    Loop l;
    SmallPool p;
    Server srv(l, p);
    if (srv.svc.advertise("inf") != Result::Ok) return 1;
    ready.put('s');
    return l.run() == Result::Ok ? 0 : 2;
  });
  REQUIRE(ready.get(kWaitMs) == 's');
  const pid_t client = testutil::spawn([&] {
    testutil::die_with_parent();
    stop.close_write();
    Loop l;
    SmallPool p;
    Session c(l, kProto, p);
    if (c.open_sync("inf", kWaitMs) != Result::Ok) return 1;
    Body b{0, 0};
    for (std::uint32_t i = 0; i < 5; ++i)
      if (call(c, OpEcho, i, b) != Result::Ok) return 2;
    ready.put('c');
    // Then one request every few ms, for the monitor, until `stop` is written.
    for (std::uint32_t i = 0;; ++i) {
      struct pollfd pf = {stop.fd[0], POLLIN, 0};
      if (poll(&pf, 1, 5) == 1) break;
      if (stop.get(0) >= 0) break;
      if (call(c, OpEcho, i, b) != Result::Ok) return 3;
      if (i == 0) ready.put('m');
    }
    return 0;
  });
  stop.close_read();
  REQUIRE(ready.get(kWaitMs) == 'c');
  REQUIRE(ready.get(kWaitMs) == 'm');
  Run r = run(tool_main, {"lemsg", "info", "inf"});
  CHECK(r.status == 0);
  char want[200];
  std::snprintf(want, sizeof want, "service   inf (%s mode), pid %ld", mode, static_cast<long>(server));
  CHECK(r.has(want));
  CHECK(r.has(kProto.id));
  CHECK(r.has("sessions  1 "));
  std::snprintf(want, sizeof want, "pid %-7ld", static_cast<long>(client));
  CHECK(r.has(want));
  CHECK(r.has("counters  requests "));
  CHECK(r.has("bad frames 0"));
  r = run(tool_main, {"lemsg", "info", "inf", "--json"});
  CHECK(r.status == 0);
  CHECK(r.has("{\"name\":\"inf\",\"protocol\":"));
  std::snprintf(want, sizeof want, "\"sessions\":[{\"session\":");
  CHECK(r.has(want));
  CHECK(r.has("\"bad_frames\":0"));
  // Four frames: requests in, responses out, with the payload asked for.
  r = run(tool_main, {"lemsg", "monitor", "inf", "4", "--payload"});
  CHECK(r.status == 0);
  CHECK(r.has("monitoring inf"));
  CHECK(r.has(" in  session "));
  CHECK(r.has(" out session "));
  CHECK(r.has("request"));
  CHECK(r.has("response"));
  CHECK(r.has("8 bytes  "));  // a Body and its bytes
  r = run(tool_main, {"lemsg", "monitor", "inf", "2", "--json"});
  CHECK(r.status == 0);
  CHECK(r.has("\"direction\":\""));
  CHECK(r.has("\"size\":8,\"fd\":false"));
  CHECK(run(tool_main, {"lemsg", "info", "no-such-service"}, true).status == 1);
  REQUIRE(stop.put('x'));
  CHECK(testutil::wait_exit(client, kWaitMs) == 0);
  testutil::kill9(server);
}

}  // namespace

TEST_CASE("tools: lemsg info and lemsg monitor in direct mode") {
  testutil::TidyRuntimeDir d;
  unsetenv("LEMSG_DIRECTORY");
  info_and_monitor("direct");
}

TEST_CASE("tools: lemsg info and lemsg monitor in directory mode, the service's socket handed over by lemsg-dir") {
  testutil::TidyRuntimeDir d;
  setenv("LEMSG_DIRECTORY", "1", 1);
  char bindings[256], line[200];
  const unsigned u = static_cast<unsigned>(geteuid());
  std::snprintf(line, sizeof line, "%u.inf -> %u.inf\n", u, u);
  REQUIRE(write_file(d, "bindings", line, bindings));
  const pid_t dir = start_lemsg_dir(bindings);
  REQUIRE(socket_appears(d, "directory"));
  info_and_monitor("directory");
  kill(dir, SIGTERM);
  CHECK(testutil::wait_exit(dir, kWaitMs) == 0);
  unsetenv("LEMSG_DIRECTORY");
}

}  // TEST_SUITE
