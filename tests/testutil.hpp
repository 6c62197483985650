// Helpers shared by the multi-process tests: a private runtime directory,
// fork without exec (qemu-user cannot exec a target binary), waits that
// always time out, fd counting, and pipes to synchronise processes.
#pragma once

#include "lemsg.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

namespace testutil {

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
  bool put(char c) { return write(fd[1], &c, 1) == 1; }
  /// The next byte, or -1 on timeout or end of file.
  int get(int timeout_ms) {
    struct pollfd p = {fd[0], POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1) return -1;
    char c;
    return read(fd[0], &c, 1) == 1 ? static_cast<unsigned char>(c) : -1;
  }
};

}  // namespace testutil
