// lemsg: look at the services of a running device (lemsg.hpp section 13).
//
//   lemsg list [--json]              services and whether each is live; in
//                                    directory mode (LEMSG_DIRECTORY set) the
//                                    registered services with their owners,
//                                    the waiting clients and the bindings
//   lemsg info NAME [--json]         a service's own figures (root or the
//                                    service's user only)
//   lemsg monitor NAME [COUNT] [--payload] [--json]  one line per frame the
//                                    service sends or receives, until
//                                    interrupted (or COUNT lines)
//   lemsg wait NAME [TIMEOUT_MS]     exit 0 as soon as NAME is up (default
//                                    timeout 10000 ms; 0 looks once), for
//                                    start-up scripts; 1 when it is not
//   lemsg bindings [--json]          the directory's bindings
//
// Exit status: 0 done; 1 the service (or, in directory mode, the directory)
// is not there, refused the request or did not answer in time; 2 a bad
// command line or another error.
#define _FILE_OFFSET_BITS 64  // readdir on 32-bit targets under qemu-user
#include "lemsg.hpp"

#include <dirent.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

bool json = false;

int usage() {
  std::fprintf(stderr,
               "usage: lemsg list [--json]\n"
               "       lemsg info NAME [--json]\n"
               "       lemsg monitor NAME [COUNT] [--payload] [--json]\n"
               "       lemsg wait NAME [TIMEOUT_MS]\n"
               "       lemsg bindings [--json]\n");
  return 2;
}

bool directory_mode() {
  char path[sizeof(sockaddr_un::sun_path)];
  return lemsg::detail::directory_mode(lemsg::Discovery::Auto, path);
}

// A JSON string: quotes, backslashes and control characters escaped.
void put_json(const char* s) {
  std::putchar('"');
  for (; *s; ++s) {
    const unsigned char c = static_cast<unsigned char>(*s);
    if (c == '"' || c == '\\') std::printf("\\%c", c);
    else if (c < 0x20) std::printf("\\u%04x", c);
    else std::putchar(c);
  }
  std::putchar('"');
}

// The user's name from the passwd file, or the uid when it has none (as a
// bindings file may write either).
const char* user(uid_t uid, char (&buf)[80]) {
  if (!lemsg::detail::user_name(uid, buf, sizeof buf)) std::snprintf(buf, sizeof buf, "%u", static_cast<unsigned>(uid));
  return buf;
}

int fail(const char* what, lemsg::Result r) {
  std::fprintf(stderr, "lemsg: %s: %s\n", what, lemsg::to_string(r));
  return r == lemsg::Result::NotFound || r == lemsg::Result::NotPermitted || r == lemsg::Result::Timeout ? 1 : 2;
}

int list_direct() {
  const char* dir = lemsg::runtime_dir();
  DIR* d = opendir(dir);
  if (!d) {
    std::fprintf(stderr, "lemsg: cannot read %s: %s\n", dir, std::strerror(errno));
    return 2;
  }
  if (json) std::printf("{\"mode\":\"direct\",\"runtime_dir\":"), put_json(dir), std::printf(",\"services\":[");
  else std::printf("runtime dir %s (direct mode)\n", dir);
  int n = 0;
  while (struct dirent* e = readdir(d)) {
    char path[sizeof(sockaddr_un::sun_path)];
    struct stat st;
    if (lemsg::detail::socket_path(e->d_name, path) != lemsg::Result::Ok || lstat(path, &st) != 0 ||
        !S_ISSOCK(st.st_mode))
      continue;
    int fd = -1;
    const lemsg::Result r = lemsg::detail::connect_to(path, fd);
    if (fd >= 0) close(fd);  // a connection that sends no hello: the service closes it quietly
    const char* state = r == lemsg::Result::Ok             ? "live"
                        : r == lemsg::Result::NotFound     ? "stale (nobody listens)"
                        : r == lemsg::Result::NotPermitted ? "no access"
                        : r == lemsg::Result::Busy         ? "live (backlog full)"
                                                           : lemsg::to_string(r);
    char owner[80];
    // (the owner's uid is in the JSON too)
    if (json) {
      std::printf("%s{\"name\":", n ? "," : "");
      put_json(e->d_name);
      std::printf(",\"state\":");
      put_json(state);
      std::printf(",\"owner\":");
      put_json(user(st.st_uid, owner));
      std::printf(",\"uid\":%u", static_cast<unsigned>(st.st_uid));
      std::printf(",\"mode\":\"%04o\"}", static_cast<unsigned>(st.st_mode & 07777));
    } else {
      std::printf("  %-24s %-22s owner %s mode %04o\n", e->d_name, state, user(st.st_uid, owner),
                  static_cast<unsigned>(st.st_mode & 07777));
    }
    ++n;
  }
  closedir(d);
  if (json) std::printf("]}\n");
  else if (!n) std::printf("  (no services)\n");
  return 0;
}

// Lists the directory's entries of the kinds asked for.
int list_directory(bool services, bool bindings) {
  if (json) std::printf("{\"mode\":\"directory\"");
  // Three passes keep the output grouped without storing the entries.
  for (int pass = 0; pass < 3; ++pass) {
    const lemsg::DirectoryEntry::Kind kinds[3] = {lemsg::DirectoryEntry::Service, lemsg::DirectoryEntry::WaitingClient,
                                         lemsg::DirectoryEntry::Binding};
    if ((pass < 2 && !services) || (pass == 2 && !bindings)) continue;
    static const char* const titles[3] = {"services", "waiting", "bindings"};
    if (json) std::printf(",\"%s\":[", titles[pass]);
    else std::printf("%s:\n", titles[pass]);
    int count = 0;
    const lemsg::Result r = lemsg::directory_list(
        [&](const lemsg::DirectoryEntry& e) {
          if (e.kind != kinds[pass]) return;
          char u[80], s[80];
          if (json) {
            std::printf("%s{", count ? "," : "");
            if (pass == 0) {
              std::printf("\"name\":"), put_json(e.name), std::printf(",\"owner\":"), put_json(user(e.uid, u));
              std::printf(",\"uid\":%u,\"pid\":%ld,\"protocol\":", static_cast<unsigned>(e.uid), static_cast<long>(e.pid));
              put_json(e.text);
              std::printf(",\"max_payload\":%lu", static_cast<unsigned long>(e.max_payload));
            } else if (pass == 1) {
              std::printf("\"interface\":"), put_json(e.name), std::printf(",\"client\":"), put_json(user(e.uid, u));
              std::printf(",\"uid\":%u,\"pid\":%ld", static_cast<unsigned>(e.uid), static_cast<long>(e.pid));
            } else {
              std::printf("\"client\":"), put_json(user(e.uid, u)), std::printf(",\"client_uid\":%u", static_cast<unsigned>(e.uid));
              std::printf(",\"interface\":"), put_json(e.name);
              std::printf(",\"server\":"), put_json(user(e.server_uid, s));
              std::printf(",\"server_uid\":%u,\"service\":", static_cast<unsigned>(e.server_uid)), put_json(e.text);
            }
            std::printf("}");
          } else if (pass == 0) {
            std::printf("  %-24s owner %-16s pid %-7ld %s (max %lu bytes)\n", e.name, user(e.uid, u),
                        static_cast<long>(e.pid), e.text, static_cast<unsigned long>(e.max_payload));
          } else if (pass == 1) {
            std::printf("  %-16s pid %-7ld waits for %s\n", user(e.uid, u), static_cast<long>(e.pid), e.name);
          } else {
            std::printf("  %s.%s -> %s.%s\n", user(e.uid, u), e.name, user(e.server_uid, s), e.text);
          }
          ++count;
        },
        5000);
    if (r != lemsg::Result::Ok) {
      if (json) std::printf("]}\n");
      return fail("the directory", r);
    }
    if (json) std::printf("]");
    else if (!count) std::printf("  (none)\n");
  }
  if (json) std::printf("}\n");
  return 0;
}

lemsg::ServiceInfo info;  // large (a line per possible session): not on the stack

int show_info(const char* name) {
  const lemsg::Result r = lemsg::query_info(name, info, 5000);
  if (r != lemsg::Result::Ok) return fail(name, r);
  const lemsg::ServiceCounters& k = info.counters;
  const char* mode = info.mode == lemsg::ServiceMode::Directory ? "directory" : "direct";
  char u[80];
  if (json) {
    std::printf("{\"name\":"), put_json(info.name), std::printf(",\"protocol\":"), put_json(info.protocol_id);
    std::printf(",\"max_payload\":%lu,\"mode\":\"%s\",\"pid\":%ld,\"owner\":", static_cast<unsigned long>(info.max_payload),
                mode, static_cast<long>(info.server.pid));
    put_json(user(info.server.uid, u));
    std::printf(",\"uid\":%u,\"pool\":{\"in_use\":%lu,\"high_water\":%lu,\"capacity\":%lu},\"monitors\":%lu,\"sessions\":[",
                static_cast<unsigned>(info.server.uid), static_cast<unsigned long>(info.pool_in_use),
                static_cast<unsigned long>(info.pool_high_water), static_cast<unsigned long>(info.pool_capacity),
                static_cast<unsigned long>(info.monitors));
    for (std::uint32_t i = 0; i < info.session_count; ++i) {
      const lemsg::SessionInfo& s = info.sessions[i];
      std::printf("%s{\"session\":%lu,\"pid\":%ld,\"uid\":%u,\"gid\":%u,\"pending\":%lu,\"queued\":%lu}", i ? "," : "",
                  static_cast<unsigned long>(s.session.value), static_cast<long>(s.creds.pid),
                  static_cast<unsigned>(s.creds.uid), static_cast<unsigned>(s.creds.gid),
                  static_cast<unsigned long>(s.pending), static_cast<unsigned long>(s.queued));
    }
    std::printf("],\"counters\":{\"requests\":%llu,\"responses\":%llu,\"messages_in\":%llu,\"messages_out\":%llu,"
                "\"bad_frames\":%llu,\"opened\":%llu,\"refused\":%llu,\"monitors_dropped\":%llu,\"closed_by_client\":%llu,"
                "\"closed_here\":%llu,\"closed_bad_frame\":%llu,\"closed_too_large\":%llu,\"closed_overflow\":%llu,"
                "\"closed_stalled\":%llu,\"closed_other\":%llu}}\n",
                static_cast<unsigned long long>(k.requests), static_cast<unsigned long long>(k.responses),
                static_cast<unsigned long long>(k.messages_in), static_cast<unsigned long long>(k.messages_out),
                static_cast<unsigned long long>(k.bad_frames), static_cast<unsigned long long>(k.opened),
                static_cast<unsigned long long>(k.refused), static_cast<unsigned long long>(k.monitors_dropped),
                static_cast<unsigned long long>(k.closed_by_client), static_cast<unsigned long long>(k.closed_here),
                static_cast<unsigned long long>(k.closed_bad_frame), static_cast<unsigned long long>(k.closed_too_large),
                static_cast<unsigned long long>(k.closed_overflow), static_cast<unsigned long long>(k.closed_stalled),
                static_cast<unsigned long long>(k.closed_other));
    return 0;
  }
  std::printf("service   %s (%s mode), pid %ld, user %s\n", info.name, mode, static_cast<long>(info.server.pid),
              user(info.server.uid, u));
  std::printf("protocol  %s, max payload %lu bytes\n", info.protocol_id, static_cast<unsigned long>(info.max_payload));
  std::printf("pool      %lu of %lu blocks in use, high-water mark %lu\n", static_cast<unsigned long>(info.pool_in_use),
              static_cast<unsigned long>(info.pool_capacity), static_cast<unsigned long>(info.pool_high_water));
  std::printf("sessions  %lu (monitors attached: %lu)\n", static_cast<unsigned long>(info.session_count),
              static_cast<unsigned long>(info.monitors));
  for (std::uint32_t i = 0; i < info.session_count; ++i) {
    const lemsg::SessionInfo& s = info.sessions[i];
    std::printf("  session %-8lu pid %-7ld user %-12s gid %-6u pending %-4lu queued %lu\n",
                static_cast<unsigned long>(s.session.value), static_cast<long>(s.creds.pid), user(s.creds.uid, u),
                static_cast<unsigned>(s.creds.gid), static_cast<unsigned long>(s.pending),
                static_cast<unsigned long>(s.queued));
  }
  std::printf("counters  requests %llu, responses %llu, messages in %llu, out %llu, bad frames %llu\n",
              static_cast<unsigned long long>(k.requests), static_cast<unsigned long long>(k.responses),
              static_cast<unsigned long long>(k.messages_in), static_cast<unsigned long long>(k.messages_out),
              static_cast<unsigned long long>(k.bad_frames));
  std::printf("          sessions opened %llu, refused %llu; closed by the client %llu, by the server %llu,\n"
              "          bad frame %llu, too large %llu, overflow %llu, stalled %llu, other %llu; monitors dropped %llu\n",
              static_cast<unsigned long long>(k.opened), static_cast<unsigned long long>(k.refused),
              static_cast<unsigned long long>(k.closed_by_client), static_cast<unsigned long long>(k.closed_here),
              static_cast<unsigned long long>(k.closed_bad_frame), static_cast<unsigned long long>(k.closed_too_large),
              static_cast<unsigned long long>(k.closed_overflow), static_cast<unsigned long long>(k.closed_stalled),
              static_cast<unsigned long long>(k.closed_other), static_cast<unsigned long long>(k.monitors_dropped));
  return 0;
}

const char* frame_name(lemsg::wire::FrameType t) {
  switch (t) {
    case lemsg::wire::FrameType::Message: return "message";
    case lemsg::wire::FrameType::Request: return "request";
    case lemsg::wire::FrameType::Response: return "response";
    default: return "control";
  }
}

// Until the service goes, the monitor is dropped, or `limit` records (0: no limit).
int monitor(const char* name, bool payload, long limit) {
  lemsg::Monitor m;
  lemsg::Result r = m.attach(name, payload, 5000);
  if (r != lemsg::Result::Ok) return fail(name, r);
  if (!json) std::printf("monitoring %s (time s, direction, session, frame, txn, bytes)\n", name);
  std::fflush(stdout);
  lemsg::MonitorRecord rec;
  for (long n = 0; limit == 0 || n < limit;) {
    r = m.next(rec, 1000);
    if (r == lemsg::Result::Timeout) continue;
    if (r != lemsg::Result::Ok) {
      std::fprintf(stderr, "lemsg: monitor of %s ended: %s\n", name, lemsg::to_string(r));
      return 1;
    }
    ++n;
    const double t = static_cast<double>(rec.time_ns) / 1e9;
    const char* dir = rec.direction == lemsg::Direction::In ? "in" : "out";
    if (json) {
      std::printf("{\"time\":%.6f,\"direction\":\"%s\",\"session\":%lu,\"frame\":\"%s\",\"txn\":%lu,\"size\":%lu,"
                  "\"fd\":%s,\"error\":%s",
                  t, dir, static_cast<unsigned long>(rec.session.value), frame_name(rec.type),
                  static_cast<unsigned long>(rec.txn), static_cast<unsigned long>(rec.size), rec.has_fd ? "true" : "false",
                  rec.error ? "true" : "false");
      if (payload) {
        std::printf(",\"payload\":\"");
        for (std::uint32_t i = 0; i < rec.payload_size; ++i) std::printf("%02x", rec.payload[i]);
        std::printf("\"");
      }
      std::printf("}\n");
    } else {
      std::printf("%.6f %-3s session %-8lu %-8s txn %-10lu %5lu bytes%s%s", t, dir,
                  static_cast<unsigned long>(rec.session.value), frame_name(rec.type),
                  static_cast<unsigned long>(rec.txn), static_cast<unsigned long>(rec.size), rec.has_fd ? " +fd" : "",
                  rec.error ? " (error)" : "");
      if (payload && rec.payload_size) {
        std::printf("  ");
        for (std::uint32_t i = 0; i < rec.payload_size; ++i) std::printf("%02x", rec.payload[i]);
      }
      std::printf("\n");
    }
    std::fflush(stdout);
  }
  return 0;
}

int wait_for(const char* name, int timeout_ms) {
  lemsg::Result r;
  if (directory_mode()) {
    r = lemsg::directory_wait(name, timeout_ms);
  } else {
    char path[sizeof(sockaddr_un::sun_path)];
    r = lemsg::detail::socket_path(name, path);
    if (r != lemsg::Result::Ok) return fail(name, r);
    const std::int64_t deadline = lemsg::detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
    lemsg::detail::SocketWaiter waiter;
    bool watched = false;
    for (;;) {
      int fd = -1;
      r = lemsg::detail::connect_to(path, fd);
      if (fd >= 0) close(fd);
      if (r == lemsg::Result::Ok || r == lemsg::Result::Busy) {
        r = lemsg::Result::Ok;
        break;
      }
      if (r != lemsg::Result::NotFound) break;
      if (lemsg::detail::ms_until(deadline) == 0) {
        r = timeout_ms == 0 ? lemsg::Result::NotFound : lemsg::Result::Timeout;
        break;
      }
      if (!watched) {
        watched = true;
        (void)waiter.start(path);
        continue;
      }
      waiter.wait(path, lemsg::detail::ms_until(deadline), false);
    }
  }
  if (r != lemsg::Result::Ok) return fail(name, r);
  std::printf("%s is up\n", name);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const char* cmd = argv[1];
  const char* name = nullptr;
  const char* number = nullptr;
  bool payload = false;
  for (int i = 2; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0) json = true;
    else if (std::strcmp(argv[i], "--payload") == 0) payload = true;
    else if (!name) name = argv[i];
    else if (!number) number = argv[i];
    else return usage();
  }
  if (std::strcmp(cmd, "info") == 0 && name && !number) return show_info(name);
  if (std::strcmp(cmd, "monitor") == 0 && name) {
    // A record count, after the name, stops it (for scripts and tests).
    char* end = nullptr;
    const long limit = number ? std::strtol(number, &end, 10) : 0;
    if ((number && (*end || end == number)) || limit < 0) return usage();
    return monitor(name, payload, limit);
  }
  if (std::strcmp(cmd, "list") == 0 && !name) return directory_mode() ? list_directory(true, true) : list_direct();
  if (std::strcmp(cmd, "bindings") == 0 && !name) return list_directory(false, true);
  if (std::strcmp(cmd, "wait") == 0 && name) {
    char* end = nullptr;
    const long t = number ? std::strtol(number, &end, 10) : 10000;
    if ((number && (*end || end == number)) || t < 0 || t > 86400000) return usage();
    return wait_for(name, static_cast<int>(t));
  }
  return usage();
}
