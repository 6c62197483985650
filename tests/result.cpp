// Section 2 (result): Result values and to_string.
// [[nodiscard]] on Result is a compile-time property (ignoring a Result is a
// warning, an error under -Werror); it has no run-time test.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"

#include <cstring>

TEST_SUITE("result") {

namespace {

const char* const unknown = "unknown result";

// The enumerators are contiguous from Ok = 0; count them by walking until
// to_string stops knowing the value, so results added by later sections are
// covered without editing this file.
int result_count() {
  int n = 0;
  while (n < 1000 && std::strcmp(lemsg::to_string(static_cast<lemsg::Result>(n)), unknown) != 0) ++n;
  return n;
}

bool contains(const char* haystack, const char* needle) { return std::strstr(haystack, needle) != nullptr; }

}  // namespace

TEST_CASE("result: Ok is zero") {
  CHECK(static_cast<int>(lemsg::Result::Ok) == 0);
  static_assert(std::is_same<std::underlying_type_t<lemsg::Result>, int>::value, "Result is an int enum");
}

TEST_CASE("result: every result has a distinct non-empty string") {
  const int n = result_count();
  // At least the foundation's results: Ok .. SystemError.
  CHECK(n >= 12);
  CHECK(n > static_cast<int>(lemsg::Result::SystemError));
  for (int i = 0; i < n; ++i) {
    const char* a = lemsg::to_string(static_cast<lemsg::Result>(i));
    REQUIRE(a != nullptr);
    CHECK(std::strlen(a) > 0);
    for (int j = i + 1; j < n; ++j) {
      const char* b = lemsg::to_string(static_cast<lemsg::Result>(j));
      INFO("results " << i << " and " << j);
      CHECK(std::strcmp(a, b) != 0);
    }
  }
}

TEST_CASE("result: the foundation's results have the strings the library documents") {
  using lemsg::Result;
  const Result all[] = {Result::Ok,          Result::BadParameter,   Result::NotFound,
                        Result::NoMemory,    Result::PoolEmpty,      Result::NotPoolBlock,
                        Result::DoubleFree,  Result::WatchTableFull, Result::TimerTableFull,
                        Result::QueueFull,   Result::Timeout,        Result::SystemError};
  for (Result r : all) {
    INFO("result " << static_cast<int>(r));
    CHECK(std::strcmp(lemsg::to_string(r), unknown) != 0);
  }
  CHECK(std::strcmp(lemsg::to_string(Result::Ok), "ok") == 0);
  CHECK(contains(lemsg::to_string(Result::Timeout), "timed out"));
}

TEST_CASE("result: a full-table message names the macro to raise") {
  CHECK(contains(lemsg::to_string(lemsg::Result::WatchTableFull), "LEMSG_MAX_WATCHES"));
  CHECK(contains(lemsg::to_string(lemsg::Result::TimerTableFull), "LEMSG_MAX_TIMERS"));
  CHECK(contains(lemsg::to_string(lemsg::Result::QueueFull), "LEMSG_MAX_POSTED"));
  // Capacities that are template arguments say which one to raise.
  CHECK(contains(lemsg::to_string(lemsg::Result::NoMemory), "raise"));
  CHECK(contains(lemsg::to_string(lemsg::Result::PoolEmpty), "raise"));
}

TEST_CASE("result: an out-of-range value still gives a string") {
  const char* s = lemsg::to_string(static_cast<lemsg::Result>(-1));
  REQUIRE(s != nullptr);
  CHECK(std::strcmp(s, unknown) == 0);
  s = lemsg::to_string(static_cast<lemsg::Result>(result_count()));
  REQUIRE(s != nullptr);
  CHECK(std::strcmp(s, unknown) == 0);
}

}  // TEST_SUITE
