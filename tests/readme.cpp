// The README's quick starts (plain and typed), compiled from README.md itself (the Makefile
// extracts the block between the quickstart markers and renames its main),
// so the example users copy can never drift from what is tested. Likewise the
// Deployment section's bindings file, parsed as lemsg-dir would.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>

#include "lemsg.hpp"
#include "testutil.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
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

namespace {

// The README's example bindings file (between its bindings example markers).
const char kReadmeInc[] =
#include "readme_bindings.inc"
    ;
// The raw string opens with a line break; without it, line numbers are the file's.
const char* const kReadmeBindings = kReadmeInc + (kReadmeInc[0] == '\n' ? 1 : 0);

// A passwd file with the users the README's bindings name, as LEMSG_PASSWD
// while it lives (the machine's own /etc/passwd has none of them).
struct ReadmeUsers {
  char path[64] = "/tmp/lemsg-readme-passwd-XXXXXX";
  char old[512] = {};
  bool had = false;
  bool ok = false;
  ReadmeUsers() {
    static const char users[] =
        "root:x:0:0:root:/root:/bin/sh\n"
        "modem:x:1001:1001::/nonexistent:/usr/sbin/nologin\n"
        "ui:x:1002:1002::/nonexistent:/usr/sbin/nologin\n"
        "logger:x:1003:1003::/nonexistent:/usr/sbin/nologin\n";
    const int fd = mkstemp(path);
    if (fd < 0) return;
    ok = write(fd, users, sizeof users - 1) == static_cast<ssize_t>(sizeof users - 1);
    close(fd);
    if (const char* o = std::getenv("LEMSG_PASSWD")) {
      had = true;
      std::snprintf(old, sizeof old, "%s", o);
    }
    setenv("LEMSG_PASSWD", path, 1);
  }
  ~ReadmeUsers() {
    if (had) setenv("LEMSG_PASSWD", old, 1);
    else unsetenv("LEMSG_PASSWD");
    unlink(path);
  }
  ReadmeUsers(const ReadmeUsers&) = delete;
  ReadmeUsers& operator=(const ReadmeUsers&) = delete;
};

// Lines of `text` with a "->" before any '#': the bindings it should hold.
std::size_t arrow_lines(const char* text) {
  std::size_t n = 0;
  for (const char* line = text; *line;) {
    const char* end = std::strchr(line, '\n');
    if (!end) end = line + std::strlen(line);
    for (const char* p = line; p + 1 < end && *p != '#'; ++p) {
      if (p[0] == '-' && p[1] == '>') {
        ++n;
        break;
      }
    }
    line = *end ? end + 1 : end;
  }
  return n;
}

lemsg::Bindings readme_bindings;  // large: static storage, not the stack

}  // namespace

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
  TEST_CASE("readme: the Deployment section's bindings file parses, every line a binding") {
    ReadmeUsers users;
    REQUIRE(users.ok);
    char err[256] = "not run";
    const lemsg::Result r =
        readme_bindings.parse(kReadmeBindings, std::strlen(kReadmeBindings), "README.md bindings", err, sizeof err);
    INFO(err);
    CHECK(r == lemsg::Result::Ok);
    CHECK(err[0] == '\0');
    CHECK(arrow_lines(kReadmeBindings) > 0);
    CHECK(readme_bindings.size() == arrow_lines(kReadmeBindings));
    // The names resolve to the users of the passwd file above.
    const lemsg::Binding* b = readme_bindings.find(1002, "modem");
    REQUIRE(b != nullptr);
    CHECK(b->server_uid == 1001);
    CHECK(std::strcmp(b->service, "modem") == 0);
  }
  TEST_CASE("readme: the typed quick start runs; its client gets the answer and the event") {
    testutil::RuntimeDir dir;
    const int fds_before = testutil::count_open_fds();
    CHECK(lemsg_readme_typed_main() == 0);
    CHECK(testutil::count_open_fds() == fds_before);
  }
}
