// The examples, run as tests. examples/modem: its server and its client, each
// main() renamed and run in a forked process (no exec: under qemu-user a
// child cannot exec a target binary), so every target and configuration of
// `make test` runs the modem story (a signal, an SMS, a refused SMS, three
// registration events) with the same code `make examples` runs as programs.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"

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
