// Size probe for the foundation: a small program that uses a Pool, a RefMap
// and a Loop (a watch on a pipe, a posted function, a timer that stops the
// loop). Built at -Os to measure what the foundation costs; it runs and exits
// 0 when every step happened, 1 otherwise.
#include "lemsg.hpp"

#include <fcntl.h>
#include <unistd.h>

namespace {

struct State {
  lemsg::Loop* loop = nullptr;
  int pipe_r = -1;
  int pipe_w = -1;
  lemsg::TimerId done;
  int posted = 0;
  int read = 0;
  int stopped_by_done = 0;
  int stopped_by_safety = 0;
};

}  // namespace

int main() {
  // Pool: take a block, share it, give it back.
  lemsg::Pool<64, 8> pool;
  void* block = nullptr;
  if (pool.alloc(block) != lemsg::Result::Ok) return 1;
  if (pool.add_ref(block) != lemsg::Result::Ok) return 1;
  if (pool.release(block) != lemsg::Result::Ok || pool.release(block) != lemsg::Result::Ok) return 1;
  if (pool.in_use() != 0) return 1;

  // RefMap: a reference resolves until removed.
  lemsg::RefMap<State, 16> refs;
  State st;
  std::uint32_t ref = 0;
  if (refs.add(&st, ref, 1) != lemsg::Result::Ok || refs.lookup(ref) != &st) return 1;

  // Loop: post -> write to the pipe -> watch reads it -> arm a timer -> stop.
  lemsg::Loop loop;
  st.loop = &loop;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return 1;
  st.pipe_r = fds[0];
  st.pipe_w = fds[1];

  lemsg::WatchId watch;
  if (loop.add_watch(st.pipe_r, lemsg::Readable, [s = &st](int fd, short) {
        char c;
        if (::read(fd, &c, 1) == 1) ++s->read;
        lemsg::Result r = s->loop->arm_timer(s->done, 1);
        (void)r;
      }, watch) != lemsg::Result::Ok)
    return 1;
  if (loop.add_timer([s = &st] {
        ++s->stopped_by_done;
        s->loop->stop();
      }, st.done) != lemsg::Result::Ok)
    return 1;
  lemsg::TimerId safety;
  if (loop.add_timer([s = &st] {
        ++s->stopped_by_safety;
        s->loop->stop();
      }, safety) != lemsg::Result::Ok)
    return 1;
  if (loop.arm_timer(safety, 10000) != lemsg::Result::Ok) return 1;
  if (loop.post([s = &st] {
        ++s->posted;
        if (::write(s->pipe_w, "x", 1) != 1) s->loop->stop();
      }) != lemsg::Result::Ok)
    return 1;
  if (loop.run() != lemsg::Result::Ok) return 1;

  ::close(st.pipe_r);
  ::close(st.pipe_w);
  if (refs.remove(ref) != lemsg::Result::Ok || refs.lookup(ref) != nullptr) return 1;
  const bool ok = st.posted == 1 && st.read == 1 && st.stopped_by_done == 1 && st.stopped_by_safety == 0;
  return ok ? 0 : 1;
}
