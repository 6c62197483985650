// Section 1 (config): capacity macros, version macros, the log and assert hooks.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>

TEST_SUITE("config") {

TEST_CASE("config: capacity macros take the values this build asked for") {
#if defined(LEMSG_TINY) && LEMSG_TINY
  // The tiny build overrides them on the command line; the header must keep
  // the caller's values instead of its defaults.
  CHECK(LEMSG_MAX_WATCHES == 6);
  CHECK(LEMSG_MAX_TIMERS == 3);
  CHECK(LEMSG_MAX_POSTED == 2);
#else
  // The ordinary build sets nothing, so these are the header's defaults.
  CHECK(LEMSG_MAX_WATCHES == 96);
  CHECK(LEMSG_MAX_TIMERS == 32);
  CHECK(LEMSG_MAX_POSTED == 64);
#endif
  CHECK(LEMSG_CALLABLE_SIZE == 32);  // the same on every target
  CHECK(LEMSG_LOG_LEVEL == 1);
}

TEST_CASE("config: the capacity macros size the loop's tables") {
  // A loop with every watch slot used reports WatchTableFull on the next
  // add: the macro, not some other number, is the limit.
  lemsg::Loop loop;
  lemsg::WatchId ids[LEMSG_MAX_WATCHES + 1];
  for (int i = 0; i < LEMSG_MAX_WATCHES; ++i)
    REQUIRE(loop.add_watch(0, 0, [](int, short) {}, ids[i]) == lemsg::Result::Ok);
  CHECK(loop.add_watch(0, 0, [](int, short) {}, ids[LEMSG_MAX_WATCHES]) ==
        lemsg::Result::WatchTableFull);
  CHECK(loop.watch_count() == LEMSG_MAX_WATCHES);
  // The wake-up eventfd takes one pollfd entry beside the watches.
  CHECK(loop.pollfd_count() == LEMSG_MAX_WATCHES + 1);
}

TEST_CASE("config: the version string is built from the three version numbers") {
  static_assert(LEMSG_VERSION_MAJOR >= 0 && LEMSG_VERSION_MINOR >= 0 && LEMSG_VERSION_PATCH >= 0,
                "version numbers are integer constants");
  char built[32];
  std::snprintf(built, sizeof built, "%d.%d.%d", LEMSG_VERSION_MAJOR, LEMSG_VERSION_MINOR,
                LEMSG_VERSION_PATCH);
  CHECK(std::strcmp(built, LEMSG_VERSION_STR) == 0);
}

namespace config_test {

// The whole of a file of the source tree (LEMSG_TEST_SOURCE_DIR), or "" when
// it cannot be read; at most 256 KiB.
struct SourceFile {
  char text[256 * 1024] = {};
  explicit SourceFile(const char* name) {
    char path[512];
    std::snprintf(path, sizeof path, "%s/%s", LEMSG_TEST_SOURCE_DIR, name);
    if (std::FILE* f = std::fopen(path, "r")) {
      const std::size_t n = std::fread(text, 1, sizeof text - 1, f);
      text[n] = '\0';
      std::fclose(f);
    }
  }
};

// The version that first follows `marker` in text ("0.2.0"), or "" if none
// does (a marker followed by something else, "## Unreleased", is skipped).
void version_after(const char* text, const char* marker, char* out, std::size_t size) {
  out[0] = '\0';
  const char* p = text;
  for (;;) {
    p = std::strstr(p, marker);
    if (!p) return;
    p += std::strlen(marker);
    if (*p >= '0' && *p <= '9') break;
  }
  std::size_t n = 0;
  while (n + 1 < size && ((p[n] >= '0' && p[n] <= '9') || p[n] == '.')) {
    out[n] = p[n];
    ++n;
  }
  if (n > 0 && out[n - 1] == '.') --n;  // the end of a sentence: "lemsg 0.2.0."
  out[n] = '\0';
}

SourceFile changelog("CHANGELOG.md");
SourceFile readme("README.md");
SourceFile api("docs/API.md");
SourceFile header("lemsg.hpp");

}  // namespace config_test

TEST_CASE("config: the CHANGELOG's newest version, the README's, the API reference's and the manual's are LEMSG_VERSION_STR") {
  using namespace config_test;
  REQUIRE(changelog.text[0] != '\0');
  REQUIRE(readme.text[0] != '\0');
  REQUIRE(api.text[0] != '\0');
  REQUIRE(header.text[0] != '\0');
  // The first numbered heading of CHANGELOG.md ("## 0.2.0 - 2026-12-02").
  char newest[32];
  version_after(changelog.text, "\n## ", newest, sizeof newest);
  CHECK(std::strcmp(newest, LEMSG_VERSION_STR) == 0);
  // The README names the version it describes once: "This is lemsg 0.2.0".
  char described[32];
  version_after(readme.text, "This is lemsg ", described, sizeof described);
  CHECK(std::strcmp(described, LEMSG_VERSION_STR) == 0);
  // docs/API.md opens with "lemsg 0.2.0." and lists the macro's value.
  char reference[32];
  version_after(api.text, "\nlemsg ", reference, sizeof reference);
  CHECK(std::strcmp(reference, LEMSG_VERSION_STR) == 0);
  version_after(api.text, "| `LEMSG_VERSION_STR` | `\"", reference, sizeof reference);
  CHECK(std::strcmp(reference, LEMSG_VERSION_STR) == 0);
  // The header's manual opens with "// Version 0.2.0.".
  char manual[32];
  version_after(header.text, "// Version ", manual, sizeof manual);
  CHECK(std::strcmp(manual, LEMSG_VERSION_STR) == 0);
}

namespace {

struct Captured {
  int calls = 0;
  lemsg::LogLevel level = lemsg::LogLevel::Error;
  char line[512] = {};
};

void capture_sink(lemsg::LogLevel level, const char* line, void* ctx) {
  Captured* c = static_cast<Captured*>(ctx);
  ++c->calls;
  c->level = level;
  std::snprintf(c->line, sizeof c->line, "%s", line);
}

void restore_log_defaults() {
  lemsg::set_log_sink(nullptr, nullptr);
  lemsg::set_log_level(static_cast<lemsg::LogLevel>(LEMSG_LOG_LEVEL));
}

}  // namespace

TEST_CASE("config: set_log_sink receives formatted lines without a newline") {
  Captured c;
  lemsg::set_log_sink(capture_sink, &c);
  LEMSG_LOG(Warning, "watch %d of %s", 7, "seven");
  restore_log_defaults();
  CHECK(c.calls == 1);
  CHECK(c.level == lemsg::LogLevel::Warning);
  CHECK(std::strcmp(c.line, "watch 7 of seven") == 0);
}

TEST_CASE("config: the default log level passes warnings and drops info") {
  Captured c;
  lemsg::set_log_sink(capture_sink, &c);
  LEMSG_LOG(Error, "an error");
  LEMSG_LOG(Warning, "a warning");
  LEMSG_LOG(Info, "some info");
  LEMSG_LOG(Debug, "some debug");
  restore_log_defaults();
  CHECK(c.calls == 2);
  CHECK(std::strcmp(c.line, "a warning") == 0);
}

TEST_CASE("config: set_log_level filters lines above the level") {
  Captured c;
  lemsg::set_log_sink(capture_sink, &c);

  lemsg::set_log_level(lemsg::LogLevel::Error);
  LEMSG_LOG(Warning, "dropped");
  LEMSG_LOG(Info, "dropped");
  LEMSG_LOG(Debug, "dropped");
  CHECK(c.calls == 0);
  LEMSG_LOG(Error, "kept error");
  CHECK(c.calls == 1);
  CHECK(std::strcmp(c.line, "kept error") == 0);

  lemsg::set_log_level(lemsg::LogLevel::Debug);
  LEMSG_LOG(Debug, "kept debug %u", 3u);
  CHECK(c.calls == 2);
  CHECK(c.level == lemsg::LogLevel::Debug);
  CHECK(std::strcmp(c.line, "kept debug 3") == 0);

  restore_log_defaults();
  // Back to the default: info is dropped again.
  lemsg::set_log_sink(capture_sink, &c);
  LEMSG_LOG(Info, "dropped again");
  restore_log_defaults();
  CHECK(c.calls == 2);
}

// LEMSG_LOG is read once, at the first line logged; the tests make the
// header read it again by resetting that mark.
TEST_CASE("config: LEMSG_LOG in the environment sets the log level, over set_log_level") {
  Captured c;
  lemsg::set_log_sink(capture_sink, &c);
  lemsg::set_log_level(lemsg::LogLevel::Error);
  const char* const was = std::getenv("LEMSG_LOG");
  char saved[32] = {};
  if (was) std::snprintf(saved, sizeof saved, "%s", was);

  setenv("LEMSG_LOG", "debug", 1);
  lemsg::detail::log_state().env.store(-2);
  CHECK(lemsg::log_level() == lemsg::LogLevel::Debug);
  LEMSG_LOG(Debug, "seen at debug");
  CHECK(c.calls == 1);
  CHECK(std::strcmp(c.line, "seen at debug") == 0);

  setenv("LEMSG_LOG", "2", 1);
  lemsg::detail::log_state().env.store(-2);
  CHECK(lemsg::log_level() == lemsg::LogLevel::Info);
  LEMSG_LOG(Debug, "dropped at info");
  CHECK(c.calls == 1);

  // A value it does not understand leaves set_log_level's level in force.
  setenv("LEMSG_LOG", "loud", 1);
  lemsg::detail::log_state().env.store(-2);
  CHECK(lemsg::log_level() == lemsg::LogLevel::Error);
  LEMSG_LOG(Warning, "dropped at error");
  CHECK(c.calls == 1);

  if (was) setenv("LEMSG_LOG", saved, 1);
  else unsetenv("LEMSG_LOG");
  lemsg::detail::log_state().env.store(-2);
  restore_log_defaults();
}

TEST_CASE("config: a log line longer than the buffer is cut, not lost") {
  Captured c;
  char longer[400];
  std::memset(longer, 'x', sizeof longer - 1);
  longer[sizeof longer - 1] = '\0';
  lemsg::set_log_sink(capture_sink, &c);
  LEMSG_LOG(Error, "%s", longer);
  restore_log_defaults();
  CHECK(c.calls == 1);
  const std::size_t len = std::strlen(c.line);
  CHECK(len > 0);
  CHECK(len < sizeof longer - 1);
  CHECK(std::strspn(c.line, "x") == len);
}

TEST_CASE("config: LEMSG_ASSERT is an expression that does nothing when its condition holds") {
  int evaluated = 0;
  LEMSG_ASSERT(++evaluated == 1);
  // Usable where an expression is expected, and of type void.
  static_assert(std::is_void<decltype(LEMSG_ASSERT(true))>::value, "LEMSG_ASSERT is a void expression");
  (void)(LEMSG_ASSERT(evaluated == 1), 0);
  // The condition is evaluated exactly once.
  CHECK(evaluated == 1);
}

}  // TEST_SUITE
