// server.cpp: the GNSS app of examples/directory. It registers the service
// "location" with the service directory (lemsg-dir) and answers GetFix. It
// knows nothing of its clients: the directory's bindings decide who reaches
// it. It exits 0 once a client has come and gone, 1 if none came in 20 s.
//
//   make demo-directory    lemsg-dir, this server as one user and client.cpp
//                          as another, with a bindings file between them
// By hand (three shells, one runtime dir):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d) LEMSG_DIRECTORY=1
//   echo "$(id -u).position -> $(id -u).location" > $LEMSG_RUNTIME_DIR/bindings
//   build/host/examples/lemsg-dir -b $LEMSG_RUNTIME_DIR/bindings &
//   build/host/examples/directory/server & build/host/examples/directory/client
// LEMSG_DIRECTORY=1 is the only difference from a direct-mode program: the
// same binary runs both ways.
#include "location_api.hpp"

#include <unistd.h>

#include <cstdio>

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<LocationApi, 4> pool;
  lemsg::TypedService<LocationApi> svc(loop, pool);
  int served = 0;
  svc.set_handler<GetFix>([&](lemsg::Responder<GetFix>& call, lemsg::Void&) {
    ++served;
    (void)call.reply({473977000, 85456000, 9, "gps+galileo"});
  });
  svc.service().set_open_handler([&](lemsg::SessionRef s) {
    lemsg::Credentials c;
    if (svc.service().credentials(s, c) == lemsg::Result::Ok)
      std::printf("server (uid %u): a client of uid %u, pid %ld, handed over by the directory\n",
                  static_cast<unsigned>(getuid()), static_cast<unsigned>(c.uid), static_cast<long>(c.pid));
  });
  svc.service().set_close_handler([&](lemsg::SessionRef, lemsg::Result) { loop.stop(); });
  lemsg::TimerId give_up;
  const lemsg::Result r = svc.advertise("location");
  if (r != lemsg::Result::Ok) {
    std::fprintf(stderr, "server: advertise: %s\n", lemsg::to_string(r));
    return 1;
  }
  std::printf("server (uid %u): registered \"location\"\n", static_cast<unsigned>(getuid()));
  std::fflush(stdout);
  if (loop.add_timer([&] { loop.stop(); }, give_up) != lemsg::Result::Ok || loop.arm_timer(give_up, 20000) != lemsg::Result::Ok ||
      loop.run() != lemsg::Result::Ok)
    return 1;
  return served > 0 ? 0 : 1;
}
