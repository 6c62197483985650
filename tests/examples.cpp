// The examples, run as tests. examples/modem: its server and its client, each
// main() renamed and run in a forked process (no exec: under qemu-user a
// child cannot exec a target binary), so every target and configuration of
// `make test` runs the modem story (a signal, an SMS, a refused SMS, three
// registration events) with the same code `make examples` runs as programs.
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

// Both programs in an unnamed namespace: their names (Modem, Signal...) stay
// private to this file and cannot clash with another test file's. The
// headers they include are included above, so the wrapping holds only theirs.
namespace {
#define main modem_server_main
#include "examples/modem/server.cpp"
#undef main
#define main modem_client_main
#include "examples/modem/client.cpp"
#undef main
}  // namespace

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
    const pid_t server = spawn_main(modem_server_main);
    REQUIRE(server > 0);
    const pid_t client = spawn_main(modem_client_main);
    REQUIRE(client > 0);
    // The client exits 0 only when it saw all of it; the server exits 0 only
    // when a client came and left.
    CHECK(testutil::wait_exit(client, 30000) == 0);
    CHECK(testutil::wait_exit(server, 30000) == 0);
  }
}

// ---- examples/pubsub, examples/window, examples/fdpass ----------------------
// Each example's programs in a namespace of their own (the examples may use
// the same names, and so may other test files). The example's shared header
// is included first, in the example's namespace: its #pragma once then keeps
// the programs' own #include of it out, and both see the one declaration.
namespace pubsub_example {
#include "examples/pubsub/position_api.hpp"
namespace server {
#define main server_main
#include "examples/pubsub/server.cpp"
#undef main
}  // namespace server
namespace client {
#define main client_main
#include "examples/pubsub/client.cpp"
#undef main
}  // namespace client
}  // namespace pubsub_example

namespace window_example {
#include "examples/window/adc_api.hpp"
namespace server {
#define main server_main
#include "examples/window/server.cpp"
#undef main
}  // namespace server
namespace client {
#define main client_main
#include "examples/window/client.cpp"
#undef main
}  // namespace client
}  // namespace window_example

namespace fdpass_example {
#include "examples/fdpass/files_api.hpp"
namespace server {
#define main server_main
#include "examples/fdpass/server.cpp"
#undef main
}  // namespace server
namespace client {
#define main client_main
#include "examples/fdpass/client.cpp"
#undef main
}  // namespace client
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
    examples_test::run_pair(pubsub_example::server::server_main, pubsub_example::client::client_main);
  }
  TEST_CASE("examples: window: 40 requests with up to 8 in flight (LEMSG_MAX_PENDING if fewer), every answer right") {
    examples_test::run_pair(window_example::server::server_main, window_example::client::client_main);
  }
  TEST_CASE("examples: fdpass: the client reads a sealed file from the descriptor the server handed it") {
    examples_test::run_pair(fdpass_example::server::server_main, fdpass_example::client::client_main);
  }
}
