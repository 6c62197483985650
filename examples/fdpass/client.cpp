// client.cpp: a client of the file service of examples/fdpass (server.cpp;
// the interface is in files_api.hpp). It asks for apn.conf, gets a file
// descriptor in the answer, reads the file from it and prints it; checks
// that the file is sealed (a write is refused), and that a file the server
// does not serve is NotFound. Exits 0 when all of that held, 1 otherwise.
//
//   make examples                 builds every example into build/host/examples/
//   make examples TARGET=armhf    the same for ARM, into build/armhf/examples/
// Run it by hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/fdpass/server & build/host/examples/fdpass/client
#include "files_api.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

// Reads the file from its start into `buf` (NUL-terminated); the byte count
// or -1. pread(), not read(): the descriptor shares its offset with the
// server's (one open file, passed as is), and the server's write left that
// offset at the end, so read() would find nothing.
ssize_t read_whole(int fd, char* buf, std::size_t cap) {
  std::size_t got = 0;
  while (got + 1 < cap) {
    const ssize_t n = pread(fd, buf + got, cap - 1 - got, static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  buf[got] = '\0';
  return static_cast<ssize_t>(got);
}

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<FilesApi, 4> pool;
  lemsg::TypedClient<FilesApi> files(loop, pool);
  if (files.open_sync(kFilesService, 10000) != lemsg::Result::Ok) return 1;

  // The descriptor arrives in the answer's Fd, this process's own now: it
  // closes when `apn` goes (or keep it with apn.file.release()).
  OpenedFile apn;
  const lemsg::Result opened = files.call<OpenFile>({"apn.conf"}, apn, 10000);
  char text[256] = "";
  const ssize_t n = opened == lemsg::Result::Ok ? read_whole(apn.file.get(), text, sizeof text) : -1;
  if (n >= 0) std::printf("client: apn.conf, %d bytes:\n%s", static_cast<int>(n), text);

  // The server sealed the file: this descriptor may write, yet the kernel
  // refuses it (EPERM), so no client can change what the next one reads.
  const bool sealed = apn.file.valid() && ::write(apn.file.get(), "#", 1) < 0 && errno == EPERM;
  std::printf("client: writing to it: %s\n", sealed ? "refused, the file is sealed" : "not refused");

  // A name the server does not serve: the call fails, and no descriptor comes.
  OpenedFile none;
  const lemsg::Result missing = files.call<OpenFile>({"shadow"}, none, 10000);
  std::printf("client: shadow: %s\n", lemsg::to_string(missing));
  files.close();

  const bool expected = opened == lemsg::Result::Ok && n == static_cast<ssize_t>(apn.size) &&
                        std::strncmp(text, "# apn.conf", 10) == 0 && std::strstr(text, "\napn=internet.acme\n") &&
                        sealed && missing == lemsg::Result::NotFound && !none.file.valid();
  return expected ? 0 : 1;
}
