// client.cpp: the UI app of examples/directory. It asks the directory for
// the interface it calls "position"; its binding (in the bindings file, by
// this process's user) names the service and the user that must run it. It
// waits up to 10 s for the binding and the server, reads one fix and exits 0;
// 1 otherwise. See server.cpp for how to run it.
#include "location_api.hpp"

#include <unistd.h>

#include <cstdio>

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<LocationApi, 4> pool;
  lemsg::TypedClient<LocationApi> position(loop, pool);
  const lemsg::Result opened = position.open_sync("position", 10000);
  if (opened != lemsg::Result::Ok) {
    std::fprintf(stderr, "client: open: %s\n", lemsg::to_string(opened));
    return 1;
  }
  lemsg::Credentials server;
  if (position.session().server_credentials(server) != lemsg::Result::Ok) return 1;
  Fix fix;
  const lemsg::Result r = position.call<GetFix>({}, fix, 2000);
  if (r != lemsg::Result::Ok) {
    std::fprintf(stderr, "client: GetFix: %s\n", lemsg::to_string(r));
    return 1;
  }
  std::printf("client (uid %u): \"position\" is served by uid %u pid %ld: %.5f, %.5f from %u satellites (%s)\n",
              static_cast<unsigned>(getuid()), static_cast<unsigned>(server.uid), static_cast<long>(server.pid),
              fix.lat_e7 / 1e7, fix.lon_e7 / 1e7, fix.satellites, fix.source.c_str());
  return 0;
}
