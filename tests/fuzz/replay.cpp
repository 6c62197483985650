// Replays the fuzz corpus through the fuzz targets' entry points, inside
// lemsg-tests, so every target (host, and the ARM ones under qemu-user, 32-bit
// included) runs every input the fuzzers kept. A broken invariant traps and
// the run fails; the INFO line names the input.
//
// The Makefile builds tests/fuzz/*.cpp into lemsg-tests with
// LEMSG_FUZZ_REPLAY (entry points lemsg_fuzz_<name>) and LEMSG_FUZZ_CORPUS,
// the absolute path of tests/fuzz/corpus. Each target replays the regular
// files of corpus/<name>/; corpus/crashes/ holds crash inputs not yet fixed
// and is not replayed (move an input into corpus/<name>/ once it is fixed).
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>

#include "fuzz.hpp"

#include <fcntl.h>

#ifndef LEMSG_FUZZ_CORPUS
#error "LEMSG_FUZZ_CORPUS must name the corpus directory (the Makefile sets it)"
#endif

extern "C" int lemsg_fuzz_wire(const std::uint8_t* data, std::size_t size);
extern "C" int lemsg_fuzz_service(const std::uint8_t* data, std::size_t size);
extern "C" int lemsg_fuzz_session(const std::uint8_t* data, std::size_t size);
extern "C" int lemsg_fuzz_typed(const std::uint8_t* data, std::size_t size);
extern "C" int lemsg_fuzz_directory(const std::uint8_t* data, std::size_t size);

TEST_SUITE("fuzz") {

namespace {

using Entry = int (*)(const std::uint8_t*, std::size_t);

// Reads one input (inputs are small: the fuzzers run with -max_len).
bool read_input(const char* path, std::uint8_t* buf, std::size_t cap, std::size_t& len) {
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  len = 0;
  for (;;) {
    const ssize_t n = ::read(fd, buf + len, cap - len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    len += static_cast<std::size_t>(n);
    if (len == cap) break;
  }
  ::close(fd);
  return true;
}

// Replays every regular file of corpus/<name>/ in name order; returns how many.
int replay(const char* name, Entry entry) {
  char dir[512];
  REQUIRE(std::snprintf(dir, sizeof dir, "%s/%s", LEMSG_FUZZ_CORPUS, name) < static_cast<int>(sizeof dir));
  static char names[1024][64];
  int count = 0;
  DIR* d = ::opendir(dir);
  REQUIRE_MESSAGE(d != nullptr, "no corpus directory ", dir);
  while (struct dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.' || std::strlen(e->d_name) >= sizeof names[0]) continue;
    char path[1024];
    if (std::snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= static_cast<int>(sizeof path)) continue;
    struct stat st;
    if (::stat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
    REQUIRE(count < 1024);
    std::strcpy(names[count++], e->d_name);
  }
  ::closedir(d);
  std::qsort(names, static_cast<std::size_t>(count), sizeof names[0],
             [](const void* a, const void* b) { return std::strcmp(static_cast<const char*>(a), static_cast<const char*>(b)); });
  static std::uint8_t buf[1 << 16];
  for (int i = 0; i < count; ++i) {
    char path[1024];
    REQUIRE(std::snprintf(path, sizeof path, "%s/%s", dir, names[i]) < static_cast<int>(sizeof path));
    INFO("replaying ", path);
    fuzz::current_input = path;
    std::size_t len = 0;
    REQUIRE(read_input(path, buf, sizeof buf, len));
    CHECK(entry(buf, len) == 0);
  }
  fuzz::current_input = nullptr;
  return count;
}

}  // namespace

TEST_CASE("fuzz: every corpus input of the wire decoder target keeps its invariants") {
  CHECK(replay("wire", lemsg_fuzz_wire) > 0);
}

TEST_CASE("fuzz: every corpus input of the Service target keeps its invariants") {
  CHECK(replay("service", lemsg_fuzz_service) > 0);
}

TEST_CASE("fuzz: every corpus input of the Session target keeps its invariants") {
  CHECK(replay("session", lemsg_fuzz_session) > 0);
}

TEST_CASE("fuzz: every corpus input of the typed decoder target keeps its invariants") {
  CHECK(replay("typed", lemsg_fuzz_typed) > 0);
}

TEST_CASE("fuzz: every corpus input of the directory target keeps its invariants") {
  CHECK(replay("directory", lemsg_fuzz_directory) > 0);
}

}  // TEST_SUITE
