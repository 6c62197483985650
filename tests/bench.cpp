// lemsg benchmark: what the library costs over raw AF_UNIX SOCK_SEQPACKET.
//
// One program, fork without exec (qemu-user cannot exec a target binary):
// server children and the parent as client, real sockets in a private
// runtime dir. On the same payloads and the same process layout it measures
//   - round trips, 64 B and 1 KiB: a raw blocking send/recv ping-pong, the
//     same over non-blocking sockets and poll() (what any event-loop design
//     such as lemsg pays), and lemsg request_sync;
//   - the typed layer (section 12): a 64 B TypedClient::call<Echo64> to a
//     TypedService, in the same group as the 64 B request_sync, against
//     which it is compared. The frames carry the same bytes: a 16-byte
//     header and 64 bytes of payload each way. Request payload: the item
//     index (1 B), the Bytes<62> count (1 B) and 62 bytes; response payload:
//     the Bytes<63> count (1 B) and 63 bytes (the request's 62 and one more);
//   - pipelined throughput with kWindow frames in flight: raw blocking, raw
//     poll(), and lemsg Session::request;
//   - session open: lemsg open_sync + close, against a raw connect + one
//     round trip + close.
// Raw frames carry the same bytes as lemsg's (16-byte header + payload), and
// every response is checked. Each figure is the median of kReps runs, after a
// warm-up; the variants of one figure take turns going first in each run, so
// load elsewhere on a shared machine hits them alike.
//
//   make bench                      host
//   make bench TARGET=armhf         under qemu-arm
//   build/host/bench [scale [only]] scale multiplies the iteration counts (also
//                                   BENCH_SCALE=<scale>); `only` runs one
//                                   measurement, for strace -c or a profiler:
//                                   raw-rtt, poll-rtt, lemsg-rtt, raw-pipelined,
//                                   poll-pipelined, lemsg-pipelined, raw-open,
//                                   lemsg-open, typed-rtt
//   BENCH_CPU=<n> build/host/bench  every process on CPU n, as on a single-core
//                                   modem: steadier figures on a busy machine
//
// Default scale: 1 on x86 (the run takes about 15 s), 0.2 on ARM builds (under
// qemu-user, or on a real modem CPU). Output: one line per figure ("name
// value"), then one line per ratio ("ratio name value"); lines starting with
// '#' are comments. A benchmark never fails on speed, but this one exits
// non-zero when a request fails or a response is wrong.
#include "testutil.hpp"

#include <sched.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>

namespace {

using lemsg::Message;
using lemsg::Result;

constexpr std::uint32_t kMaxPayload = 1024;
constexpr std::uint32_t kWindow = 16;
constexpr int kReps = 7;
// sync_rtt_64B_vs_raw_poll of lemsg 0.1.0 (commit 8b2c407, before the info
// query and the monitor): the median of 6 runs of its bench, interleaved with
// this one's, BENCH_CPU=0, on the project's 2-core build machine.
constexpr double kReleaseRttVsPoll = 0.951;
constexpr int kTimeoutMs = 5000;
constexpr std::size_t kWire = lemsg::wire::header_size;
constexpr std::size_t kSmall = 64;
constexpr std::size_t kLarge = 1024;

static_assert(kWindow <= LEMSG_MAX_PENDING && kWindow <= LEMSG_MAX_OUTGOING, "the window must fit lemsg's tables");

const lemsg::Protocol kProto{"lemsg.bench", kMaxPayload};

// The typed interface: one method whose request and response each encode to
// exactly kSmall payload bytes (see the top of the file).
constexpr std::size_t kTypedData = kSmall - 2;  // minus the item index and the count
LEMSG_METHOD(Echo64, lemsg::Bytes<kTypedData>, lemsg::Bytes<kTypedData + 1>);
struct BenchTyped : lemsg::Interface<Echo64> {
  static constexpr const char* name = "lemsg.bench.typed";
};
static_assert(1 + lemsg::max_encoded_size<Echo64::Request>() == kSmall, "a 64-byte request payload");
static_assert(lemsg::max_encoded_size<Echo64::Response>() == kSmall, "a 64-byte response payload");
static_assert(lemsg::InterfaceInfo<BenchTyped>::max_payload <= kMaxPayload, "the bench's pools hold it");

int g_failures = 0;

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "bench: FAILED: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  ++g_failures;
}

double now_us() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) / 1e3;
}

double median(double* v, int n) {
  std::sort(v, v + n);
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// A recognisable payload: a fixed pattern with the sequence number in its
// first and last four bytes. memcpy and memcmp keep the check cheap, so the
// figures are about messaging, not about the check.
unsigned char g_pattern[kMaxPayload];

void fill(unsigned char* p, std::size_t n, std::uint32_t seq) {
  std::memcpy(p, g_pattern, n);
  std::memcpy(p, &seq, 4);
  std::memcpy(p + n - 4, &seq, 4);
}
bool check(const unsigned char* p, std::size_t n, std::uint32_t seq) {
  std::uint32_t a, b;
  std::memcpy(&a, p, 4);
  std::memcpy(&b, p + n - 4, 4);
  return a == seq && b == seq && std::memcmp(p + 4, g_pattern + 4, n - 8) == 0;
}

// ---- servers (children) -------------------------------------------------------

// A child dies with the parent, so a parent that crashes leaves nothing behind.
void die_with_parent() { prctl(PR_SET_PDEATHSIG, SIGKILL); }

bool raw_address(const char* name, sockaddr_un& sa, socklen_t& len) {
  std::memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  const int w = std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s/%s", lemsg::runtime_dir(), name);
  if (w < 0 || static_cast<std::size_t>(w) >= sizeof sa.sun_path) return false;
  len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + static_cast<std::size_t>(w) + 1);
  return true;
}

int raw_listen(const char* name) {
  sockaddr_un sa;
  socklen_t len;
  if (!raw_address(name, sa, len)) return -1;
  const int ls = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (ls < 0 || bind(ls, reinterpret_cast<sockaddr*>(&sa), len) != 0 || listen(ls, 64) != 0) return -1;
  return ls;
}

// The baseline server: blocking accept, then a blocking recv/send echo until
// the client closes; one connection at a time.
int raw_server(const char* name, testutil::Pipe& ready, testutil::Pipe& stop) {
  die_with_parent();
  stop.close_write();
  const int ls = raw_listen(name);
  if (ls < 0) return 2;
  ready.put('r');
  static unsigned char buf[kWire + kMaxPayload];
  for (;;) {
    const int c = accept4(ls, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EINTR) continue;
      return 3;
    }
    for (;;) {
      const ssize_t n = recv(c, buf, sizeof buf, 0);
      if (n <= 0) break;
      if (send(c, buf, static_cast<std::size_t>(n), MSG_NOSIGNAL) != n) break;
    }
    close(c);
  }
}

// The event-loop baseline: a non-blocking socket, poll(), then recvmsg until
// EAGAIN, echoing each frame with sendmsg. This is the least any poll()-based
// server does per wake-up; lemsg's server does it too, plus its own work.
int raw_poll_server(testutil::Pipe& ready, testutil::Pipe& stop) {
  die_with_parent();
  stop.close_write();
  const int ls = raw_listen("raw-poll");
  if (ls < 0) return 2;
  ready.put('p');
  static unsigned char buf[kWire + kMaxPayload];
  for (;;) {
    const int c = accept4(ls, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (c < 0) {
      if (errno == EINTR) continue;
      return 3;
    }
    for (bool open = true; open;) {
      struct pollfd p = {c, POLLIN, 0};
      if (poll(&p, 1, -1) < 0 && errno != EINTR) return 4;
      for (;;) {
        struct iovec iov = {buf, sizeof buf};
        struct msghdr mh;
        std::memset(&mh, 0, sizeof mh);
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        const ssize_t n = recvmsg(c, &mh, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
        if (n <= 0) {
          open = false;
          break;
        }
        iov.iov_len = static_cast<std::size_t>(n);
        while (sendmsg(c, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
          if (errno != EAGAIN && errno != EINTR) return 5;
          struct pollfd w = {c, POLLOUT, 0};
          poll(&w, 1, kTimeoutMs);
        }
      }
    }
    close(c);
  }
}

// The lemsg server: a Service whose receive handler answers each request with
// the request's own message. It leaves cleanly (so a profiler sees its end)
// when the parent closes the write end of `stop`.
int lemsg_server(testutil::Pipe& ready, testutil::Pipe& stop, const char* name = "bench") {
  die_with_parent();
  stop.close_write();
  static lemsg::Loop loop;
  static lemsg::MessagePool<kMaxPayload, 64> pool;
  static lemsg::Service svc(loop, kProto, pool);
  svc.set_receive_handler([](Message& m) {
    if (!m.needs_response()) return;
    const Result r = svc.respond(std::move(m));
    if (r != Result::Ok) std::fprintf(stderr, "bench server: respond: %s\n", lemsg::to_string(r));
  });
  const Result r = svc.advertise(name);
  if (r != Result::Ok) {
    std::fprintf(stderr, "bench server: advertise: %s\n", lemsg::to_string(r));
    return 2;
  }
  lemsg::WatchId stop_watch;
  if (loop.add_watch(stop.fd[0], lemsg::Readable, [](int, short) { loop.stop(); }, stop_watch) != Result::Ok) return 3;
  ready.put('l');
  return loop.run() == Result::Ok ? 0 : 4;
}

// The typed server: a TypedService whose Echo64 handler answers with the
// request's bytes and one more (their count), encoded into the request's
// block. Same pool as lemsg_server's; leaves as lemsg_server does.
int typed_server(testutil::Pipe& ready, testutil::Pipe& stop) {
  die_with_parent();
  stop.close_write();
  static lemsg::Loop loop;
  static lemsg::MessagePool<kMaxPayload, 64> pool;
  static lemsg::TypedService<BenchTyped> svc(loop, pool);
  svc.set_handler<Echo64>([](lemsg::Responder<Echo64>& r, Echo64::Request& req) {
    Echo64::Response resp;
    Result x = resp.assign(req.data(), req.size());
    if (x == Result::Ok) x = resp.push_back(static_cast<std::uint8_t>(req.size()));
    if (x == Result::Ok) x = r.reply(resp);
    if (x != Result::Ok) std::fprintf(stderr, "bench typed server: reply: %s\n", lemsg::to_string(x));
  });
  const Result r = svc.advertise("bench-typed");
  if (r != Result::Ok) {
    std::fprintf(stderr, "bench typed server: advertise: %s\n", lemsg::to_string(r));
    return 2;
  }
  lemsg::WatchId stop_watch;
  if (loop.add_watch(stop.fd[0], lemsg::Readable, [](int, short) { loop.stop(); }, stop_watch) != Result::Ok) return 3;
  ready.put('t');
  return loop.run() == Result::Ok ? 0 : 4;
}

// ---- raw clients ----------------------------------------------------------------

// A raw connection; `nonblocking` for the poll() baseline.
// The service directory (lemsg-dir's core) in a child, with one binding: this
// uid's "bench-dir" to this uid's "bench-dir". Stops on SIGTERM.
int directory_process(testutil::Pipe& ready, testutil::Pipe& stop) {
  die_with_parent();
  stop.close_write();  // the servers leave when the parent closes its end
  char bindings[300];
  std::snprintf(bindings, sizeof bindings, "%s/bindings", lemsg::runtime_dir());
  FILE* f = std::fopen(bindings, "w");
  if (!f) return 2;
  std::fprintf(f, "%u.bench-dir -> %u.bench-dir\n", static_cast<unsigned>(geteuid()), static_cast<unsigned>(geteuid()));
  std::fclose(f);
  static lemsg::Loop loop;
  static lemsg::Directory dir(loop);
  lemsg::DirectoryOptions o;
  o.bindings_path = bindings;
  char err[256];
  if (dir.start(o, err, sizeof err) != Result::Ok || dir.handle_signals() != Result::Ok) {
    std::fprintf(stderr, "bench directory: %s\n", err);
    return 2;
  }
  ready.put('d');
  return loop.run() == Result::Ok ? 0 : 3;
}

// lemsg_server's twin, registered with the directory as "bench-dir".
int dir_server(testutil::Pipe& ready, testutil::Pipe& stop) {
  die_with_parent();
  stop.close_write();
  static lemsg::Loop loop;
  static lemsg::MessagePool<kMaxPayload, 64> pool;
  static lemsg::Service svc(loop, kProto, pool);
  svc.set_receive_handler([](Message& m) {
    if (!m.needs_response()) return;
    const Result r = svc.respond(std::move(m));
    if (r != Result::Ok) std::fprintf(stderr, "bench dir server: respond: %s\n", lemsg::to_string(r));
  });
  lemsg::ServiceOptions o;
  o.discovery = lemsg::Discovery::Directory;
  const Result r = svc.advertise("bench-dir", o);
  if (r != Result::Ok || !svc.is_registered()) {
    std::fprintf(stderr, "bench dir server: advertise: %s\n", lemsg::to_string(r));
    return 2;
  }
  lemsg::WatchId stop_watch;
  if (loop.add_watch(stop.fd[0], lemsg::Readable, [](int, short) { loop.stop(); }, stop_watch) != Result::Ok) return 3;
  ready.put('l');
  return loop.run() == Result::Ok ? 0 : 4;
}

// A monitor of service `name` (lemsg monitor's Monitor), reading every
// record with its payload until the stop pipe closes.
int monitor_process(const char* name, testutil::Pipe& ready, testutil::Pipe& stop) {
  die_with_parent();
  stop.close_write();
  lemsg::Monitor m;
  const Result r = m.attach(name, true, kTimeoutMs);
  if (r != Result::Ok) {
    std::fprintf(stderr, "bench monitor: attach: %s\n", lemsg::to_string(r));
    return 2;
  }
  ready.put('m');
  lemsg::MonitorRecord rec;
  for (;;) {
    struct pollfd p[2] = {{m.fd(), POLLIN, 0}, {stop.fd[0], POLLIN, 0}};
    if (poll(p, 2, -1) < 0 && errno != EINTR) return 3;
    if (p[1].revents) return 0;
    if (p[0].revents && m.next(rec, 0) != Result::Ok) return 4;
  }
}

int raw_connect(const char* name, bool nonblocking) {
  sockaddr_un sa;
  socklen_t len;
  if (!raw_address(name, sa, len)) return -1;
  const int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (s < 0) return -1;
  // Every wait has a bound: a dead server makes recv fail, not hang.
  struct timeval tv = {kTimeoutMs / 1000, 0};
  if (setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0 ||
      connect(s, reinterpret_cast<sockaddr*>(&sa), len) != 0 ||
      (nonblocking && fcntl(s, F_SETFL, O_NONBLOCK) != 0)) {
    close(s);
    return -1;
  }
  return s;
}

unsigned char g_out[kWire + kMaxPayload], g_in[kWire + kMaxPayload];

bool raw_send(int s, std::size_t size, std::uint32_t seq, bool nonblocking) {
  fill(g_out + kWire, size, seq);
  if (!nonblocking) return send(s, g_out, kWire + size, MSG_NOSIGNAL) == static_cast<ssize_t>(kWire + size);
  struct iovec iov = {g_out, kWire + size};
  struct msghdr mh;
  std::memset(&mh, 0, sizeof mh);
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  return sendmsg(s, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) == static_cast<ssize_t>(kWire + size);
}

// Receives one frame: blocking recv, or (nonblocking) recvmsg after poll()
// when the socket is empty. 0 when none arrived in time.
ssize_t raw_recv(int s, bool nonblocking) {
  if (!nonblocking) return recv(s, g_in, sizeof g_in, 0);
  for (;;) {
    struct iovec iov = {g_in, sizeof g_in};
    struct msghdr mh;
    std::memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    const ssize_t n = recvmsg(s, &mh, MSG_DONTWAIT);
    if (n >= 0 || errno != EAGAIN) return n;
    struct pollfd p = {s, POLLIN, 0};
    if (poll(&p, 1, kTimeoutMs) <= 0) return 0;
  }
}

// One round trip of `size` payload bytes (plus the 16-byte header).
bool raw_round_trip(int s, std::size_t size, std::uint32_t seq, bool nonblocking) {
  if (!raw_send(s, size, seq, nonblocking)) return false;
  if (nonblocking) {
    // Wait first: the answer cannot be there yet, as in lemsg's request_sync.
    struct pollfd p = {s, POLLIN, 0};
    if (poll(&p, 1, kTimeoutMs) != 1) return false;
  }
  const ssize_t n = raw_recv(s, nonblocking);
  return n == static_cast<ssize_t>(kWire + size) && check(g_in + kWire, size, seq);
}

// Microseconds per round trip over `n` round trips.
double raw_rtt(int s, std::size_t size, int n, bool nonblocking) {
  const double t0 = now_us();
  for (int i = 0; i < n; ++i) {
    if (!raw_round_trip(s, size, static_cast<std::uint32_t>(i), nonblocking)) {
      fail("raw round trip %d of %zu B", i, size);
      return 0;
    }
  }
  return (now_us() - t0) / n;
}

// Messages per second with kWindow frames in flight.
double raw_pipelined(int s, std::size_t size, int n, bool nonblocking) {
  const double t0 = now_us();
  std::uint32_t sent = 0, got = 0;
  const std::uint32_t total = static_cast<std::uint32_t>(n);
  while (sent < total && sent < kWindow) {
    if (!raw_send(s, size, sent, nonblocking)) return fail("raw pipelined send"), 0;
    ++sent;
  }
  while (got < total) {
    const ssize_t r = raw_recv(s, nonblocking);
    if (r != static_cast<ssize_t>(kWire + size) || !check(g_in + kWire, size, got))
      return fail("raw pipelined response %u", got), 0;
    ++got;
    if (sent < total) {
      if (!raw_send(s, size, sent, nonblocking)) return fail("raw pipelined send"), 0;
      ++sent;
    }
  }
  return n / ((now_us() - t0) / 1e6);
}

// Microseconds per (connect + one 64 B round trip + close).
double raw_open(int n) {
  const double t0 = now_us();
  for (int i = 0; i < n; ++i) {
    const int s = raw_connect("raw-open", false);
    if (s < 0) return fail("raw connect: %s", std::strerror(errno)), 0;
    const bool ok = raw_round_trip(s, kSmall, static_cast<std::uint32_t>(i), false);
    close(s);
    if (!ok) return fail("raw round trip after connect"), 0;
  }
  return (now_us() - t0) / n;
}

// ---- lemsg client ---------------------------------------------------------------

struct Client {
  lemsg::Loop loop;
  lemsg::MessagePool<kMaxPayload, 64> pool;
  lemsg::Session session{loop, kProto, pool};
};

bool lemsg_round_trip(Client& c, std::size_t size, std::uint32_t seq) {
  Message m, resp;
  Result r = c.session.create_message(m);
  if (r == Result::Ok) {
    fill(static_cast<unsigned char*>(m.payload()), size, seq);
    r = m.set_size(static_cast<std::uint32_t>(size));
  }
  if (r == Result::Ok) r = c.session.request_sync(std::move(m), resp, kTimeoutMs);
  if (r != Result::Ok) {
    fail("request_sync %u: %s", seq, lemsg::to_string(r));
    return false;
  }
  if (resp.size() != size || !check(static_cast<const unsigned char*>(resp.payload()), size, seq)) {
    fail("request_sync %u: wrong response (%u bytes)", seq, resp.size());
    return false;
  }
  return true;
}

double lemsg_rtt(Client& c, std::size_t size, int n) {
  const double t0 = now_us();
  for (int i = 0; i < n; ++i)
    if (!lemsg_round_trip(c, size, static_cast<std::uint32_t>(i))) return 0;
  return (now_us() - t0) / n;
}

// The typed client: the same loop and pool layout as Client.
struct TypedUser {
  lemsg::Loop loop;
  lemsg::MessagePool<kMaxPayload, 64> pool;
  lemsg::TypedClient<BenchTyped> client{loop, pool};
};

// One typed call: the request is built as a user would (fill the struct),
// then call<> encodes it; the response is decoded into a struct and checked.
bool typed_round_trip(TypedUser& c, std::uint32_t seq) {
  Echo64::Request req;
  Echo64::Response resp;
  fill(req.data(), kTypedData, seq);
  Result r = req.resize(kTypedData);
  if (r == Result::Ok) r = c.client.call<Echo64>(req, resp, kTimeoutMs);
  if (r != Result::Ok) {
    fail("typed call %u: %s", seq, lemsg::to_string(r));
    return false;
  }
  if (resp.size() != kTypedData + 1 || !check(resp.data(), kTypedData, seq) || resp[kTypedData] != kTypedData) {
    fail("typed call %u: wrong response (%zu bytes)", seq, resp.size());
    return false;
  }
  return true;
}

double typed_rtt(TypedUser& c, int n) {
  const double t0 = now_us();
  for (int i = 0; i < n; ++i)
    if (!typed_round_trip(c, static_cast<std::uint32_t>(i))) return 0;
  return (now_us() - t0) / n;
}

// Asynchronous requests, kWindow in flight: each completion sends the next.
struct Pipeline {
  Client* c;
  std::size_t size;
  std::uint32_t total, sent = 0, done = 0;
  bool broken = false;

  bool send_next() {
    Message m;
    Result r = c->session.create_message(m);
    if (r == Result::Ok) {
      fill(static_cast<unsigned char*>(m.payload()), size, sent);
      r = m.set_size(static_cast<std::uint32_t>(size));
    }
    if (r == Result::Ok)
      r = c->session.request(std::move(m), [this](Result res, Message& resp) { on_response(res, resp); });
    if (r != Result::Ok) {
      fail("request %u: %s", sent, lemsg::to_string(r));
      broken = true;
      return false;
    }
    ++sent;
    return true;
  }
  void on_response(Result res, Message& resp) {
    // One session, answered in turn: responses come back in order.
    if (res != Result::Ok || resp.size() != size ||
        !check(static_cast<const unsigned char*>(resp.payload()), size, done)) {
      fail("pipelined response %u: %s, %u bytes", done, lemsg::to_string(res), resp.size());
      broken = true;
      return;
    }
    ++done;
    if (sent < total) send_next();
  }
};

double lemsg_pipelined(Client& c, std::size_t size, int n) {
  Pipeline p{&c, size, static_cast<std::uint32_t>(n)};
  const double t0 = now_us();
  while (p.sent < p.total && p.sent < kWindow)
    if (!p.send_next()) return 0;
  const long long end = testutil::now_ms() + kTimeoutMs + n / 10;
  while (p.done < p.total && !p.broken) {
    if (testutil::now_ms() > end) return fail("pipelined: %u of %u responses in time", p.done, p.total), 0;
    if (c.loop.run_once(100) == Result::SystemError) return fail("pipelined: run_once failed"), 0;
  }
  if (p.broken) return 0;
  if (c.session.pending_count() != 0) return fail("pipelined: requests still pending"), 0;
  return n / ((now_us() - t0) / 1e6);
}

double lemsg_open(Client& c, int n, const char* name = "bench") {
  const double t0 = now_us();
  for (int i = 0; i < n; ++i) {
    const Result r = c.session.open_sync(name, kTimeoutMs);
    if (r != Result::Ok) return fail("open_sync %d: %s", i, lemsg::to_string(r)), 0;
    c.session.close();
  }
  return (now_us() - t0) / n;
}

// ---- driver ---------------------------------------------------------------------

double scale_from(int argc, char** argv) {
#if defined(__x86_64__) || defined(__i386__)
  double scale = 1.0;
#else
  double scale = 0.2;  // qemu-user, or a real modem CPU
#endif
  if (const char* e = std::getenv("BENCH_SCALE"))
    if (*e) scale = std::atof(e);
  if (argc > 1) scale = std::atof(argv[1]);
  return scale > 0 ? scale : 1.0;
}

int iterations(double scale, int base) {
  const double n = base * scale;
  return n < 20 ? 20 : static_cast<int>(n);
}

void print(const char* name, double v) {
  if (v > 0) std::printf("%-36s %.2f\n", name, v);  // 0: not measured in this run
}
void print_ratio(const char* name, double num, double den) {
  if (num > 0 && den > 0) std::printf("ratio %-30s %.3f\n", name, num / den);
}

enum Figure {
  RawRtt64, PollRtt64, LemsgRtt64,
  RawRtt1K, PollRtt1K, LemsgRtt1K,
  RawPipe64, PollPipe64, LemsgPipe64,
  RawPipe1K, PollPipe1K, LemsgPipe1K,
  RawOpen, LemsgOpen,
  TypedRtt64,
  DirRtt64, DirOpen,
  MonRtt64,
  kFigures
};

}  // namespace

int main(int argc, char** argv) {
  const double scale = scale_from(argc, argv);
  const char* only = argc > 2 ? argv[2] : nullptr;
  const int n_rtt = iterations(scale, 8000);
  const int n_pipe = iterations(scale, 30000);
  const int n_open = iterations(scale, 2000);
  for (std::size_t i = 0; i < sizeof g_pattern; ++i) g_pattern[i] = static_cast<unsigned char>(i * 7 + 1);

  // Pinned before the children are forked, so they inherit it.
  const char* cpu = std::getenv("BENCH_CPU");
  if (cpu && *cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(std::atoi(cpu), &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0)
      std::fprintf(stderr, "bench: BENCH_CPU=%s: %s\n", cpu, std::strerror(errno));
  }

  testutil::RuntimeDir dir;
  lemsg::set_log_level(lemsg::LogLevel::Error);

  testutil::Pipe ready, stop;
  const pid_t raw_echo = testutil::spawn([&] { return raw_server("raw-echo", ready, stop); });
  const pid_t raw_open_srv = testutil::spawn([&] { return raw_server("raw-open", ready, stop); });
  const pid_t raw_poll_srv = testutil::spawn([&] { return raw_poll_server(ready, stop); });
  const pid_t lemsg_srv = testutil::spawn([&] { return lemsg_server(ready, stop); });
  const pid_t typed_srv = testutil::spawn([&] { return typed_server(ready, stop); });
  const pid_t mon_srv = testutil::spawn([&] { return lemsg_server(ready, stop, "bench-mon"); });
  testutil::Pipe dir_ready;
  const pid_t directory = testutil::spawn([&] { return directory_process(dir_ready, stop); });
  bool up = dir_ready.get(kTimeoutMs) == 'd';
  const pid_t dir_srv = testutil::spawn([&] { return dir_server(ready, stop); });
  for (int i = 0; i < 7; ++i) up = up && ready.get(kTimeoutMs) >= 0;
  testutil::Pipe mon_ready;
  const pid_t mon = testutil::spawn([&] { return monitor_process("bench-mon", mon_ready, stop); });
  up = up && mon_ready.get(kTimeoutMs) == 'm';
  // The raw servers block in accept or recv for ever: kill them. The lemsg
  // servers must leave by themselves, with status 0, when the stop pipe closes.
  int lemsg_status = -1, typed_status = -1, dir_status = -1, directory_status = -1, mon_status = -1, monitor_status = -1;
  auto stop_children = [&] {
    testutil::kill9(raw_echo);
    testutil::kill9(raw_open_srv);
    testutil::kill9(raw_poll_srv);
    stop.close_write();
    lemsg_status = testutil::wait_exit(lemsg_srv, kTimeoutMs);
    typed_status = testutil::wait_exit(typed_srv, kTimeoutMs);
    dir_status = testutil::wait_exit(dir_srv, kTimeoutMs);
    mon_status = testutil::wait_exit(mon_srv, kTimeoutMs);
    monitor_status = testutil::wait_exit(mon, kTimeoutMs);
    kill(directory, SIGTERM);
    directory_status = testutil::wait_exit(directory, kTimeoutMs);
  };
  if (!up) {
    std::fprintf(stderr, "bench: the servers did not start\n");
    stop_children();
    return 1;
  }

  Client c;
  TypedUser t;
  Client cm;  // a session of a service a monitor watches
  const Result rm = cm.session.open_sync("bench-mon", kTimeoutMs);
  Client cd;  // a session opened through the directory
  cd.session.set_discovery(lemsg::Discovery::Directory);
  const Result rd = cd.session.open_sync("bench-dir", kTimeoutMs);
  const int raw = raw_connect("raw-echo", false);
  const int rawp = raw_connect("raw-poll", true);
  Result r = c.session.open_sync("bench", kTimeoutMs);
  const Result rt = t.client.open_sync("bench-typed", kTimeoutMs);
  if (raw < 0 || rawp < 0 || r != Result::Ok || rt != Result::Ok || rd != Result::Ok || rm != Result::Ok) {
    std::fprintf(stderr, "bench: cannot connect (raw %d, poll %d, lemsg %s, typed %s, directory %s)\n", raw, rawp,
                 lemsg::to_string(r), lemsg::to_string(rt), lemsg::to_string(rd));
    stop_children();
    return 1;
  }

  std::printf("# lemsg %s bench: scale %g, median of %d runs; %d round trips, %d pipelined (window %u), %d opens%s%s\n",
              LEMSG_VERSION_STR, scale, kReps, n_rtt, n_pipe, kWindow, n_open, cpu && *cpu ? "; all on CPU " : "",
              cpu && *cpu ? cpu : "");
  std::fflush(stdout);

  struct Case {
    const char* only;  // the name `only` selects it by
    int figure;
    int kind;  // 0 rtt, 1 pipelined, 2 open
    int fd;    // raw socket, or -1 for lemsg
    std::size_t size;
    bool typed = false;  // lemsg's typed layer (a round trip of kSmall)
    bool dir = false;    // a session opened through the directory
    bool monitored = false;  // a session of a service with a monitor attached
  };
  const Case cases[] = {
      {"raw-rtt", RawRtt64, 0, raw, kSmall},         {"poll-rtt", PollRtt64, 0, rawp, kSmall},
      {"lemsg-rtt", LemsgRtt64, 0, -1, kSmall},      {"typed-rtt", TypedRtt64, 0, -1, kSmall, true},
      {"dir-rtt", DirRtt64, 0, -1, kSmall, false, true},
      {"mon-rtt", MonRtt64, 0, -1, kSmall, false, false, true},
      {"raw-rtt", RawRtt1K, 0, raw, kLarge},
      {"poll-rtt", PollRtt1K, 0, rawp, kLarge},      {"lemsg-rtt", LemsgRtt1K, 0, -1, kLarge},
      {"raw-pipelined", RawPipe64, 1, raw, kSmall},  {"poll-pipelined", PollPipe64, 1, rawp, kSmall},
      {"lemsg-pipelined", LemsgPipe64, 1, -1, kSmall}, {"raw-pipelined", RawPipe1K, 1, raw, kLarge},
      {"poll-pipelined", PollPipe1K, 1, rawp, kLarge}, {"lemsg-pipelined", LemsgPipe1K, 1, -1, kLarge},
      {"raw-open", RawOpen, 2, 0, kSmall},           {"lemsg-open", LemsgOpen, 2, -1, kSmall},
      {"dir-open", DirOpen, 2, -1, kSmall, false, true},
  };
  constexpr int kCases = static_cast<int>(sizeof cases / sizeof cases[0]);
  Client o;  // the session opened and closed again and again
  Client od;  // the same, through the directory
  od.session.set_discovery(lemsg::Discovery::Directory);
  auto run = [&](const Case& k, int scale_div) -> double {
    const bool is_lemsg = k.fd < 0;
    if (k.typed) return typed_rtt(t, n_rtt / scale_div);
    if (k.dir && k.kind == 0) return lemsg_rtt(cd, k.size, n_rtt / scale_div);
    if (k.monitored) return lemsg_rtt(cm, k.size, n_rtt / scale_div);
    if (k.dir) return lemsg_open(od, n_open / scale_div, "bench-dir");
    if (k.kind == 0)
      return is_lemsg ? lemsg_rtt(c, k.size, n_rtt / scale_div)
                      : raw_rtt(k.fd, k.size, n_rtt / scale_div, k.fd == rawp);
    if (k.kind == 1)
      return is_lemsg ? lemsg_pipelined(c, k.size, n_pipe / scale_div)
                      : raw_pipelined(k.fd, k.size, n_pipe / scale_div, k.fd == rawp);
    return is_lemsg ? lemsg_open(o, n_open / scale_div) : raw_open(n_open / scale_div);
  };

  // Warm-up: caches, page faults, the scheduler's idea of every process.
  for (const Case& k : cases)
    if ((!only || std::strcmp(only, k.only) == 0) && g_failures == 0) run(k, 10);

  double v[kFigures][kReps] = {};
  for (int rep = 0; rep < kReps && g_failures == 0; ++rep) {
    // Cases come in groups of variants of one figure (three, four for the
    // 64 B round trip with the typed call, two for open); within a group the
    // starting variant rotates from run to run.
    for (int g = 0; g < kCases;) {
      int end = g + 1;
      while (end < kCases && cases[end].kind == cases[g].kind && cases[end].size == cases[g].size) ++end;
      const int len = end - g;
      for (int j = 0; j < len; ++j) {
        const Case& k = cases[g + (j + rep) % len];
        if (!only || std::strcmp(only, k.only) == 0) v[k.figure][rep] = run(k, 1);
      }
      g = end;
    }
  }
  close(raw);
  close(rawp);
  c.session.close();
  t.client.close();
  cd.session.close();
  cm.session.close();
  stop_children();
  if (mon_status != 0) fail("the monitored server ended with status %d", mon_status);
  if (monitor_status != 0) fail("the monitor ended with status %d", monitor_status);
  if (dir_status != 0) fail("the directory's server ended with status %d", dir_status);
  if (directory_status != 0) fail("the directory ended with status %d", directory_status);
  if (lemsg_status != 0) fail("the lemsg server ended with status %d", lemsg_status);
  if (typed_status != 0) fail("the typed server ended with status %d", typed_status);
  if (g_failures) {
    std::fprintf(stderr, "bench: %d failure(s)\n", g_failures);
    return 1;
  }

  double m[kFigures];
  for (int f = 0; f < kFigures; ++f) m[f] = median(v[f], kReps);
  print("raw_rtt_64B_us", m[RawRtt64]);
  print("raw_poll_rtt_64B_us", m[PollRtt64]);
  print("lemsg_sync_rtt_64B_us", m[LemsgRtt64]);
  print("raw_rtt_1KiB_us", m[RawRtt1K]);
  print("raw_poll_rtt_1KiB_us", m[PollRtt1K]);
  print("lemsg_sync_rtt_1KiB_us", m[LemsgRtt1K]);
  print("raw_pipelined_64B_msgs_per_s", m[RawPipe64]);
  print("raw_poll_pipelined_64B_msgs_per_s", m[PollPipe64]);
  print("lemsg_pipelined_64B_msgs_per_s", m[LemsgPipe64]);
  print("raw_pipelined_1KiB_msgs_per_s", m[RawPipe1K]);
  print("raw_poll_pipelined_1KiB_msgs_per_s", m[PollPipe1K]);
  print("lemsg_pipelined_1KiB_msgs_per_s", m[LemsgPipe1K]);
  print("raw_rtt_for_open_us", m[RawOpen]);
  print("lemsg_open_us", m[LemsgOpen]);
  print("typed_call_64B_us", m[TypedRtt64]);
  std::printf("# targets: sync rtt <= 1.15x raw; pipelined >= 0.8x raw; open <= 3x raw_rtt_for_open\n");
  std::printf("# *_vs_raw_poll: against the same exchange over poll() and non-blocking sockets\n");
  print_ratio("sync_rtt_64B_vs_raw", m[LemsgRtt64], m[RawRtt64]);
  print_ratio("sync_rtt_1KiB_vs_raw", m[LemsgRtt1K], m[RawRtt1K]);
  print_ratio("pipelined_64B_vs_raw", m[LemsgPipe64], m[RawPipe64]);
  print_ratio("pipelined_1KiB_vs_raw", m[LemsgPipe1K], m[RawPipe1K]);
  print_ratio("open_vs_raw_rtt", m[LemsgOpen], m[RawOpen]);
  print_ratio("open_in_raw_rtt_64B", m[LemsgOpen], m[RawRtt64]);
  print_ratio("sync_rtt_64B_vs_raw_poll", m[LemsgRtt64], m[PollRtt64]);
  print_ratio("sync_rtt_1KiB_vs_raw_poll", m[LemsgRtt1K], m[PollRtt1K]);
  print_ratio("pipelined_64B_vs_raw_poll", m[LemsgPipe64], m[PollPipe64]);
  print_ratio("pipelined_1KiB_vs_raw_poll", m[LemsgPipe1K], m[PollPipe1K]);
  std::printf("# typed: call<Echo64> against request_sync, 64 B payload each way; target <= 1.05\n");
  print_ratio("typed_call_64B_vs_message", m[TypedRtt64], m[LemsgRtt64]);
  // The same ratio taken within each run (the two measured back to back),
  // then the median: steadier when the machine's load drifts during the run.
  double paired[kReps];
  for (int rep = 0; rep < kReps; ++rep)
    paired[rep] = v[LemsgRtt64][rep] > 0 ? v[TypedRtt64][rep] / v[LemsgRtt64][rep] : 0;
  print_ratio("typed_call_64B_vs_message_paired", median(paired, kReps), 1);
  print("directory_open_us", m[DirOpen]);
  print("directory_sync_rtt_64B_us", m[DirRtt64]);
  std::printf("# directory mode: open through lemsg-dir against a direct open (target <= 2), and the\n"
              "# round trip of a session it opened against a direct one (target <= 1.02)\n");
  print_ratio("open_directory_vs_direct", m[DirOpen], m[LemsgOpen]);
  print_ratio("sync_rtt_directory_vs_direct", m[DirRtt64], m[LemsgRtt64]);
  for (int rep = 0; rep < kReps; ++rep)
    paired[rep] = v[LemsgRtt64][rep] > 0 ? v[DirRtt64][rep] / v[LemsgRtt64][rep] : 0;
  print_ratio("sync_rtt_directory_vs_direct_paired", median(paired, kReps), 1);
  // The monitor: what a round trip costs with one attached (reading every
  // record, payload included), and without one against the release before
  // the monitor existed (0.1.0, measured as below; see kReleaseRttVsPoll).
  print("monitored_sync_rtt_64B_us", m[MonRtt64]);
  std::printf("# monitor: a round trip with a monitor attached against none; without one, this build's\n"
              "# sync_rtt_64B_vs_raw_poll against 0.1.0's (%.3f, before the monitor existed); target ~1\n",
              kReleaseRttVsPoll);
  print_ratio("sync_rtt_64B_monitor_attached_vs_none", m[MonRtt64], m[LemsgRtt64]);
  print_ratio("sync_rtt_64B_no_monitor_vs_0.1.0", m[PollRtt64] > 0 ? m[LemsgRtt64] / m[PollRtt64] : 0,
              kReleaseRttVsPoll);
  return 0;
}
