// server.cpp: the file service of examples/fdpass (the interface is in
// files_api.hpp, the client in client.cpp). It serves one file, apn.conf: at
// start it writes it into a memfd (a file in memory, with no path) and seals
// it, so that nobody can change it any more; OpenFile answers with a
// descriptor of it, any other name with NotFound. The client then reads the
// file itself, with no copy through the socket and no path it would need
// the rights to open. It exits 0 once a client got the file and left, 1 if
// none did within 20 s.
//
// With the plain Message API the same is Message::set_fd() on the response
// (le_msg_SetFd) and Message::take_fd() on the client (le_msg_GetFd).
//
//   make examples                 builds every example into build/host/examples/
//   make examples TARGET=armhf    the same for ARM, into build/armhf/examples/
// Run it by hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/fdpass/server & build/host/examples/fdpass/client
#include "files_api.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

const char kApnConf[] =
    "# apn.conf: the modem's data connection\n"
    "apn=internet.acme\n"
    "auth=none\n";

// Makes `out` a memfd named `name` that holds `text`, sealed against any
// write, growth or shrinking, by anyone: a client may read it but not
// change what the next client reads. False on failure (errno says why).
bool make_sealed_file(const char* name, const char* text, OpenedFile& out) {
  const int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return false;
  out.file.reset(fd);  // the Fd owns it from here: it closes it when it goes
  const std::size_t n = std::strlen(text);
  out.size = static_cast<std::uint32_t>(n);
  return ::write(fd, text, n) == static_cast<ssize_t>(n) &&
         fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) == 0;
}

struct Files {
  OpenedFile apn;  // the server's own descriptor of apn.conf, and its size
  unsigned handed = 0;
};

int main() {
  Files files;  // before the service, whose handler refers to it
  if (!make_sealed_file("apn.conf", kApnConf, files.apn)) {
    std::perror("server: apn.conf");
    return 1;
  }
  lemsg::Loop loop;
  lemsg::TypedPool<FilesApi, 4> pool;
  lemsg::TypedService<FilesApi> svc(loop, pool);

  svc.set_handler<OpenFile>([&files](lemsg::Responder<OpenFile>& call, FileName& req) {
    if (req.name != "apn.conf") {
      std::printf("server: no file \"%s\"\n", req.name.c_str());
      (void)call.fail(lemsg::Result::NotFound);
      return;
    }
    // reply() sends a duplicate of the descriptor: the server keeps its
    // own, for the next client. Both name one open file, offset included,
    // so a reader must use pread(), not read() (see client.cpp).
    const lemsg::Result r = call.reply(files.apn);
    if (r == lemsg::Result::Ok) ++files.handed;
    std::printf("server: apn.conf (%u bytes) handed out: %s\n", files.apn.size, lemsg::to_string(r));
  });

  // The server's work is done when its client leaves.
  svc.service().set_close_handler([&](lemsg::SessionRef, lemsg::Result) { loop.stop(); });
  lemsg::TimerId give_up;
  if (loop.add_timer([&loop] { loop.stop(); }, give_up) != lemsg::Result::Ok ||
      loop.arm_timer(give_up, 20000) != lemsg::Result::Ok || svc.advertise(kFilesService) != lemsg::Result::Ok ||
      loop.run() != lemsg::Result::Ok)
    return 1;
  return files.handed > 0 && loop.is_armed(give_up) ? 0 : 1;
}
