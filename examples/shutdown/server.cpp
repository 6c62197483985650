// server.cpp: a daemon that shuts down cleanly on SIGTERM (examples/shutdown).
//
// systemd, an init script or `kill` stops a daemon with SIGTERM. Instead of
// dying mid-message, this one takes the signal on its lemsg::Loop, through a
// signalfd (SIGTERM is blocked, so it waits in the fd instead of killing the
// process), and then, from an ordinary watch handler where every lemsg call
// is allowed:
//   1. hides the service: no new client gets in, and the socket file
//      <runtime dir>/daemon is removed;
//   2. closes every session: each client's close handler runs (with Closed),
//      as a Legato client's session close handler does when its server
//      closes the session, and so does this server's (with Ok);
//   3. stops the loop, and main returns 0.
// It answers GetVersion meanwhile, and runs until SIGTERM. It exits 0 when
// all of that happened and the socket file is gone, 1 otherwise. The client
// (client.cpp) waits for its session to be closed.
//
//   make examples     builds both into build/<target>/examples/shutdown/
// By hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/shutdown/server & srv=$!
//   build/host/examples/shutdown/client & sleep 1; kill -TERM $srv; wait
#include "daemon_api.hpp"

#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cstdio>

// What the shutdown did, checked before main returns.
struct Shutdown {
  bool requested = false;  // SIGTERM came
  bool hidden = false;     // hide() succeeded
  std::size_t to_close = 0;
  std::size_t closed = 0;  // of those, closed by us (our close handler ran with Ok)
};

int main() {
  // First, before any thread exists (threads inherit the mask): SIGTERM now
  // stays pending instead of killing the process, and the signalfd reads it.
  sigset_t term;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  if (sigprocmask(SIG_BLOCK, &term, nullptr) != 0) return 1;
  const int sig_fd = signalfd(-1, &term, SFD_NONBLOCK | SFD_CLOEXEC);
  if (sig_fd < 0) return 1;

  lemsg::Loop loop;
  lemsg::TypedPool<DaemonApi, 8> pool;
  lemsg::TypedService<DaemonApi> svc(loop, pool);
  lemsg::Service& service = svc.service();
  Shutdown down;
  svc.set_handler<GetVersion>([](lemsg::Responder<GetVersion>& call, lemsg::Void&) { (void)call.reply({"1.4.2"}); });
  service.set_open_handler([](lemsg::SessionRef) { std::printf("server: a client opened a session\n"); });
  service.set_close_handler([&down](lemsg::SessionRef, lemsg::Result why) {
    std::printf("server: a session closed (%s)\n", lemsg::to_string(why));
    if (down.requested && why == lemsg::Result::Ok) ++down.closed;
  });

  auto on_sigterm = [&down, &service, &loop](int fd, short) {
    struct signalfd_siginfo si;
    if (read(fd, &si, sizeof si) != sizeof si) return;
    std::printf("server: SIGTERM from pid %u: shutting down\n", static_cast<unsigned>(si.ssi_pid));
    down.requested = true;
    // 1. First, so that no client comes in while the others are closed.
    down.hidden = service.hide() == lemsg::Result::Ok;
    // 2. for_each_session() must not close sessions: list them, then close.
    lemsg::SessionRef open[LEMSG_MAX_SESSIONS];
    service.for_each_session([&](lemsg::SessionRef s) { open[down.to_close++] = s; });
    for (std::size_t i = 0; i < down.to_close; ++i) (void)service.close(open[i]);
    // 3. run() returns once this handler has.
    loop.stop();
  };
  lemsg::WatchId sig_watch;
  if (loop.add_watch(sig_fd, lemsg::Readable, on_sigterm, sig_watch) != lemsg::Result::Ok ||
      svc.advertise(kDaemonService) != lemsg::Result::Ok || loop.run() != lemsg::Result::Ok)
    return 1;
  (void)loop.remove_watch(sig_watch);
  close(sig_fd);

  // hide() removed the socket file: a client that starts now waits for the
  // next server instead of finding a dead socket.
  char path[256];
  std::snprintf(path, sizeof path, "%s/%s", lemsg::runtime_dir(), kDaemonService);
  const bool gone = access(path, F_OK) != 0;
  std::printf("server: %zu of %zu sessions closed, %s %s\n", down.closed, down.to_close, path,
              gone ? "removed" : "still there");
  return down.requested && down.hidden && down.closed == down.to_close && gone ? 0 : 1;
}
