// demo: a service lends the modem's only AT port to one client at a time,
// and nothing is lost when a client or the server is killed with kill -9.
//
// What it shows, one line per event, each prefixed by who speaks:
//   - a Service ("modem") hands out the AT port; the lease is an entry of a
//     RefMap owned by the borrower's session and tracked with
//     Service::track(), so the server never has to ask "is that client
//     still alive?";
//   - three clients take turns: acquire, release, "busy", or wait in line;
//   - client 2 is killed with kill -9 while it holds the port: the server's
//     close handler and the tracked release run, and the client waiting in
//     line gets the port;
//   - the server is killed with kill -9 and a new one started: the clients'
//     pending requests complete with Closed, they reconnect by themselves
//     (Session::set_reconnect) and carry on.
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
#include <cstring>
#include <ctime>

namespace {

using lemsg::Message;
using lemsg::Result;
using lemsg::SessionRef;

constexpr lemsg::Protocol kModem{"demo.modem.at-port.v1", 16};
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
  Holding = 'h',   // the server holds a request in its waiting line
  TookBack = 't',  // the server took the port back from a session that ended
  Lost = 'l',
  Granted = 'g',
  Busy = 'b',
  Released = 'r',
  EndedClosed = 'c',  // a pending request completed with Closed
  Failed = 'f',
};
int g_report = -1;

void report(int who, Event e) {
  const char rec[2] = {static_cast<char>(who), e};
  ssize_t w = ::write(g_report, rec, 2);
  (void)w;
}

// ---- the protocol --------------------------------------------------------------

// Client -> server: an op and the client's number (for the story only; a
// real server would know its clients by their credentials).
struct Ask {
  char op;  // 'a' acquire now, 'w' wait in line, 'r' release
  std::uint8_t client;
};
// Server -> client.
struct Answer {
  char verdict;  // 'g' granted, 'b' busy, 'r' released, 'n' not yours
  std::uint8_t holder;
};

template <typename T>
bool read_as(const Message& m, T& out) {
  if (m.size() != sizeof(T)) return false;
  std::memcpy(&out, m.payload(), sizeof(T));
  return true;
}

// ---- the server ----------------------------------------------------------------

struct Lease {
  int client;
};

struct ModemServer {
  lemsg::Loop loop;
  lemsg::MessagePool<16, 16> pool;
  lemsg::Service svc{loop, kModem, pool};
  // The AT port's lease. Its owner is the borrower's SessionRef, so when that
  // session ends for any reason the Service releases it (see track()).
  lemsg::RefMap<Lease, 4> leases;
  Lease lease{0};
  std::uint32_t lease_ref = 0;
  int holder = 0;  // client number, 0 = free
  // Requests of clients waiting in line, held unanswered until the port frees.
  Message line[kClients];
  int line_count = 0;
  int numbers[kClients + 1] = {0, 1, 2, 3};  // per-session context: the client's number
  lemsg::WatchId stop_watch;
};

int client_of(ModemServer* s, SessionRef ref) {
  const int* n = static_cast<const int*>(s->svc.context(ref));
  return n ? *n : 0;
}

// Answers `m` (a request) with `verdict`.
void answer(ModemServer* s, Message&& m, char verdict) {
  const Answer a{verdict, static_cast<std::uint8_t>(s->holder)};
  Result r = m.assign(&a, sizeof a);
  if (r == Result::Ok) r = s->svc.respond(std::move(m));
  if (r != Result::Ok && r != Result::Closed) say("[server]", "could not answer: %s", lemsg::to_string(r));
}

bool lend(ModemServer* s, SessionRef to, int client) {
  s->lease.client = client;
  if (s->leases.add(&s->lease, s->lease_ref, to.value) != Result::Ok) return false;
  s->holder = client;
  return true;
}

// The port is free: the first client in line whose session is still open gets it.
void serve_line(ModemServer* s) {
  while (s->holder == 0 && s->line_count > 0) {
    Message m = std::move(s->line[0]);
    for (int i = 1; i < s->line_count; ++i) s->line[i - 1] = std::move(s->line[i]);
    --s->line_count;
    const int client = client_of(s, m.session());
    if (client == 0) continue;  // its session ended while waiting
    if (!lend(s, m.session(), client)) continue;
    say("[server]", "AT port lent to client %d, who was waiting in line", client);
    answer(s, std::move(m), 'g');
  }
}

void on_request(ModemServer* s, Message& m) {
  Ask ask;
  if (!m.needs_response() || !read_as(m, ask) || ask.client < 1 || ask.client > kClients) {
    say("[server]", "ignoring a malformed request");
    return;  // released unanswered: the client's request completes with Unanswered
  }
  Result r = s->svc.set_context(m.session(), &s->numbers[ask.client]);
  (void)r;
  const int c = ask.client;
  if (ask.op == 'r') {
    if (s->holder != c) {
      say("[server]", "client %d gives back the AT port, but does not hold it", c);
      answer(s, std::move(m), 'n');
      return;
    }
    r = s->leases.remove(s->lease_ref);
    s->holder = 0;
    say("[server]", "client %d gave the AT port back", c);
    answer(s, std::move(m), 'r');
    serve_line(s);
    return;
  }
  if (s->holder == 0) {
    if (!lend(s, m.session(), c)) return;
    say("[server]", "AT port lent to client %d", c);
    answer(s, std::move(m), 'g');
    return;
  }
  if (ask.op == 'w' && s->line_count < kClients) {
    say("[server]", "client %d waits in line for the AT port (client %d has it)", c, s->holder);
    s->line[s->line_count++] = std::move(m);
    report(0, Holding);
    return;
  }
  say("[server]", "client %d asks for the AT port: busy, client %d has it", c, s->holder);
  answer(s, std::move(m), 'b');
}

int run_server(int stop_fd) {
  ModemServer s;
  ModemServer* sp = &s;
  if (s.svc.status() != Result::Ok) return 1;
  s.svc.set_open_handler([sp](SessionRef ref) {
    lemsg::Credentials c;
    if (sp->svc.credentials(ref, c) == Result::Ok)
      say("[server]", "new session from pid %ld", static_cast<long>(c.pid));
    report(0, Opened);
  });
  s.svc.set_receive_handler([sp](Message& m) { on_request(sp, m); });
  s.svc.set_close_handler([sp](SessionRef ref, Result why) {
    const int c = client_of(sp, ref);
    if (c)
      say("[server]", "session of client %d ended (%s)", c,
          why == Result::Closed ? "the client closed it, or died" : lemsg::to_string(why));
  });
  // Runs for each entry a closing session still owned: here, the port's lease.
  Result r = s.svc.track(s.leases, [sp](void* obj, std::uint32_t) {
    const int c = static_cast<Lease*>(obj)->client;
    say("[server]", "client %d still held the AT port: taking it back", c);
    sp->holder = 0;
    sp->lease_ref = 0;
    report(0, TookBack);
    serve_line(sp);
  });
  if (r != Result::Ok) return 1;
  // The narrator closes its end of the stop pipe to end this server cleanly.
  r = s.loop.add_watch(stop_fd, lemsg::Readable, [sp](int, short) { sp->loop.stop(); }, s.stop_watch);
  if (r == Result::Ok) r = s.svc.advertise(kService);
  if (r != Result::Ok) {
    say("[server]", "cannot start: %s", lemsg::to_string(r));
    return 1;
  }
  say("[server]", "pid %ld: lending the modem's AT port as service \"%s\"", static_cast<long>(::getpid()), kService);
  report(0, ServerUp);
  if (s.loop.run() != Result::Ok) return 1;
  say("[server]", "told to stop: %zu session(s) still open, closing them", s.svc.session_count());
  return 0;
}

// ---- a client ------------------------------------------------------------------

struct ModemClient {
  int no = 0;
  char name[16] = {};
  lemsg::Loop loop;
  lemsg::MessagePool<16, 8> pool;
  lemsg::Session session{loop, kModem, pool};
  bool has_port = false;
  int opens = 0;
  lemsg::WatchId command_watch;
};

const char* describe(char op) {
  return op == 'a' ? "take the AT port" : op == 'w' ? "wait in line for the AT port" : "give the AT port back";
}

void on_answer(ModemClient* c, char op, Result r, Message& m) {
  Answer a;
  if (r != Result::Ok || !read_as(m, a)) {
    say(c->name, "my request to %s ended: %s", describe(op), lemsg::to_string(r));
    report(c->no, r == Result::Closed ? EndedClosed : Failed);
    return;
  }
  switch (a.verdict) {
    case 'g':
      c->has_port = true;
      say(c->name, "got the AT port%s", op == 'w' ? " after waiting in line" : "");
      report(c->no, Granted);
      break;
    case 'b':
      say(c->name, "busy: client %d has the AT port", a.holder);
      report(c->no, Busy);
      break;
    case 'r':
      c->has_port = false;
      say(c->name, "gave the AT port back");
      report(c->no, Released);
      break;
    default:
      say(c->name, "unexpected answer '%c'", a.verdict);
      report(c->no, Failed);
  }
}

void ask(ModemClient* c, char op) {
  const Ask a{op, static_cast<std::uint8_t>(c->no)};
  Message m;
  Result r = c->session.create_message(m);
  if (r == Result::Ok) r = m.assign(&a, sizeof a);
  say(c->name, "asking to %s", describe(op));
  // Waiting in line may take long; the others are answered at once.
  const std::uint32_t timeout_ms = op == 'w' ? 15000 : 3000;
  if (r == Result::Ok)
    r = c->session.request(std::move(m), [c, op](Result res, Message& resp) { on_answer(c, op, res, resp); },
                           timeout_ms);
  if (r != Result::Ok) {
    say(c->name, "could not ask: %s", lemsg::to_string(r));
    report(c->no, Failed);
  }
}

// Commands from the narrator, one byte each: 'a', 'w', 'r' (see Ask), 'q' quit.
void on_command(ModemClient* c, int fd) {
  char cmd;
  const ssize_t n = ::read(fd, &cmd, 1);
  if (n <= 0 || cmd == 'q') {
    c->session.close();
    c->loop.stop();
    return;
  }
  ask(c, cmd);
}

int run_client(int no, int command_fd) {
  ModemClient c;
  ModemClient* cp = &c;
  c.no = no;
  std::snprintf(c.name, sizeof c.name, "[client %d]", no);
  if (c.session.status() != Result::Ok) return 1;
  c.session.set_close_handler([cp](Result why) {
    say(cp->name, "lost the server (%s)%s; reconnecting by myself", lemsg::to_string(why),
        cp->has_port ? ", and the AT port with it" : "");
    cp->has_port = false;
    report(cp->no, Lost);
  });
  // After the server goes away, open again by itself: first after 50 ms,
  // then waiting (inotify, no polling) for the service to reappear.
  c.session.set_reconnect(true, 50, 400);
  Result r = c.loop.add_watch(command_fd, lemsg::Readable, [cp](int fd, short) { on_command(cp, fd); },
                              c.command_watch);
  if (r == Result::Ok)
    r = c.session.open(kService, [cp](Result res) {
      lemsg::Credentials server;
      if (res != Result::Ok || cp->session.server_credentials(server) != Result::Ok) {
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
