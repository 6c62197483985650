// Size probe for the typed layer (section 12): the modem example of
// examples/modem (server.cpp and client.cpp, their main() renamed), with the
// typed service, client, responders and one event, on top of the messaging
// layer they are built on. Built at -Os by `make size`; compare with
// size_messaging, which uses the untyped layer alone (and more of it). Run
// with no argument, it forks: the child serves, the parent is the client; it
// exits 0 when both did, 1 otherwise.
#include "lemsg.hpp"

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

// Both programs in an unnamed namespace, as tests/examples.cpp does (the
// headers they include are included above, so the wrapping holds only theirs).
namespace {
#define main modem_server_main
#include "examples/modem/server.cpp"
#undef main
#define main modem_client_main
#include "examples/modem/client.cpp"
#undef main
}  // namespace

int main(int argc, char**) {
  if (argc > 1) return 2;  // nothing to do; keeps main() from being folded away
  char dir[] = "/tmp/lemsg-size-XXXXXX";
  if (!::mkdtemp(dir) || ::setenv("LEMSG_RUNTIME_DIR", dir, 1) != 0) return 1;
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(modem_server_main());
  int rc = pid > 0 ? modem_client_main() : 1;
  int st = 0;
  if (pid > 0 && (::waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)) rc = 1;
  ::rmdir(dir);
  return rc;
}
