// demo: a service lends the modem's only AT port to one client at a time,
// and nothing is lost when a client or the server is killed with kill -9.
//
// What it shows, one line per event, each prefixed by who speaks:
//   - a typed service ("modem", interface AtPort: Take and GiveBack) hands
//     out the AT port; the lease is a Ref<Lease> the server makes for the
//     borrower's session (TypedService::make_ref), so it comes back when
//     that session ends and the server never has to ask "is that client
//     still alive?";
//   - three clients take turns: take, give back, "busy", or wait in line
//     (the server keeps the call's Responder and answers it when the port
//     frees);
//   - client 2 is killed with kill -9 while it holds the port: the server's
//     close handler and the lease's release run, and the client waiting in
//     line gets the port;
//   - the server is killed with kill -9 and a new one started: the clients'
//     pending calls complete with Closed, they reconnect by themselves
//     (Session::set_reconnect) and carry on; a lease from the killed server
//     is refused (BadReference) before the new server's handler sees it.
// Every process is forked from this one (no exec), and the services live in
// a private runtime directory (LEMSG_RUNTIME_DIR) removed at the end. Each
// step is checked: the demo exits 1 if something does not happen as told
// within a few seconds, 0 otherwise.
//
//   make demo                  build and run it on the host
//   make demo TARGET=armhf     the same, built for ARM and run under qemu-arm
//   build/host/examples/demo   run it again
#include "lemsg.hpp"

#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <ctime>

namespace {

using lemsg::Result;
using lemsg::SessionRef;

constexpr char kService[] = "modem";
constexpr int kClients = 3;
constexpr int kStepMs = 5000;  // the narrator waits at most this long for each event

// ---- narration ---------------------------------------------------------------

// One line per event, written with one write() so that lines from several
// processes never mix.
#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
void say(const char* who, const char* fmt, ...) {
  char line[240];
  int n = std::snprintf(line, sizeof line, "%-11s ", who);
  va_list ap;
  va_start(ap, fmt);
  const int m = std::vsnprintf(line + n, sizeof line - static_cast<std::size_t>(n) - 1, fmt, ap);
  va_end(ap);
  n += m < 0 ? 0 : m;
  if (n > static_cast<int>(sizeof line) - 2) n = static_cast<int>(sizeof line) - 2;
  line[n++] = '\n';
  ssize_t w = ::write(STDOUT_FILENO, line, static_cast<std::size_t>(n));
  (void)w;
}

long long now_ms() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// ---- what the children tell the narrator -------------------------------------

// Each child writes 2-byte records (who, event) to one pipe; the narrator
// checks that every step happened. Who: 0 the server, 1..3 the clients.
enum Event : char {
  ServerUp = 'u',
  Opened = 'o',    // a session opened (on the server and on the client)
  Holding = 'h',   // the server holds a call in its waiting line
  TookBack = 't',  // the server took the port back from a session that ended
  Lost = 'l',
  Granted = 'g',
  Busy = 'b',
  Released = 'r',
  EndedClosed = 'c',  // a pending call completed with Closed
  Refused = 'x',      // a GiveBack completed with BadReference
  Failed = 'f',
};
int g_report = -1;

void report(int who, Event e) {
  const char rec[2] = {static_cast<char>(who), e};
  ssize_t w = ::write(g_report, rec, 2);
  (void)w;
}

// ---- the interface -------------------------------------------------------------

// The AT port's lease, as the server keeps it. A client holds only a
// Ref<Lease>: a reference the server made for the client's own session.
struct Lease {
  int client = 0;  // who holds the port; 0: nobody
};

// The client's number travels for the story only: a real server would know
// its clients by their credentials.
struct Ask {
  std::uint8_t client;
  bool wait;  // if busy, wait in line rather than be told so at once
};
struct Answer {
  std::uint8_t holder;      // who holds the port now
  lemsg::Ref<Lease> lease;  // set when the port is the caller's; empty: busy
};
struct Return {
  lemsg::Ref<Lease> lease;
};

LEMSG_METHOD(Take, Ask, Answer);
// Only the caller's own live lease reaches the server's handler: any other
// (stale, forged, another session's) is refused with BadReference before.
LEMSG_METHOD(GiveBack, Return, lemsg::Void);
struct AtPort : lemsg::Interface<Take, GiveBack> {
  static constexpr const char* name = "demo.modem.at-port";
};

// ---- the server ----------------------------------------------------------------

struct ModemServer {
  lemsg::Loop loop;
  lemsg::TypedPool<AtPort, 16> pool;
  lemsg::TypedService<AtPort> svc{loop, pool};
  // One port, one lease. Its entry is owned by the borrower's session, so
  // when that session ends for any reason it comes back (see bind_refs()).
  lemsg::RefMap<Lease, 1> leases;
  Lease lease;
  lemsg::Ref<Lease> lease_ref;
  // Calls of clients waiting in line, answered when the port frees.
  lemsg::Responder<Take> line[kClients];
  int line_count = 0;
  int numbers[kClients + 1] = {0, 1, 2, 3};  // per-session context: the client's number
  lemsg::WatchId stop_watch;
};

int client_of(ModemServer* s, SessionRef ref) {
  const int* n = static_cast<const int*>(s->svc.service().context(ref));
  return n ? *n : 0;
}

// Answers a Take: the port with its lease, or busy.
void answer(ModemServer* s, lemsg::Responder<Take>& call, bool granted) {
  Answer a{static_cast<std::uint8_t>(s->lease.client), {}};
  if (granted) a.lease = s->lease_ref;
  const Result r = call.reply(a);
  if (r != Result::Ok && r != Result::Closed) say("[server]", "could not answer: %s", lemsg::to_string(r));
}

bool lend(ModemServer* s, SessionRef to, int client) {
  if (s->svc.make_ref(to, &s->lease, s->lease_ref) != Result::Ok) return false;
  s->lease.client = client;
  return true;
}

// The port is free: the first client in line whose session is still open gets it.
void serve_line(ModemServer* s) {
  while (s->lease.client == 0 && s->line_count > 0) {
    lemsg::Responder<Take> call = std::move(s->line[0]);
    for (int i = 1; i < s->line_count; ++i) s->line[i - 1] = std::move(s->line[i]);
    --s->line_count;
    const int client = client_of(s, call.session());
    if (client == 0 || !lend(s, call.session(), client)) continue;  // its session ended while waiting
    say("[server]", "AT port lent to client %d, who was waiting in line", client);
    answer(s, call, true);
  }
}

void on_take(ModemServer* s, lemsg::Responder<Take>& call, const Ask& ask) {
  const int c = ask.client;
  if (c < 1 || c > kClients) {
    say("[server]", "refusing a request from an unknown client");
    (void)call.fail(Result::BadParameter);
    return;
  }
  (void)s->svc.service().set_context(call.session(), &s->numbers[c]);
  if (s->lease.client == 0) {
    if (!lend(s, call.session(), c)) return;  // dropped: the client's call completes with Unanswered
    say("[server]", "AT port lent to client %d", c);
    answer(s, call, true);
  } else if (ask.wait && s->line_count < kClients) {
    say("[server]", "client %d waits in line for the AT port (client %d has it)", c, s->lease.client);
    s->line[s->line_count++] = std::move(call);  // answered later, by serve_line()
    report(0, Holding);
  } else {
    say("[server]", "client %d asks for the AT port: busy, client %d has it", c, s->lease.client);
    answer(s, call, false);
  }
}

void on_give_back(ModemServer* s, lemsg::Responder<GiveBack>& call, const Return& ret) {
  // The lease is the caller's own (the typed layer checked it): the port is theirs.
  say("[server]", "client %d gave the AT port back", s->svc.object(ret.lease)->client);
  (void)s->svc.drop_ref(ret.lease);
  s->lease.client = 0;
  (void)call.reply({});
  serve_line(s);
}

int run_server(int stop_fd) {
  ModemServer s;
  ModemServer* sp = &s;
  lemsg::Service& svc = s.svc.service();
  if (s.svc.status() != Result::Ok) return 1;
  svc.set_open_handler([sp](SessionRef ref) {
    lemsg::Credentials c;
    if (sp->svc.service().credentials(ref, c) == Result::Ok)
      say("[server]", "new session from pid %ld", static_cast<long>(c.pid));
    report(0, Opened);
  });
  svc.set_close_handler([sp](SessionRef ref, Result why) {
    const int c = client_of(sp, ref);
    if (c)
      say("[server]", "session of client %d ended (%s)", c,
          why == Result::Closed ? "the client closed it, or died" : lemsg::to_string(why));
  });
  s.svc.set_handler<Take>([sp](lemsg::Responder<Take>& call, Ask& ask) { on_take(sp, call, ask); });
  s.svc.set_handler<GiveBack>([sp](lemsg::Responder<GiveBack>& call, Return& ret) { on_give_back(sp, call, ret); });
  // Runs for each lease a closing session still owned.
  Result r = s.svc.bind_refs<Lease>(s.leases, [sp](void* obj, std::uint32_t) {
    say("[server]", "client %d still held the AT port: taking it back", static_cast<Lease*>(obj)->client);
    sp->lease.client = 0;
    report(0, TookBack);
    serve_line(sp);
  });
  // The narrator closes its end of the stop pipe to end this server cleanly.
  if (r == Result::Ok)
    r = s.loop.add_watch(stop_fd, lemsg::Readable, [sp](int, short) { sp->loop.stop(); }, s.stop_watch);
  if (r == Result::Ok) r = s.svc.advertise(kService);
  if (r != Result::Ok) {
    say("[server]", "cannot start: %s", lemsg::to_string(r));
    return 1;
  }
  say("[server]", "pid %ld: lending the modem's AT port as service \"%s\"", static_cast<long>(::getpid()), kService);
  report(0, ServerUp);
  if (s.loop.run() != Result::Ok) return 1;
  say("[server]", "told to stop: %zu session(s) still open, closing them", svc.session_count());
  return 0;
}

// ---- a client ------------------------------------------------------------------

struct ModemClient {
  int no = 0;
  char name[16] = {};
  lemsg::Loop loop;
  lemsg::TypedPool<AtPort, 8> pool;
  lemsg::TypedClient<AtPort> port{loop, pool};
  lemsg::Ref<Lease> lease;  // the last lease a server gave us, kept even when it is stale
  bool has_port = false;
  int opens = 0;
  lemsg::WatchId command_watch;
};

const char* what(bool wait) { return wait ? "wait in line for the AT port" : "take the AT port"; }

Result take(ModemClient* c, bool wait) {
  say(c->name, "asking to %s", what(wait));
  auto done = [c, wait](Result r, Answer& a) {
    if (r != Result::Ok) {
      say(c->name, "my request to %s ended: %s", what(wait), lemsg::to_string(r));
      report(c->no, r == Result::Closed ? EndedClosed : Failed);
    } else if (!a.lease) {
      say(c->name, "busy: client %d has the AT port", a.holder);
      report(c->no, Busy);
    } else {
      c->lease = a.lease;
      c->has_port = true;
      say(c->name, "got the AT port%s", wait ? " after waiting in line" : "");
      report(c->no, Granted);
    }
  };
  // Waiting in line may take long; the others are answered at once.
  return c->port.call_async<Take>({static_cast<std::uint8_t>(c->no), wait}, done, wait ? 15000 : 3000);
}

Result give_back(ModemClient* c) {
  say(c->name, "asking to give the AT port back");
  auto done = [c](Result r, lemsg::Void&) {
    if (r == Result::Ok) {
      c->has_port = false;
      say(c->name, "gave the AT port back");
    } else {
      say(c->name, "could not give the AT port back: %s", lemsg::to_string(r));
    }
    report(c->no, r == Result::Ok ? Released : r == Result::BadReference ? Refused : Failed);
  };
  return c->port.call_async<GiveBack>({c->lease}, done, 3000);
}

// Commands from the narrator, one byte each: 'a' take the port, 'w' wait in
// line for it, 'r' give it back, 'q' quit.
void on_command(ModemClient* c, int fd) {
  char cmd;
  const ssize_t n = ::read(fd, &cmd, 1);
  if (n <= 0 || cmd == 'q') {
    c->port.close();
    c->loop.stop();
    return;
  }
  const Result r = cmd == 'r' ? give_back(c) : take(c, cmd == 'w');
  if (r != Result::Ok) {
    say(c->name, "could not ask: %s", lemsg::to_string(r));
    report(c->no, Failed);
  }
}

int run_client(int no, int command_fd) {
  ModemClient c;
  ModemClient* cp = &c;
  c.no = no;
  std::snprintf(c.name, sizeof c.name, "[client %d]", no);
  if (c.port.status() != Result::Ok) return 1;
  c.port.session().set_close_handler([cp](Result why) {
    say(cp->name, "lost the server (%s)%s; reconnecting by myself", lemsg::to_string(why),
        cp->has_port ? ", and the AT port with it" : "");
    cp->has_port = false;
    report(cp->no, Lost);
  });
  // After the server goes away, open again by itself: first after 50 ms,
  // then waiting (inotify, no polling) for the service to reappear.
  c.port.session().set_reconnect(true, 50, 400);
  Result r = c.loop.add_watch(command_fd, lemsg::Readable, [cp](int fd, short) { on_command(cp, fd); },
                              c.command_watch);
  if (r == Result::Ok)
    r = c.port.open(kService, [cp](Result res) {
      lemsg::Credentials server;
      if (res != Result::Ok || cp->port.session().server_credentials(server) != Result::Ok) {
        say(cp->name, "cannot open: %s", lemsg::to_string(res));
        report(cp->no, Failed);
        return;
      }
      say(cp->name, "pid %ld: connected%s to the modem service (server pid %ld)", static_cast<long>(::getpid()),
          cp->opens++ ? " again" : "", static_cast<long>(server.pid));
      report(cp->no, Opened);
    });
  if (r != Result::Ok) return 1;
  return c.loop.run() == Result::Ok ? 0 : 1;
}

// ---- the narrator --------------------------------------------------------------

struct Child {
  pid_t pid = -1;
  int command_fd = -1;  // our end: commands for a client, or the server's stop pipe
};

struct Narrator {
  Child server;
  Child clients[kClients + 1];  // 1..kClients
  int report_read = -1;
  int seen[kClients + 1][128] = {};
  char dir[32] = "/tmp/lemsg-demo-XXXXXX";
};

Narrator g;

// The child keeps only what it needs: every pipe end of the narrator goes.
void close_narrator_fds() {
  ::close(g.report_read);
  if (g.server.command_fd >= 0) ::close(g.server.command_fd);
  for (Child& c : g.clients)
    if (c.command_fd >= 0) ::close(c.command_fd);
}

template <typename F>
Child start(F&& body) {
  Child c;
  int p[2];
  if (::pipe(p) != 0) return c;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the narrator
    ::close(p[1]);
    close_narrator_fds();
    ::_exit(body(p[0]));
  }
  ::close(p[0]);
  c.pid = pid;
  c.command_fd = p[1];
  if (pid < 0) {
    ::close(p[1]);
    c.command_fd = -1;
  }
  return c;
}

// Waits until `who` reports `e`, at most kStepMs.
bool expect(int who, Event e) {
  const long long end = now_ms() + kStepMs;
  while (g.seen[who][static_cast<int>(e)] == 0) {
    const long long left = end - now_ms();
    if (left <= 0) {
      say("[demo]", "FAILED: %s did not report '%c' within %d ms", who ? "a client" : "the server", e, kStepMs);
      return false;
    }
    struct pollfd p = {g.report_read, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    unsigned char rec[2];  // plain char is unsigned on ARM
    if (::read(g.report_read, rec, 2) == 2 && rec[0] <= kClients && rec[1] < 128) ++g.seen[rec[0]][rec[1]];
  }
  --g.seen[who][static_cast<int>(e)];
  return true;
}

bool command(int client, char cmd) { return ::write(g.clients[client].command_fd, &cmd, 1) == 1; }

// Reaps `pid`, at most kStepMs; its exit status, 128 + signal, or -1.
int reap(pid_t pid) {
  const long long end = now_ms() + kStepMs;
  for (;;) {
    int st = 0;
    const pid_t r = ::waitpid(pid, &st, WNOHANG);
    if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (r < 0 || now_ms() >= end) return -1;
    ::usleep(2000);
  }
}

bool start_server() {
  g.server = start([](int stop_fd) { return run_server(stop_fd); });
  return g.server.pid > 0 && expect(0, ServerUp);
}

bool story() {
  say("[demo]", "The modem has one AT port. A service lends it to one client at a time;");
  say("[demo]", "the lease belongs to the borrower's session, so it comes back by itself");
  say("[demo]", "when that session ends, however it ends.");
  if (!start_server()) return false;
  for (int i = 1; i <= kClients; ++i) {
    g.clients[i] = start([i](int command_fd) { return run_client(i, command_fd); });
    if (g.clients[i].pid <= 0 || !expect(i, Opened) || !expect(0, Opened)) return false;
  }

  say("[demo]", "--- the clients take turns");
  if (!command(1, 'a') || !expect(1, Granted)) return false;
  if (!command(2, 'a') || !expect(2, Busy)) return false;
  if (!command(1, 'r') || !expect(1, Released)) return false;
  if (!command(2, 'a') || !expect(2, Granted)) return false;
  if (!command(3, 'a') || !expect(3, Busy)) return false;
  if (!command(3, 'w') || !expect(0, Holding)) return false;

  say("[demo]", "--- kill -9 client 2 (pid %ld) while it holds the AT port", static_cast<long>(g.clients[2].pid));
  ::kill(g.clients[2].pid, SIGKILL);
  if (reap(g.clients[2].pid) != 128 + SIGKILL) return false;
  g.clients[2].pid = -1;
  if (!expect(0, TookBack) || !expect(3, Granted)) return false;

  if (!command(1, 'w') || !expect(0, Holding)) return false;
  say("[demo]", "--- kill -9 the server (pid %ld) while client 1 waits for an answer",
      static_cast<long>(g.server.pid));
  ::kill(g.server.pid, SIGKILL);
  if (reap(g.server.pid) != 128 + SIGKILL) return false;
  ::close(g.server.command_fd);
  g.server = Child{};
  if (!expect(1, EndedClosed) || !expect(1, Lost) || !expect(3, Lost)) return false;

  say("[demo]", "--- start a new server; nobody tells the clients");
  if (!start_server() || !expect(1, Opened) || !expect(3, Opened) || !expect(0, Opened) || !expect(0, Opened))
    return false;

  say("[demo]", "--- client 3 gives back the lease the killed server gave it");
  if (!command(3, 'r') || !expect(3, Refused)) return false;

  say("[demo]", "--- the clients carry on");
  if (!command(3, 'a') || !expect(3, Granted)) return false;
  if (!command(1, 'a') || !expect(1, Busy)) return false;
  if (!command(3, 'r') || !expect(3, Released)) return false;
  if (!command(1, 'a') || !expect(1, Granted)) return false;
  if (!command(1, 'r') || !expect(1, Released)) return false;

  say("[demo]", "--- the end: the clients quit, the server stops");
  for (int i : {1, 3}) {
    if (!command(i, 'q') || reap(g.clients[i].pid) != 0) return false;
    g.clients[i].pid = -1;
  }
  ::close(g.server.command_fd);
  g.server.command_fd = -1;
  const int st = reap(g.server.pid);
  g.server.pid = -1;
  return st == 0;
}

// Kills what is left and removes the runtime directory with what is in it.
void clean_up() {
  if (g.server.pid > 0) ::kill(g.server.pid, SIGKILL);
  for (Child& c : g.clients)
    if (c.pid > 0) ::kill(c.pid, SIGKILL);
  while (::waitpid(-1, nullptr, 0) > 0) {
  }
  if (DIR* d = ::opendir(g.dir)) {
    while (struct dirent* e = ::readdir(d)) {
      if (e->d_name[0] == '.') continue;
      char path[300];
      std::snprintf(path, sizeof path, "%s/%s", g.dir, e->d_name);
      ::unlink(path);
    }
    ::closedir(d);
  }
  ::rmdir(g.dir);
}

}  // namespace

int main() {
  if (!::mkdtemp(g.dir) || ::setenv("LEMSG_RUNTIME_DIR", g.dir, 1) != 0) {
    std::perror("demo: runtime directory");
    return 1;
  }
  ::signal(SIGPIPE, SIG_IGN);
  // lemsg's own log lines (a refused reference, for one) are told the same way.
  lemsg::set_log_sink([](lemsg::LogLevel, const char* line, void*) { say("[lemsg]", "%s", line); }, nullptr);
  int p[2];
  if (::pipe(p) != 0) return 1;
  g.report_read = p[0];
  g_report = p[1];
  const long long t0 = now_ms();
  const bool ok = story();
  clean_up();
  if (!ok) {
    say("[demo]", "FAILED: a step did not happen as told");
    return 1;
  }
  say("[demo]", "every step happened as told (%lld ms)", now_ms() - t0);
  return 0;
}
