// lemsg-dir: the service directory daemon (lemsg.hpp section 13).
//
//   lemsg-dir [-b BINDINGS] [-s SOCKET]    run (in the foreground; systemd
//                                          or your init keeps it running)
//   lemsg-dir --check BINDINGS             check a bindings file and exit
//
// BINDINGS defaults to /etc/lemsg/bindings when that file exists (else
// nothing is bound). SOCKET defaults to LEMSG_DIRECTORY when it is a path,
// else <runtime dir>/directory ($LEMSG_RUNTIME_DIR or /run/lemsg). SIGHUP
// reloads the bindings (a file with errors is reported and the old bindings
// stay); SIGTERM and SIGINT stop it. Exit status: 0 after a stop or a good
// check, 1 for a bindings file that is missing or has an error (the message
// names the file and line), 2 for a bad command line or another failure to
// start.
#include "lemsg.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstring>

namespace {

int usage() {
  std::fprintf(stderr, "usage: lemsg-dir [-b BINDINGS] [-s SOCKET]\n       lemsg-dir --check BINDINGS\n");
  return 2;
}

lemsg::Bindings bindings;  // large: static storage, not the stack

}  // namespace

int main(int argc, char** argv) {
  const char* file = nullptr;
  const char* socket = nullptr;
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--check") == 0 && has_value && argc == 3) {
      char err[512];
      const lemsg::Result r = bindings.load(argv[i + 1], err, sizeof err);
      if (r != lemsg::Result::Ok) {
        std::fprintf(stderr, "%s\n", err[0] ? err : lemsg::to_string(r));
        return 1;
      }
      std::printf("%s: %lu bindings, no errors\n", argv[i + 1], static_cast<unsigned long>(bindings.size()));
      return 0;
    }
    if (std::strcmp(argv[i], "-b") == 0 && has_value) file = argv[++i];
    else if (std::strcmp(argv[i], "-s") == 0 && has_value) socket = argv[++i];
    else return usage();
  }
  if (!file && access("/etc/lemsg/bindings", F_OK) == 0) file = "/etc/lemsg/bindings";

  // Static storage, not the stack: the directory's tables and its bindings
  // (about 100 KiB with the default capacities; pages never touched, like
  // the --check table's above, cost no RAM).
  static lemsg::Loop loop;
  static lemsg::Directory dir(loop);
  lemsg::DirectoryOptions options;
  options.socket_path = socket;
  options.bindings_path = file;
  char err[512];
  lemsg::Result r = dir.start(options, err, sizeof err);
  if (r == lemsg::Result::Ok) r = dir.handle_signals();
  if (r != lemsg::Result::Ok) {
    std::fprintf(stderr, "lemsg-dir: %s\n", err[0] ? err : lemsg::to_string(r));
    return err[0] ? 1 : 2;  // a message in err: the bindings file's
  }
  std::fprintf(stderr, "lemsg-dir: listening at %s with %lu bindings%s%s\n", dir.socket_path(),
               static_cast<unsigned long>(dir.bindings().size()), file ? " from " : "", file ? file : "");
  r = loop.run();
  return r == lemsg::Result::Ok ? 0 : 2;
}
