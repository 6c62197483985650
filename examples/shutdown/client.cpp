// client.cpp: a client of examples/shutdown's daemon (server.cpp) that sees
// the daemon go away. It reads the daemon's version, then waits for its
// session to end: when the daemon gets SIGTERM it closes every session, and
// this client's close handler runs with Closed. (A daemon killed with
// kill -9 looks the same from here: the kernel closes its sockets; it just
// leaves its socket file behind.) Exits 0 when the close handler ran with
// Closed within 60 s, 1 otherwise.
//
//   make examples     builds both into build/<target>/examples/shutdown/
// By hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/shutdown/server & srv=$!
//   build/host/examples/shutdown/client & sleep 1; kill -TERM $srv; wait
#include "daemon_api.hpp"

#include <cstdio>

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<DaemonApi, 4> pool;
  lemsg::TypedClient<DaemonApi> daemon(loop, pool);

  // Legato's le_msg_SetSessionCloseHandler: the server's end went away.
  // Without set_reconnect() the session stays closed afterwards.
  bool closed = false;
  lemsg::Result why = lemsg::Result::Ok;
  daemon.session().set_close_handler([&](lemsg::Result reason) {
    closed = true;
    why = reason;
    std::printf("client: the daemon closed the session (%s)\n", lemsg::to_string(reason));
  });

  if (daemon.open_sync(kDaemonService, 5000) != lemsg::Result::Ok) return 1;
  Version version;
  if (daemon.call<GetVersion>({}, version, 2000) != lemsg::Result::Ok) return 1;
  std::printf("client: daemon %s; waiting for it to stop\n", version.text.c_str());
  std::fflush(stdout);

  for (int i = 0; i < 600 && !closed; ++i) (void)loop.run_once(100);
  return closed && why == lemsg::Result::Closed && !daemon.is_open() ? 0 : 1;
}
