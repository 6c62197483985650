// The examples, run as tests: modem, pubsub, window, fdpass, ownloop,
// shutdown and reconnect. Each program's main() is renamed and run in a
// forked process (no exec: under qemu-user a child cannot exec a target
// binary), so every target and configuration of `make test` runs each story
// with the same code `make examples` builds as programs; each client exits 0
// only when it saw all it expected.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

// What examples/ownloop, examples/shutdown and examples/reconnect include:
// here, before the namespaces that wrap them below, so that their own
// #includes are no-ops and no system declaration lands inside a namespace.
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

// Each example's programs in a namespace of their own (tests/example_pair.hpp
// says how). The system headers they include are included above, so the
// wrapping holds only theirs.
namespace modem_example {
#define LEMSG_EXAMPLE_API "examples/modem/modem_api.hpp"
#define LEMSG_EXAMPLE_SERVER "examples/modem/server.cpp"
#define LEMSG_EXAMPLE_CLIENT "examples/modem/client.cpp"
#include "example_pair.hpp"
}  // namespace modem_example

namespace {

// Runs an example's main() in a forked child that dies with this process;
// its output is flushed before _exit, so it shows in the test log.
pid_t spawn_main(int (*program)()) {
  return testutil::spawn([program] {
    testutil::die_with_parent();
    const int rc = program();
    std::fflush(nullptr);
    return rc;
  });
}

}  // namespace

TEST_SUITE("examples") {
  TEST_CASE("examples: the modem client reads the signal, sends an SMS, is refused one and sees three events") {
    testutil::RuntimeDir dir;
    const pid_t server = spawn_main(modem_example::server::run);
    REQUIRE(server > 0);
    const pid_t client = spawn_main(modem_example::client::run);
    REQUIRE(client > 0);
    // The client exits 0 only when it saw all of it; the server exits 0 only
    // when a client came and left.
    CHECK(testutil::wait_exit(client, 30000) == 0);
    CHECK(testutil::wait_exit(server, 30000) == 0);
  }
}

// ---- examples/pubsub, examples/window, examples/fdpass ----------------------
namespace pubsub_example {
#define LEMSG_EXAMPLE_API "examples/pubsub/position_api.hpp"
#define LEMSG_EXAMPLE_SERVER "examples/pubsub/server.cpp"
#define LEMSG_EXAMPLE_CLIENT "examples/pubsub/client.cpp"
#include "example_pair.hpp"
}  // namespace pubsub_example

namespace window_example {
#define LEMSG_EXAMPLE_API "examples/window/adc_api.hpp"
#define LEMSG_EXAMPLE_SERVER "examples/window/server.cpp"
#define LEMSG_EXAMPLE_CLIENT "examples/window/client.cpp"
#include "example_pair.hpp"
}  // namespace window_example

namespace fdpass_example {
#define LEMSG_EXAMPLE_API "examples/fdpass/files_api.hpp"
#define LEMSG_EXAMPLE_SERVER "examples/fdpass/server.cpp"
#define LEMSG_EXAMPLE_CLIENT "examples/fdpass/client.cpp"
#include "example_pair.hpp"
}  // namespace fdpass_example

namespace examples_test {

// Runs an example's server, then its client, each in a forked process, in a
// private runtime directory. The client exits 0 only when it saw all it
// expected; the server exits 0 only when a client came and left. The time
// limits are for the slowest emulator: the programs themselves give up
// within about 20 s.
void run_pair(int (*server_main)(), int (*client_main)()) {
  testutil::TidyRuntimeDir dir;
  const pid_t server = spawn_main(server_main);
  REQUIRE(server > 0);
  const pid_t client = spawn_main(client_main);
  REQUIRE(client > 0);
  CHECK(testutil::wait_exit(client, 40000) == 0);
  CHECK(testutil::wait_exit(server, 40000) == 0);
}

}  // namespace examples_test

TEST_SUITE("examples") {
  TEST_CASE("examples: pubsub: the client takes five fixes in order, unsubscribes, and the server has no subscriber left") {
    examples_test::run_pair(pubsub_example::server::run, pubsub_example::client::run);
  }
  TEST_CASE("examples: window: 40 requests with up to 8 in flight (LEMSG_MAX_PENDING if fewer), every answer right") {
    examples_test::run_pair(window_example::server::run, window_example::client::run);
  }
  TEST_CASE("examples: fdpass: the client reads a sealed file from the descriptor the server handed it") {
    examples_test::run_pair(fdpass_example::server::run, fdpass_example::client::run);
  }
}

// ---- examples/ownloop, examples/shutdown, examples/reconnect ----------------

namespace ownloop_example {
#define LEMSG_EXAMPLE_API "examples/ownloop/sensor_api.hpp"
#define LEMSG_EXAMPLE_SERVER "examples/ownloop/server.cpp"
#define LEMSG_EXAMPLE_CLIENT "examples/ownloop/client.cpp"
#include "example_pair.hpp"
}  // namespace ownloop_example

namespace shutdown_example {
#define LEMSG_EXAMPLE_API "examples/shutdown/daemon_api.hpp"
#define LEMSG_EXAMPLE_SERVER "examples/shutdown/server.cpp"
#define LEMSG_EXAMPLE_CLIENT "examples/shutdown/client.cpp"
#include "example_pair.hpp"
}  // namespace shutdown_example

namespace reconnect_example {
#define LEMSG_EXAMPLE_API "examples/reconnect/gauge_api.hpp"
#define LEMSG_EXAMPLE_SERVER "examples/reconnect/server.cpp"
#define LEMSG_EXAMPLE_CLIENT "examples/reconnect/client.cpp"
#include "example_pair.hpp"
}  // namespace reconnect_example

namespace examples_lifecycle_test {

// Runs `program` (an example's renamed main(), or a lambda around one) in a
// forked child that dies with this process; its output is flushed before
// _exit, so it shows in the test log.
template <typename F>
pid_t start(F program) {
  return testutil::spawn([program] {
    testutil::die_with_parent();
    const int rc = program();
    std::fflush(nullptr);
    return rc;
  });
}

// Asks service `name` for its info until ready(info) is true, at most
// `timeout_ms`: how a test sees that a client got this far, from outside.
template <typename P>
bool wait_info(const char* name, P ready, int timeout_ms) {
  const long long end = testutil::now_ms() + timeout_ms;
  static lemsg::ServiceInfo info;  // about 24 bytes per LEMSG_MAX_SESSIONS: off the stack
  do {
    info = lemsg::ServiceInfo{};
    if (lemsg::query_info(name, info, 1000) == lemsg::Result::Ok && ready(info)) return true;
    usleep(20000);
  } while (testutil::now_ms() < end);
  return false;
}

}  // namespace examples_lifecycle_test

TEST_SUITE("examples") {
  TEST_CASE("examples: ownloop: a server that runs lemsg inside its own poll() loop serves a client") {
    using examples_lifecycle_test::start;
    testutil::RuntimeDir dir;
    const pid_t server = start(ownloop_example::server::run);
    const pid_t client = start(ownloop_example::client::run);
    REQUIRE(server > 0);
    REQUIRE(client > 0);
    // The client exits 0 when it read the sensor and got three samples in
    // order; the server when a client came and left.
    CHECK(testutil::wait_exit(client, 30000) == 0);
    CHECK(testutil::wait_exit(server, 30000) == 0);
  }

  TEST_CASE("examples: shutdown: on SIGTERM the server closes its client's session, removes its socket and exits 0") {
    using examples_lifecycle_test::start;
    testutil::RuntimeDir dir;
    char path[256];
    dir.socket(shutdown_example::kDaemonService, path);
    const pid_t server = start(shutdown_example::server::run);
    REQUIRE(server > 0);
    // The server blocks SIGTERM (for its signalfd) before it advertises:
    // once the socket is there, a SIGTERM is its to handle.
    const bool advertised = testutil::wait_for_path(path, 20000);
    CHECK(advertised);
    const pid_t client = start(shutdown_example::client::run);
    REQUIRE(client > 0);
    // Until the client's GetVersion was answered: its session is open.
    const bool served = advertised && examples_lifecycle_test::wait_info(
        shutdown_example::kDaemonService,
        [](const lemsg::ServiceInfo& i) { return i.session_count == 1 && i.counters.responses >= 1; }, 20000);
    CHECK(served);
    CHECK(kill(server, SIGTERM) == 0);
    // The server exits 0 when it closed every session and its socket file
    // is gone; the client when its close handler ran with Closed.
    CHECK(testutil::wait_exit(server, 30000) == 0);
    CHECK(testutil::wait_exit(client, 30000) == 0);
    CHECK(access(path, F_OK) != 0);
  }

  TEST_CASE("examples: reconnect: the client keeps its session and its events across two kill -9 of the server") {
    using examples_lifecycle_test::start;
    testutil::RuntimeDir dir;
    // Three servers, one after the other; the client, started first, waits
    // for the first and must see all three.
    const pid_t client = start([] { return reconnect_example::client::run_client(3); });
    REQUIRE(client > 0);
    pid_t server = 0;
    for (int round = 0; round < 3; ++round) {
      server = start(reconnect_example::server::run);
      REQUIRE(server > 0);
      if (round == 2) break;  // the last one is left to end with its client
      // Killed once it answered the client's GetLevel and sent it an event
      // (both are in the client's socket then: the client reads them before
      // it sees the server gone).
      const bool served = examples_lifecycle_test::wait_info(
          reconnect_example::kGaugeService,
          [server](const lemsg::ServiceInfo& i) {
            return i.server.pid == server && i.counters.responses >= 1 && i.counters.messages_out >= 1;
          },
          20000);
      CHECK(served);
      testutil::kill9(server);
    }
    // The client exits 0 when it opened three times, lost the server twice,
    // read the level after each open and had events from all three; the last
    // server exits 0 when its client leaves.
    CHECK(testutil::wait_exit(client, 60000) == 0);
    CHECK(testutil::wait_exit(server, 30000) == 0);
  }
}
