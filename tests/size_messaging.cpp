// Size probe for the messaging layer (sections 8 to 11): a server and a client that
// between them call every public messaging API: Service (advertise with an
// allow-list, hide, open/close/receive handlers, track, context, credentials,
// send, respond, close, for_each_session), Session (open, open_sync,
// try_open, close, send, request, request_sync, set_reconnect,
// server_credentials), Message (set_fd, take_fd, assign, set_size, copies)
// and MessagePool. Built at -Os by `make size` to measure what messaging
// costs. Run with no argument, it forks: the child serves, the parent is the
// client; it exits 0 when every step happened, 1 otherwise.
#include "lemsg.hpp"

#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

using lemsg::Message;
using lemsg::Result;
using lemsg::SessionRef;

constexpr lemsg::Protocol kProto{"size.probe.v1", 64};
constexpr char kName[] = "size-probe";

struct Lease {
  int unused;
};

// ---- server ------------------------------------------------------------------

struct Server {
  lemsg::Loop loop;
  lemsg::MessagePool<64, 8> pool;
  lemsg::Service svc{loop, kProto, pool};
  lemsg::RefMap<Lease, 4> leases;  // each owned by the session that took it
  Lease lease;
  int opened = 0;
  int released = 0;
  int closed = 0;
};

void on_open(Server* s, SessionRef ref) {
  ++s->opened;
  lemsg::Credentials c;
  if (s->svc.credentials(ref, c) != Result::Ok || s->svc.set_context(ref, s) != Result::Ok) return;
  Message hello;  // an unsolicited message to the new client
  if (s->svc.create_message(hello) == Result::Ok && hello.assign("hi", 2) == Result::Ok) {
    Result r = s->svc.send(ref, std::move(hello));
    (void)r;
  }
}

void on_request(Server* s, Message& m) {
  if (m.has_fd()) ::close(m.take_fd());
  Server* owner = static_cast<Server*>(s->svc.context(m.session()));
  std::uint32_t ref = 0;
  if (owner == s && s->leases.add(&s->lease, ref, m.session().value) != Result::Ok) ref = 0;
  if (m.needs_response()) {
    Result r = m.set_size(m.size() < 4 ? 4 : m.size());
    if (r == Result::Ok) r = s->svc.respond(std::move(m));
    (void)r;
  } else if (m.size() == 3) {  // "bye": the client asks to be closed
    Result r = s->svc.close(m.session());
    (void)r;
  }
}

// Locals, not function-local statics: a static with a constructor needs a
// guard, and the guard links the C++ exception runtime into the probe.
int serve(int ready_fd) {
  Server s;
  Server* sp = &s;
  if (s.svc.status() != Result::Ok) return 1;
  const uid_t me = ::getuid();
  lemsg::ServiceOptions opt;
  opt.mode = 0600;
  opt.uids = &me;
  opt.uid_count = 1;
  if (s.svc.track(s.leases, [sp](void*, std::uint32_t) { ++sp->released; }) != Result::Ok) return 1;
  s.svc.set_open_handler([sp](SessionRef ref) { on_open(sp, ref); });
  s.svc.set_receive_handler([sp](Message& m) { on_request(sp, m); });
  s.svc.set_close_handler([sp](SessionRef, Result) {
    // The client opens four times; the last close ends the server.
    if (++sp->closed == 4) sp->loop.stop();
  });
  if (s.svc.advertise(kName, opt) != Result::Ok || !s.svc.is_advertised()) return 1;
  char c = 'r';
  if (::write(ready_fd, &c, 1) != 1) return 1;
  lemsg::TimerId safety;
  if (s.loop.add_timer([sp] { sp->loop.stop(); }, safety) != Result::Ok ||
      s.loop.arm_timer(safety, 10000) != Result::Ok)
    return 1;
  if (s.loop.run() != Result::Ok) return 1;
  std::size_t live = 0;
  s.svc.for_each_session([&live](SessionRef) { ++live; });
  if (s.svc.hide() != Result::Ok) return 1;
  return s.closed == 4 && s.released > 0 && live == s.svc.session_count() ? 0 : 1;
}

// ---- client ------------------------------------------------------------------

struct Client {
  lemsg::Loop loop;
  lemsg::MessagePool<64, 8> pool;
  lemsg::Session session{loop, kProto, pool};
  int received = 0;
  int answered = 0;
  int opened = 0;
};

template <typename P>
bool run_until(lemsg::Loop& loop, P done) {
  for (int i = 0; i < 200 && !done(); ++i)
    if (loop.run_once(25) == Result::SystemError) return false;
  return done();
}

bool use_session(Client& c) {
  lemsg::Credentials server;
  if (c.session.server_credentials(server) != Result::Ok) return false;

  // A synchronous request that carries an fd.
  Message req, resp;
  if (c.session.create_message(req) != Result::Ok || req.assign("ping", 4) != Result::Ok) return false;
  int fds[2];
  if (::pipe(fds) != 0) return false;
  ::close(fds[1]);
  if (req.set_fd(fds[0]) != Result::Ok) return false;
  if (c.session.request_sync(std::move(req), resp, 2000) != Result::Ok) return false;
  if (resp.status() != Result::Ok || resp.size() != 4 || resp.capacity() < 4) return false;

  // An asynchronous request, and a one-way message.
  Message async, oneway;
  if (c.session.create_message(async) != Result::Ok || async.set_size(8) != Result::Ok) return false;
  Message copy = async;  // a second reference: the message is shared now
  copy.release();
  if (c.session.request(std::move(async), [&c](Result r, Message& m) {
        if (r == Result::Ok && m.size() == 8) ++c.answered;
      }, 2000) != Result::Ok)
    return false;
  if (c.session.create_message(oneway) != Result::Ok || oneway.assign("x", 1) != Result::Ok) return false;
  if (c.session.send(std::move(oneway)) != Result::Ok) return false;
  return run_until(c.loop, [&c] { return c.answered > 0 && c.session.pending_count() == 0 && c.received > 0; });
}

int client() {
  Client c;
  Client* cp = &c;
  if (c.session.status() != Result::Ok) return 1;
  c.session.set_receive_handler([cp](Message& m) {
    if (m.size() == 2) ++cp->received;
  });
  c.session.set_close_handler([](Result why) { (void)lemsg::to_string(why); });

  // 1: one attempt.
  if (c.session.try_open(kName) != Result::Ok || !c.session.is_open() || !use_session(c)) return 1;
  c.session.close();

  // 2: open and wait.
  if (c.session.open_sync(kName, 2000) != Result::Ok || !use_session(c)) return 1;
  c.session.close();

  // 3: open asynchronously, reconnecting if the server goes away.
  c.session.set_reconnect(true, 20, 200);
  if (c.session.open(kName, [cp](Result r) {
        if (r == Result::Ok) ++cp->opened;
      }) != Result::Ok)
    return 1;
  if (!run_until(c.loop, [cp] { return cp->opened == 1; }) || !use_session(c)) return 1;
  c.session.set_reconnect(false);
  c.session.close();

  // 4: ask the server to close the session.
  if (c.session.open_sync(kName, 2000) != Result::Ok) return 1;
  Message bye;
  if (c.session.create_message(bye) != Result::Ok || bye.assign("bye", 3) != Result::Ok ||
      c.session.send(std::move(bye)) != Result::Ok)
    return 1;
  if (!run_until(c.loop, [cp] { return !cp->session.is_open(); })) return 1;
  return c.pool.in_use() == 0 && c.pool.high_water() <= c.pool.capacity() && c.pool.available() == 8 ? 0 : 1;
}

}  // namespace

int main(int argc, char**) {
  if (argc > 1) return 2;  // nothing to do; keeps main() from being folded away
  char dir[] = "/tmp/lemsg-size-XXXXXX";
  if (!::mkdtemp(dir) || ::setenv("LEMSG_RUNTIME_DIR", dir, 1) != 0) return 1;
  int ready[2];
  if (::pipe(ready) != 0) return 1;
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(serve(ready[1]));
  char c;
  int rc = pid > 0 && ::read(ready[0], &c, 1) == 1 ? client() : 1;
  int st = 0;
  if (pid > 0 && (::waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)) rc = 1;
  ::rmdir(dir);
  return rc;
}
