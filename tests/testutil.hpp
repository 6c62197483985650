// Helpers shared by the multi-process tests: a private runtime directory,
// fork without exec (qemu-user cannot exec a target binary), waits that
// always time out, fd counting, and pipes to synchronise processes.
#pragma once

#include "lemsg.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

// A failed check inside a forked child: say where, and leave with 1.
#define CHILD_CHECK(cond)                                                                         \
  do {                                                                                            \
    if (!(cond)) {                                                                                \
      std::fprintf(stderr, "%s:%d: child %ld: check failed: %s\n", __FILE__, __LINE__,            \
                   static_cast<long>(getpid()), #cond);                                           \
      return 1;                                                                                   \
    }                                                                                             \
  } while (0)

namespace testutil {

/// The payload the messaging tests exchange: an operation and a value.
struct Body {
  std::uint32_t op;
  std::uint32_t value;
};

/// What a test server answers to an echo of `v`.
inline std::uint32_t echo_of(std::uint32_t v) { return v * 3u + 1u; }

/// Makes `m` carry {op, value}; false when it does not fit.
inline bool set_body(lemsg::Message& m, std::uint32_t op, std::uint32_t value) {
  const Body b{op, value};
  return m.assign(&b, sizeof b) == lemsg::Result::Ok;
}

/// A forked child dies with its parent, so a failed test leaves no orphans.
inline void die_with_parent() { prctl(PR_SET_PDEATHSIG, SIGKILL); }

inline long long now_ms() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

/// A fresh directory under /tmp, exported as LEMSG_RUNTIME_DIR while the
/// object lives; removed (with the sockets in it) afterwards.
struct RuntimeDir {
  char path[64];
  RuntimeDir() {
    std::snprintf(path, sizeof path, "/tmp/lemsg-test-XXXXXX");
    if (!mkdtemp(path)) {
      std::perror("mkdtemp");
      std::abort();
    }
    setenv("LEMSG_RUNTIME_DIR", path, 1);
  }
  ~RuntimeDir() {
    if (DIR* d = opendir(path)) {
      while (struct dirent* e = readdir(d)) {
        if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
        char p[400];
        std::snprintf(p, sizeof p, "%s/%s", path, e->d_name);
        unlink(p);
      }
      closedir(d);
    }
    rmdir(path);
    unsetenv("LEMSG_RUNTIME_DIR");
  }
  /// The socket path of service `name`.
  void socket(const char* name, char (&out)[256]) const { std::snprintf(out, sizeof out, "%s/%s", path, name); }
};

/// Forks; the child runs fn() and leaves with _exit(its int result), so no
/// test-runner state of the parent is flushed twice.
template <typename F>
pid_t spawn(F&& fn) {
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    int rc = fn();
    _exit(rc);
  }
  return pid;
}

/// Waits for `pid` at most `timeout_ms`. Returns its exit code, 128 + signal
/// when killed by a signal, or -1 on timeout (the child is then killed).
inline int wait_exit(pid_t pid, int timeout_ms) {
  const long long end = now_ms() + timeout_ms;
  for (;;) {
    int st = 0;
    const pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (r < 0) return -2;
    if (now_ms() >= end) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
      return -1;
    }
    usleep(2000);
  }
}

/// kill -9 and reap.
inline void kill9(pid_t pid) {
  kill(pid, SIGKILL);
  int st;
  waitpid(pid, &st, 0);
}

/// Open fds of this process.
inline int count_open_fds() {
  int n = 0;
  if (DIR* d = opendir("/proc/self/fd")) {
    while (struct dirent* e = readdir(d))
      if (e->d_name[0] != '.') ++n;
    closedir(d);
    --n;  // the DIR's own fd
  }
  return n;
}

/// Runs the loop until pred() is true or `timeout_ms` passes; returns pred().
template <typename P>
bool run_until(lemsg::Loop& loop, P pred, int timeout_ms) {
  const long long end = now_ms() + timeout_ms;
  while (!pred()) {
    const long long left = end - now_ms();
    if (left <= 0) return pred();
    lemsg::Result r = loop.run_once(left > 50 ? 50 : static_cast<int>(left));
    if (r == lemsg::Result::SystemError) return pred();
  }
  return true;
}

/// Waits until `path` exists, at most `timeout_ms`.
inline bool wait_for_path(const char* path, int timeout_ms) {
  const long long end = now_ms() + timeout_ms;
  struct stat st;
  while (stat(path, &st) != 0) {
    if (now_ms() >= end) return false;
    usleep(2000);
  }
  return true;
}

/// A pipe for one process to tell another a byte.
struct Pipe {
  int fd[2] = {-1, -1};
  Pipe() {
    if (pipe2(fd, O_CLOEXEC) != 0) std::abort();
  }
  ~Pipe() {
    close_read();
    close_write();
  }
  void close_read() {
    if (fd[0] >= 0) close(fd[0]);
    fd[0] = -1;
  }
  void close_write() {
    if (fd[1] >= 0) close(fd[1]);
    fd[1] = -1;
  }
  /// False, without writing, when the reader is gone: a write would raise
  /// SIGPIPE and end the whole test run (a child that failed early closed it).
  bool put(char c) {
    struct pollfd p = {fd[1], POLLOUT, 0};
    if (::poll(&p, 1, 0) == 1 && (p.revents & POLLERR)) return false;
    return write(fd[1], &c, 1) == 1;
  }
  /// The next byte, or -1 on timeout or end of file.
  int get(int timeout_ms) {
    struct pollfd p = {fd[0], POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1) return -1;
    char c;
    return read(fd[0], &c, 1) == 1 ? static_cast<unsigned char>(c) : -1;
  }
};

/// Captures the library's log lines while it lives (lemsg::set_log_sink),
/// counting them per level and keeping the last one; restores stderr when it
/// goes. One at a time; create it on the test's thread before other threads log.
struct LogCapture {
  int count[4] = {0, 0, 0, 0};  // indexed by LogLevel
  char last[256] = {};
  LogCapture() { lemsg::set_log_sink(&LogCapture::sink, this); }
  ~LogCapture() { lemsg::set_log_sink(nullptr, nullptr); }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;
  /// Lines logged as errors or warnings so far.
  int warnings() const { return count[0] + count[1]; }
  static void sink(lemsg::LogLevel level, const char* line, void* ctx) {
    LogCapture* self = static_cast<LogCapture*>(ctx);
    const int i = static_cast<int>(level);
    if (i >= 0 && i < 4) ++self->count[i];
    std::snprintf(self->last, sizeof self->last, "%s", line);
  }
};

/// Sends one datagram on `sock` with `n` (at most 8) fds in one SCM_RIGHTS
/// message, with none of the library's checks, as a hostile peer would.
/// True when the whole datagram went.
inline bool send_fds(int sock, const void* buf, std::size_t len, const int* fds, std::size_t n) {
  if (n > 8) return false;
  struct iovec iov;
  iov.iov_base = const_cast<void*>(buf);
  iov.iov_len = len;
  struct msghdr mh;
  std::memset(&mh, 0, sizeof mh);
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(struct cmsghdr) unsigned char control[CMSG_SPACE(8 * sizeof(int))];
  if (n) {
    std::memset(control, 0, sizeof control);
    mh.msg_control = control;
    mh.msg_controllen = CMSG_SPACE(n * sizeof(int));
    struct cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(n * sizeof(int));
    std::memcpy(CMSG_DATA(c), fds, n * sizeof(int));
  }
  return sendmsg(sock, &mh, MSG_NOSIGNAL) == static_cast<ssize_t>(len);
}

/// True when fds cut off by a too-small control buffer (MSG_CTRUNC) are
/// dropped, as the Linux kernel does. False under qemu-user, which receives
/// into a larger buffer of its own and passes on only what fits the
/// program's: the rest stay open in the process, where no library can see
/// them. Tests of truncated control data relax their fd counts only then.
inline bool truncated_fds_are_dropped() {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return true;
  const int before = count_open_fds();
  int fds[5];
  for (int& f : fds) f = open("/dev/null", O_RDONLY | O_CLOEXEC);
  const bool sent = send_fds(sv[0], "x", 1, fds, 5);
  for (int f : fds)
    if (f >= 0) close(f);
  if (sent) {
    char c;
    struct iovec iov = {&c, 1};
    struct msghdr mh;
    std::memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    alignas(struct cmsghdr) unsigned char control[CMSG_SPACE(4 * sizeof(int))];
    mh.msg_control = control;
    mh.msg_controllen = sizeof control;
    if (recvmsg(sv[1], &mh, MSG_CMSG_CLOEXEC) >= 0) {
      // musl's CMSG_NXTHDR trips clang's -Wsign-compare (as in lemsg.hpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
      for (struct cmsghdr* h = CMSG_FIRSTHDR(&mh); h != nullptr; h = CMSG_NXTHDR(&mh, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t n = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < n; ++i) {
          int f;
          std::memcpy(&f, CMSG_DATA(h) + i * sizeof(int), sizeof f);
          close(f);
        }
      }
#pragma GCC diagnostic pop
    }
  }
  const int after = count_open_fds();
  close(sv[0]);
  close(sv[1]);
  return after == before;
}

/// Removes the entries of directory `path` (not the directory). Uses
/// readdir64: a 32-bit readdir fails with EOVERFLOW on ext4's 64-bit
/// directory offsets under a 64-bit kernel (qemu-user, armhf on aarch64).
inline void remove_entries(const char* path) {
  if (DIR* d = opendir(path)) {
    while (struct dirent64* e = readdir64(d)) {
      if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
      char p[400];
      std::snprintf(p, sizeof p, "%s/%s", path, e->d_name);
      unlink(p);
    }
    closedir(d);
  }
}

/// A RuntimeDir that also empties itself on 32-bit targets under qemu-user,
/// where RuntimeDir's own readdir cannot list it (see remove_entries).
struct TidyRuntimeDir : RuntimeDir {
  ~TidyRuntimeDir() { remove_entries(path); }
};

}  // namespace testutil
