// The README's quick starts (plain and typed), compiled from README.md itself (the Makefile
// extracts the block between the quickstart markers and renames its main),
// so the example users copy can never drift from what is tested.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>

#include "lemsg.hpp"
#include "testutil.hpp"

#include <cstring>

// The README's copy of the modem example's interface, and the file itself.
namespace from_readme {
#include "readme_modem_api.hpp"
}
namespace from_example {
#include "../examples/modem/modem_api.hpp"
}

int lemsg_readme_main();
int lemsg_readme_typed_main();

TEST_SUITE("readme") {
  TEST_CASE("readme: the quick start runs and its client gets the answer") {
    testutil::RuntimeDir dir;  // the example keeps an existing LEMSG_RUNTIME_DIR
    const int fds_before = testutil::count_open_fds();
    CHECK(lemsg_readme_main() == 0);
    CHECK(testutil::count_open_fds() == fds_before);
  }
  TEST_CASE("readme: the modem interface shown in the README declares the same protocol as examples/modem/modem_api.hpp") {
    using A = lemsg::InterfaceInfo<from_readme::ModemApi>;
    using B = lemsg::InterfaceInfo<from_example::ModemApi>;
    CHECK(std::strcmp(A::id.text, B::id.text) == 0);
    CHECK(A::max_payload == B::max_payload);
  }
  TEST_CASE("readme: the typed quick start runs; its client gets the answer and the event") {
    testutil::RuntimeDir dir;
    const int fds_before = testutil::count_open_fds();
    CHECK(lemsg_readme_typed_main() == 0);
    CHECK(testutil::count_open_fds() == fds_before);
  }
}
