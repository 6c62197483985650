// Shared by the fuzz targets in tests/fuzz/: the entry-point macro, the
// invariant check, the input reader and the process-level helpers.
//
// Each target is one .cpp defining its entry point with LEMSG_FUZZ_TARGET.
// Built for libFuzzer (make fuzz) the entry point is LLVMFuzzerTestOneInput;
// built into lemsg-tests (LEMSG_FUZZ_REPLAY, make test) it is
// lemsg_fuzz_<name>, so the targets link together and tests/fuzz/replay.cpp
// replays the corpus through them on every target, under qemu too.
#ifndef LEMSG_TESTS_FUZZ_HPP
#define LEMSG_TESTS_FUZZ_HPP

#include "lemsg.hpp"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#ifdef LEMSG_FUZZ_REPLAY
#define LEMSG_FUZZ_TARGET(name) extern "C" int lemsg_fuzz_##name(const std::uint8_t* data, std::size_t size)
#else
#define LEMSG_FUZZ_TARGET(name) extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
#endif

// A client that passed a connection's own socket as an fd kept that
// connection alive after it closed (issue 6, defect 18), so the server never
// saw the hang-up. It is fixed (a Service refuses Unix socket fds unless it
// opts in, and always one connected to itself); -DLEMSG_FUZZ_KNOWN_DEFECT_18=1
// brings back the old tolerance, to reproduce the defect on an old header.
#ifndef LEMSG_FUZZ_KNOWN_DEFECT_18
#define LEMSG_FUZZ_KNOWN_DEFECT_18 0
#endif

namespace fuzz {

// The corpus file being replayed (set by tests/fuzz/replay.cpp), for the message.
inline const char* current_input = nullptr;

// A broken invariant: say which, then trap, so libFuzzer records the input
// (and the replay test dies with the message in its log).
[[noreturn]] inline void fail(const char* what, const char* file, int line) {
  std::fprintf(stderr, "fuzz invariant broken: %s (%s:%d)%s%s\n", what, file, line,
               current_input ? " replaying " : "", current_input ? current_input : "");
  std::fflush(stderr);
  __builtin_trap();
}
#define FUZZ_CHECK(cond) ((cond) ? static_cast<void>(0) : ::fuzz::fail(#cond, __FILE__, __LINE__))

// Reads the input as a program: bytes, then zeros once it runs out.
struct Input {
  const std::uint8_t* p;
  std::size_t n;
  std::size_t i = 0;
  bool done() const { return i >= n; }
  std::uint8_t u8() { return i < n ? p[i++] : 0; }
  std::uint32_t u32() {
    std::uint32_t v = 0;
    for (int k = 0; k < 4; ++k) v |= static_cast<std::uint32_t>(u8()) << (8 * k);
    return v;
  }
  // Up to `cap` bytes into `out`; returns how many.
  std::size_t bytes(void* out, std::size_t want, std::size_t cap) {
    if (want > cap) want = cap;
    std::size_t k = 0;
    for (; k < want && i < n; ++k) static_cast<std::uint8_t*>(out)[k] = p[i++];
    return k;
  }
};

// Open fds of this process (what /proc/self/fd lists, minus the directory's own).
inline int count_fds() {
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return -1;
  int n = 0;
  while (struct dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') ++n;
  ::closedir(d);
  return n - 1;
}

// LEMSG_RUNTIME_DIR for the targets: the one the environment gives (make test
// sets a private one), or else a fresh directory made on first use (a
// libFuzzer run). Never /run/lemsg.
inline const char* runtime_dir() {
  static char dir[128] = {};
  if (dir[0]) return dir;
  const char* env = std::getenv("LEMSG_RUNTIME_DIR");
  if (env && *env && std::strlen(env) < sizeof dir) {
    std::strcpy(dir, env);
    return dir;
  }
  const char* tmp = std::getenv("TMPDIR");
  const int w = std::snprintf(dir, sizeof dir, "%s/lemsg-fuzz.XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (w >= static_cast<int>(sizeof dir) || !::mkdtemp(dir)) fail("mkdtemp for the runtime dir", __FILE__, __LINE__);
  ::setenv("LEMSG_RUNTIME_DIR", dir, 1);
  return dir;
}

// Quiet logging for one input (bad input is logged on every frame), restored
// after, because the replay runs inside lemsg-tests.
struct QuietLog {
  int saved = lemsg::detail::log_state().level.load();
  QuietLog() { lemsg::set_log_level(lemsg::LogLevel::Error); }
  ~QuietLog() { lemsg::detail::log_state().level.store(saved); }
};

// Runs `loop` until nothing is left to do right now: run_once(0) until it
// dispatches nothing, and also wait for a timer that is due within
// `timer_ms` (a paused reader retries after 5 ms). Bounded: a loop that never
// settles is a broken invariant of its own.
inline void settle(lemsg::Loop& loop, int timer_ms = 0) {
  for (int i = 0; i < 400; ++i) {
    lemsg::Result r = loop.run_once(0);
    if (r == lemsg::Result::Ok) continue;
    FUZZ_CHECK(r == lemsg::Result::Timeout);
    const int t = loop.next_timeout_ms();
    if (timer_ms <= 0 || t < 0 || t > timer_ms) return;
    r = loop.run_once(t + 1);
    FUZZ_CHECK(r == lemsg::Result::Ok || r == lemsg::Result::Timeout);
  }
  fail("loop did not settle in 400 rounds", __FILE__, __LINE__);
}

}  // namespace fuzz

#endif
