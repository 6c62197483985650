// Fuzz target: section 13, everything that reads another process's bytes or
// a file: the directory's records, the Directory daemon itself, the bindings
// file parser, and the introspection clients' decoders.
//
// The first input byte picks a mode (mod 5); the rest is that mode's input:
//   0 record   a flag byte (bit 0: an fd came with it), then one datagram for
//              detail::dirwire::decode();
//   1 daemon   a program of operations on a live Directory on a Loop in this
//              process (socket and bindings file in the private runtime dir),
//              driven by up to kClients raw client sockets: connect, send a
//              record built from the input (Register, Open, Connect, List or
//              any op; names and texts good or from the input; flags), send
//              raw bytes, send a record with an fd (/dev/null, a pipe, a
//              directory, the client's own socket), half-close, close, read
//              what the directory sent, list, reload the bindings file (the
//              good one, or the input's text);
//   2 bindings an error-buffer size byte, then the text for Bindings::parse()
//              (user names come from a passwd file the harness writes);
//   3 info     a variant byte, then an info record for detail::decode_info()
//              and, framed or raw, for query_info_fd() over a socketpair
//              playing the service;
//   4 monitor  a variant byte choosing the handshake (Welcome, Refuse with
//              the input's code, a raw datagram, a hang-up) and whether to
//              ask for payload bytes, then datagrams (each: a byte saying
//              framed or raw and with an fd or not, a length byte, the bytes)
//              that the service end sends after it, read back with
//              Monitor::next().
//
// Invariants:
//   - record: decode() says Ok or BadFrame and reads only what it is given
//     (ASan); on Ok the lengths add up, name and text hold no NUL, the name
//     is empty or valid, an fd comes exactly with HandOff (the same bytes
//     with the other fd answer are a BadFrame), and send() over a socketpair
//     writes the same bytes back, which recv() decodes to the same record;
//   - daemon: after every operation the directory's service and waiting
//     counts are within its tables and the client sockets still open; every
//     record it sends decodes, with a known Result where it carries one, a
//     HandOff only to a client that registered and always with an fd; a
//     well-formed List (when the loop has a watch free for it) is answered
//     with an End whose count matches the entries, and exactly its services,
//     waiting clients and bindings, each with valid names and no service
//     twice; a reload that fails leaves the bindings as they were; once all
//     clients close nothing is registered or waiting, and after the
//     Directory goes the loop has no watch or timer left, its socket file is
//     gone and the process has the fds it had before;
//   - bindings: parse() says Ok, BadParameter or BindingTableFull, and is all
//     or nothing: on error a table parsed before is unchanged and the message
//     is NUL-terminated within its buffer; on Ok every binding has valid
//     names, a real uid (never (uid_t)-1) each side, lines in order, no
//     client and interface twice, find() returns it, and the table written
//     back out as text parses to the same table;
//   - info: decode_info() says Ok or BadFrame; on Ok the fields are within
//     the build's bounds, the caller's server credentials are kept and the
//     record written back from the result is the same bytes; query_info_fd()
//     agrees with decode_info() on a framed record, refuses one with an fd,
//     and on failure leaves the info empty; on Ok the server is the peer;
//   - monitor: attach_fd() is Ok only after a Welcome, and takes the fd in
//     every case; next() returns Ok for a prefix of the datagrams, each
//     record written back being the datagram's bytes, then Timeout (all read,
//     service still there), Closed (it hung up) or BadFrame, after which the
//     monitor is detached;
//   - every mode: the process has the fds it had before the input.
#include "fuzz.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstdarg>
#include <memory>
#include <new>

namespace {

using lemsg::Result;
namespace wire = lemsg::wire;
namespace dw = lemsg::detail::dirwire;

constexpr int kClients = 6;

// -DLEMSG_FUZZ_TRACE=1 prints what the daemon mode reads, to check a seed.
#ifndef LEMSG_FUZZ_TRACE
#define LEMSG_FUZZ_TRACE 0
#endif
__attribute__((format(printf, 1, 2))) void trace(const char* fmt, ...) {
  if (!LEMSG_FUZZ_TRACE) return;
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
}

// ---- shared ------------------------------------------------------------------

// A copy of exactly `n` bytes on the heap, so ASan sees a read past them
// (calloc: g++ for mips sees the one byte of an empty copy as uninitialised).
struct Exact {
  unsigned char* p;
  std::size_t n;
  Exact(const std::uint8_t* data, std::size_t len) : p(static_cast<unsigned char*>(std::calloc(len ? len : 1, 1))), n(len) {
    FUZZ_CHECK(p != nullptr);
    if (n) std::memcpy(p, data, n);
  }
  ~Exact() { std::free(p); }
  Exact(const Exact&) = delete;
  Exact& operator=(const Exact&) = delete;
};

// A fresh T in static storage, made and destroyed on demand: the large
// objects here (a Directory holds its bindings file buffer) would otherwise
// be mapped and unmapped by the sanitizers' allocator on every input, which
// costs more than the rest of an input. `Slot` tells apart two of one type.
template <typename T, int Slot = 0>
class Fresh {
 public:
  Fresh() = default;
  ~Fresh() { reset(); }
  Fresh(const Fresh&) = delete;
  Fresh& operator=(const Fresh&) = delete;
  template <typename... A>
  T& make(A&&... a) {
    reset();
    p_ = new (storage_) T(static_cast<A&&>(a)...);
    return *p_;
  }
  void reset() {
    if (p_) p_->~T();
    p_ = nullptr;
  }
  T& operator*() const { return *p_; }
  T* operator->() const { return p_; }

 private:
  alignas(T) static unsigned char storage_[sizeof(T)];
  T* p_ = nullptr;
};
template <typename T, int Slot>
alignas(T) unsigned char Fresh<T, Slot>::storage_[sizeof(T)];

int dev_null() {
  const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  FUZZ_CHECK(fd >= 0);
  return fd;
}

struct Pair {
  int sv[2] = {-1, -1};
  Pair() { FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0); }
  ~Pair() { close_all(); }
  void close_end(int i) {
    if (sv[i] >= 0) ::close(sv[i]);
    sv[i] = -1;
  }
  void close_all() {
    close_end(0);
    close_end(1);
  }
  Pair(const Pair&) = delete;
  Pair& operator=(const Pair&) = delete;
};

bool same_record(const dw::Record& a, const dw::Record& b) {
  return a.op == b.op && a.flags == b.flags && a.a == b.a && a.b == b.b && a.c == b.c && a.d == b.d &&
         std::strcmp(a.name, b.name) == 0 && std::strcmp(a.text, b.text) == 0;
}

// Writes `len` bytes to `path`, a new file in its place (truncating an
// existing file costs far more on some file systems).
void write_file(const char* path, const void* text, std::size_t len) {
  (void)::unlink(path);
  const int fd = ::open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  FUZZ_CHECK(fd >= 0);
  FUZZ_CHECK(::write(fd, text, len) == static_cast<ssize_t>(len));
  ::close(fd);
}

// "<runtime dir>/<leaf>" into `out`.
void runtime_file(char (&out)[sizeof(sockaddr_un::sun_path)], const char* leaf) {
  const int w = std::snprintf(out, sizeof out, "%s/%s", fuzz::runtime_dir(), leaf);
  FUZZ_CHECK(w > 0 && static_cast<std::size_t>(w) < sizeof out);
}

// The users the bindings may name: LEMSG_PASSWD points at a file of the
// harness's while an input runs (restored after: the replay runs inside
// lemsg-tests). It holds entries the parser must skip: a NIS line, a uid
// that is not a number, and a uid of (uid_t)-1.
struct Passwd {
  char saved[256] = {};
  bool had = false;
  Passwd() {
    const char* old = std::getenv("LEMSG_PASSWD");
    if (old && std::strlen(old) < sizeof saved) {
      std::strcpy(saved, old);
      had = true;
    }
    static char path[sizeof(sockaddr_un::sun_path)];
    if (!path[0]) runtime_file(path, "fuzz-directory.passwd");
    static const char text[] =
        "root:x:0:0:root:/root:/bin/sh\n"
        "modem:x:1001:1001::/:/bin/false\n"
        "ui:x:1002:1002::/:\n"
        "+nis:x:5:5::/:\n"
        "broken:x:12a:1::/:\n"
        "nobody-at-all:x:4294967295:0::/:\n"
        "logger:x:4242:4242::/:";
    if (::access(path, F_OK) != 0) write_file(path, text, sizeof text - 1);  // once
    ::setenv("LEMSG_PASSWD", path, 1);
  }
  ~Passwd() {
    if (had) ::setenv("LEMSG_PASSWD", saved, 1);
    else ::unsetenv("LEMSG_PASSWD");
  }
};

// ---- 0: one record -------------------------------------------------------------

void fuzz_record(fuzz::Input& in) {
  const bool has_fd = (in.u8() & 1) != 0;
  const Exact b(in.p + in.i, in.n - in.i);
  dw::Record r;
  const Result res = dw::decode(b.p, b.n, has_fd, r);
  FUZZ_CHECK(res == Result::Ok || res == Result::BadFrame);
  if (res != Result::Ok) return;
  FUZZ_CHECK(b.n >= wire::header_size + dw::fixed);
  const unsigned char* p = b.p + wire::header_size;
  const std::size_t nl = p[2], tl = p[3];
  FUZZ_CHECK(b.n == wire::header_size + dw::fixed + nl + tl);
  FUZZ_CHECK(nl <= LEMSG_MAX_NAME && tl <= dw::max_text);
  FUZZ_CHECK(std::strlen(r.name) == nl && std::strlen(r.text) == tl);
  FUZZ_CHECK(nl == 0 || lemsg::detail::valid_name(r.name));
  FUZZ_CHECK((r.op == dw::HandOff) == has_fd);
  dw::Record other;
  FUZZ_CHECK(dw::decode(b.p, b.n, !has_fd, other) == Result::BadFrame);

  // Written back by send() it is the same bytes, and recv() reads the same record.
  Pair pair;
  const int pass = has_fd ? dev_null() : -1;
  FUZZ_CHECK(dw::send(pair.sv[0], r, pass) == Result::Ok);
  if (pass >= 0) ::close(pass);
  unsigned char again[dw::max_frame + 1];
  const ssize_t n = ::recv(pair.sv[1], again, sizeof again, MSG_PEEK | MSG_DONTWAIT);
  FUZZ_CHECK(n == static_cast<ssize_t>(b.n) && std::memcmp(again, b.p, b.n) == 0);
  dw::Record back;
  int fd = -1;
  FUZZ_CHECK(dw::recv(pair.sv[1], back, fd) == Result::Ok);
  FUZZ_CHECK((fd >= 0) == has_fd);
  if (fd >= 0) ::close(fd);
  FUZZ_CHECK(same_record(r, back));
}

// ---- 1: the daemon -------------------------------------------------------------

struct Client {
  int fd = -1;
  bool registered = false;  // it sent a Register: it may be a server
};

// A defect this target found, fixed since: a waiting client that queued its
// own socket as an fd behind its question kept its connection alive in the
// directory's receive queue after it died (the directory now reads what a
// waiting client sends: its hello, forwarded with the hand-over, and nothing
// else). Its reproducer is in the corpus (waiting-client-passes-own-socket);
// tests/directory.cpp has the case. -DLEMSG_FUZZ_KNOWN_DEFECT_WAITING=1
// tolerates such a client again (to look at the old behaviour).
#ifndef LEMSG_FUZZ_KNOWN_DEFECT_WAITING
#define LEMSG_FUZZ_KNOWN_DEFECT_WAITING 0
#endif

// Bindings the directory starts with: this uid's "modem" interface to its
// own "modem" service, its "log" to another user's "logger" (so registering
// "logger" here is squatting), and the other user's "modem" to ours.
void good_bindings(char* out, std::size_t len) {
  const unsigned u = static_cast<unsigned>(::geteuid());
  const unsigned o = u == 4242 ? 4243 : 4242;
  const int w = std::snprintf(out, len, "%u.modem -> %u.modem\n%u.log -> %u.logger\n%u.modem->%u.modem # theirs\n", u,
                              u, u, o, o, u);
  FUZZ_CHECK(w > 0 && static_cast<std::size_t>(w) < len);
}

// Whether the bindings file may not be the good one (a reload wrote the
// input's text): the next daemon input writes it again.
bool bindings_dirty = true;

struct Daemon {
  lemsg::Loop loop;
  Fresh<lemsg::Directory> dir_owner;
  lemsg::Directory& dir{dir_owner.make(loop)};
  Client clients[kClients];
  std::size_t zombies = 0;  // clients that passed their own socket (the defect above)
  char sock[sizeof(sockaddr_un::sun_path)] = {};
  char bindings[sizeof(sockaddr_un::sun_path)] = {};

  void start() {
    runtime_file(sock, "fuzz-directory.sock");
    runtime_file(bindings, "fuzz-directory.bindings");
    if (bindings_dirty || ::access(bindings, F_OK) != 0) {
      char text[256];
      good_bindings(text, sizeof text);
      write_file(bindings, text, std::strlen(text));
      bindings_dirty = false;
    }
    lemsg::DirectoryOptions o;
    o.socket_path = sock;
    o.bindings_path = bindings;
    char err[256];
    const Result r = dir.start(o, err, sizeof err);
    if (r != Result::Ok) std::fprintf(stderr, "fuzz directory: start: %s: %s\n", lemsg::to_string(r), err);
    FUZZ_CHECK(r == Result::Ok);
    FUZZ_CHECK(dir.bindings().size() == 3);
  }

  Client* pick(std::uint8_t i) {
    Client& c = clients[i % kClients];
    return c.fd >= 0 ? &c : nullptr;
  }

  int open_clients() const {
    int n = 0;
    for (const Client& c : clients) n += c.fd >= 0;
    return n;
  }

  void check_counts() {
    FUZZ_CHECK(dir.service_count() <= LEMSG_DIR_MAX_SERVICES);
    FUZZ_CHECK(dir.waiting_count() <= LEMSG_DIR_MAX_WAITING);
    // Each registered server and waiting client is one of our sockets.
    const std::size_t tolerated = LEMSG_FUZZ_KNOWN_DEFECT_WAITING ? zombies : 0;
    FUZZ_CHECK(dir.service_count() + dir.waiting_count() <= static_cast<std::size_t>(open_clients()) + tolerated);
    FUZZ_CHECK(loop.watch_count() <= LEMSG_MAX_WATCHES);
  }

  void close_client(Client& c) {
    if (c.fd >= 0) ::close(c.fd);
    c = Client{};
  }

  // Reads what the directory sent to `c` and checks each record.
  void drain(Client& c) {
    for (int k = 0; k < 64; ++k) {
      dw::Record r;
      int fd = -1;
      // own_sockets: a HandOff carries a socket whose peer is this process.
      const Result res = dw::recv(c.fd, r, fd, true);
      if (res == Result::WouldBlock || res == Result::Closed) return;
      FUZZ_CHECK(res == Result::Ok);
      trace("client %d got op 0x%x flags %u a %u name '%s' fd %d\n", static_cast<int>(&c - clients), r.op, r.flags,
            r.a, r.name, fd);
      FUZZ_CHECK((fd >= 0) == (r.op == dw::HandOff));
      if (fd >= 0) ::close(fd);
      switch (r.op) {
        case dw::Registered:
        case dw::Answer:
          FUZZ_CHECK(dw::answer_code(r.a) != Result::BadFrame);
          FUZZ_CHECK(r.name[0] == '\0' && r.text[0] == '\0');
          break;
        case dw::HandOff:
          FUZZ_CHECK(c.registered);
          break;
        case dw::Entry:
          FUZZ_CHECK(r.flags >= dw::KindService && r.flags <= dw::KindBinding);
          FUZZ_CHECK(lemsg::detail::valid_name(r.name));
          break;
        case dw::End:
          break;
        default:
          FUZZ_CHECK(!"a record the directory does not send");
      }
    }
  }

  // A well-formed List, as directory_list() asks it (which cannot be called
  // here: it would wait for this very loop). `must`: the loop has a watch
  // free for the connection, so the directory has to answer.
  void list() {
    // (A long list may not fit the socket's buffer: the directory sends
    // without waiting. A few dozen records always do.)
    const bool must = loop.watch_count() < LEMSG_MAX_WATCHES && dir.bindings().size() <= 32;
    dw::Record req;
    req.op = dw::List;
    int fd = -1;
    FUZZ_CHECK(dw::ask(sock, req, fd) == Result::Ok);
    fuzz::settle(loop);
    std::size_t services = 0, waiting = 0, bound = 0;
    std::uint32_t entries = 0;
    bool ended = false;
    char names[LEMSG_DIR_MAX_SERVICES][LEMSG_MAX_NAME + 1];
    for (int k = 0; k < 4 * (LEMSG_DIR_MAX_SERVICES + LEMSG_DIR_MAX_WAITING + LEMSG_DIR_MAX_BINDINGS) && !ended; ++k) {
      dw::Record e;
      const Result r = dw::wait(fd, e, lemsg::detail::now_ns());
      if (r != Result::Ok) {
        FUZZ_CHECK(!must);
        FUZZ_CHECK(r == Result::Closed || r == Result::Timeout);
        break;
      }
      if (e.op == dw::End) {
        FUZZ_CHECK(e.a == entries);
        ended = true;
        break;
      }
      FUZZ_CHECK(e.op == dw::Entry);
      ++entries;
      FUZZ_CHECK(lemsg::detail::valid_name(e.name));
      if (e.flags == dw::KindService) {
        FUZZ_CHECK(e.text[0] != '\0');
        FUZZ_CHECK(services < LEMSG_DIR_MAX_SERVICES);
        for (std::size_t s = 0; s < services; ++s) FUZZ_CHECK(std::strcmp(names[s], e.name) != 0);
        std::memcpy(names[services++], e.name, sizeof names[0]);
      } else if (e.flags == dw::KindWaiting) {
        ++waiting;
      } else {
        FUZZ_CHECK(e.flags == dw::KindBinding);
        FUZZ_CHECK(lemsg::detail::valid_name(e.text));
        ++bound;
      }
    }
    FUZZ_CHECK(ended || !must);
    trace("list: %s, %zu services, %zu waiting, %zu bindings\n", ended ? "ended" : "cut short", services, waiting,
          bound);
    if (ended) {
      FUZZ_CHECK(services == dir.service_count());
      FUZZ_CHECK(waiting == dir.waiting_count());
      FUZZ_CHECK(bound == dir.bindings().size());
    }
    ::close(fd);
    fuzz::settle(loop);
  }

  // Reloads the bindings file: the good one, or the input's text.
  void reload(fuzz::Input& in) {
    const std::uint8_t how = in.u8();
    if (how & 1) {
      const std::uint8_t len = in.u8();
      char text[255];
      const std::size_t got = in.bytes(text, len, sizeof text);
      write_file(bindings, text, got);
      bindings_dirty = true;
    } else {
      char text[256];
      good_bindings(text, sizeof text);
      write_file(bindings, text, std::strlen(text));
    }
    const lemsg::Bindings& b = dir.bindings();
    lemsg::Binding before[LEMSG_DIR_MAX_BINDINGS];
    const std::size_t count = b.size();
    for (std::size_t i = 0; i < count; ++i) before[i] = b[i];
    char err[128];
    const Result r = dir.reload(err, sizeof err);
    FUZZ_CHECK(r == Result::Ok || r == Result::BadParameter || r == Result::BindingTableFull);
    if (r == Result::Ok) {
      FUZZ_CHECK(err[0] == '\0');
    } else {
      FUZZ_CHECK(err[0] != '\0' && std::strlen(err) < sizeof err);
      FUZZ_CHECK(b.size() == count);
      for (std::size_t i = 0; i < count; ++i) FUZZ_CHECK(std::memcmp(&before[i], &b[i], sizeof before[i]) == 0);
    }
  }

  // A record built from the input: the op, flags, a name and a text each
  // chosen from good ones or taken from the input, and the four numbers.
  void record(fuzz::Input& in, dw::Record& r) {
    static const std::uint8_t ops[] = {dw::Register, dw::Open, dw::Connect, dw::List};
    static const char* const names[] = {"modem", "logger", "log", "svc-a", ""};
    const std::uint8_t op = in.u8();
    r.op = op % 8 < 4 ? ops[op % 8] : in.u8();
    r.flags = in.u8();
    const std::uint8_t name = in.u8();
    if (name % 8 < 5) {
      dw::set_text(r.name, sizeof r.name, names[name % 8]);
    } else {
      const std::size_t got = in.bytes(r.name, name >> 3, sizeof r.name - 1);
      r.name[got] = '\0';
    }
    const std::uint8_t text = in.u8();
    if (text % 4 == 0) dw::set_text(r.text, sizeof r.text, "lemsg.fuzz.directory/1");
    else if (text % 4 == 1) r.text[0] = '\0';
    else r.text[in.bytes(r.text, text >> 2, sizeof r.text - 1)] = '\0';
    if (op & 0x80) {
      r.a = in.u32();
      r.b = in.u32();
    } else {
      r.a = 64;
    }
  }

  // An fd to send the directory, of the kind given.
  int make_fd(std::uint8_t kind, const Client& c) {
    switch (kind % 4) {
      case 0:
        return dev_null();
      case 1: {
        int p[2];
        FUZZ_CHECK(::pipe2(p, O_CLOEXEC) == 0);
        ::close(p[1]);
        return p[0];
      }
      case 2:
        return ::open(fuzz::runtime_dir(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      default:
        return ::fcntl(c.fd, F_DUPFD_CLOEXEC, 0);
    }
  }

  void step(fuzz::Input& in) {
    const std::uint8_t op = in.u8();
    trace("op %d at %zu: %zu services, %zu waiting\n", op % 9, in.i - 1, dir.service_count(), dir.waiting_count());
    switch (op % 9) {
      case 0: {  // connect
        for (Client& c : clients) {
          if (c.fd >= 0) continue;
          int fd = -1;
          const Result r = lemsg::detail::connect_to(sock, fd);
          FUZZ_CHECK(r == Result::Ok || r == Result::Busy);
          if (r == Result::Ok) c.fd = fd;
          break;
        }
        break;
      }
      case 1:
      case 2: {  // a record
        Client* c = pick(in.u8());
        dw::Record r;
        record(in, r);
        if (!c) break;
        if (r.op == dw::Register) c->registered = true;
        trace("client %d sends op 0x%x flags %u name '%s'\n", static_cast<int>(c - clients), r.op, r.flags, r.name);
        (void)dw::send(c->fd, r);
        break;
      }
      case 3: {  // raw bytes
        Client* c = pick(in.u8());
        const std::uint8_t len = in.u8();
        unsigned char buf[255];
        const std::size_t got = in.bytes(buf, len, sizeof buf);
        // A Register in disguise still makes it a server.
        if (c && got > wire::header_size && buf[wire::header_size] == dw::Register) c->registered = true;
        if (c) (void)lemsg::detail::send_datagram(c->fd, buf, got, -1);
        break;
      }
      case 4: {  // a record with an fd
        Client* c = pick(in.u8());
        const std::uint8_t kind = in.u8();
        dw::Record r;
        record(in, r);
        if (!c) break;
        const int fd = make_fd(kind, *c);
        FUZZ_CHECK(fd >= 0);
        if (kind % 4 == 3) ++zombies;
        trace("client %d sends op 0x%x flags %u name '%s' with fd kind %d\n", static_cast<int>(c - clients), r.op,
              r.flags, r.name, kind % 4);
        (void)dw::send(c->fd, r, fd);
        ::close(fd);
        break;
      }
      case 5: {  // half-close
        Client* c = pick(in.u8());
        if (c) (void)::shutdown(c->fd, SHUT_WR);
        break;
      }
      case 6: {
        Client* c = pick(in.u8());
        if (c) close_client(*c);
        break;
      }
      case 7: {
        Client* c = pick(in.u8());
        if (c) drain(*c);
        break;
      }
      case 8:
        if (in.u8() & 1) list();
        else reload(in);
        break;
    }
  }
};

void fuzz_daemon(fuzz::Input& in) {
  char sock[sizeof(sockaddr_un::sun_path)];
  {
    Fresh<Daemon> d;
    d.make();
    d->start();
    std::memcpy(sock, d->sock, sizeof sock);
    for (int steps = 0; !in.done() && steps < 64; ++steps) {
      d->step(in);
      fuzz::settle(d->loop);
      d->check_counts();
    }
    d->list();
    for (Client& c : d->clients) {
      if (c.fd >= 0) d->drain(c);
      d->close_client(c);
      fuzz::settle(d->loop);
      trace("closed client %d: %zu services, %zu waiting\n", static_cast<int>(&c - d->clients), d->dir.service_count(),
            d->dir.waiting_count());
    }
    fuzz::settle(d->loop);
    FUZZ_CHECK(d->dir.service_count() == 0);
    FUZZ_CHECK(d->dir.waiting_count() <= (LEMSG_FUZZ_KNOWN_DEFECT_WAITING ? d->zombies : 0));
    FUZZ_CHECK(d->loop.watch_count() < LEMSG_MAX_WATCHES);
    d->list();
    d->dir_owner.reset();
    FUZZ_CHECK(d->loop.watch_count() == 0 && d->loop.timer_count() == 0);
  }
  FUZZ_CHECK(::access(sock, F_OK) != 0);  // the socket file went with it
}

// ---- 2: the bindings file ------------------------------------------------------

// The table written out as a bindings file, one line per binding, uids as numbers.
std::size_t write_out(const lemsg::Bindings& b, char* out, std::size_t len) {
  std::size_t used = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    const int w = std::snprintf(out + used, len - used, "%lu.%s -> %lu.%s\n", static_cast<unsigned long>(b[i].client_uid),
                                b[i].iface, static_cast<unsigned long>(b[i].server_uid), b[i].service);
    FUZZ_CHECK(w > 0 && static_cast<std::size_t>(w) < len - used);
    used += static_cast<std::size_t>(w);
  }
  return used;
}

void fuzz_bindings(fuzz::Input& in) {
  const std::uint8_t err_len = in.u8();
  const Exact text(in.p + in.i, in.n - in.i);
  Fresh<lemsg::Bindings, 0> b;
  b.make();
  char good[256];
  good_bindings(good, sizeof good);
  FUZZ_CHECK(b->parse(good, std::strlen(good), nullptr, nullptr, 0) == Result::Ok);
  const std::size_t count = b->size();
  FUZZ_CHECK(count == 3);
  lemsg::Binding before[3];
  for (std::size_t i = 0; i < count; ++i) before[i] = (*b)[i];

  // The message buffer: exactly err_len bytes (none when 0), so ASan sees a
  // write past it.
  char* err = err_len ? static_cast<char*>(std::malloc(err_len)) : nullptr;
  if (err) std::memset(err, 'x', err_len);
  const Result r = b->parse(text.n ? reinterpret_cast<const char*>(text.p) : nullptr, text.n, "fuzz", err, err_len);
  FUZZ_CHECK(r == Result::Ok || r == Result::BadParameter || r == Result::BindingTableFull);
  if (err) FUZZ_CHECK(std::memchr(err, '\0', err_len) != nullptr);
  if (r != Result::Ok) {
    if (err_len > 1) FUZZ_CHECK(err[0] != '\0');
    FUZZ_CHECK(b->size() == count);
    for (std::size_t i = 0; i < count; ++i) FUZZ_CHECK(std::memcmp(&before[i], &(*b)[i], sizeof before[i]) == 0);
    // Parsed again, the same text gives the same answer.
    FUZZ_CHECK(b->parse(text.n ? reinterpret_cast<const char*>(text.p) : nullptr, text.n, nullptr, nullptr, 0) == r);
    std::free(err);
    return;
  }
  std::free(err);
  FUZZ_CHECK(b->size() <= LEMSG_DIR_MAX_BINDINGS);
  std::uint32_t last_line = 0;
  for (std::size_t i = 0; i < b->size(); ++i) {
    const lemsg::Binding& x = (*b)[i];
    FUZZ_CHECK(lemsg::detail::valid_name(x.iface) && lemsg::detail::valid_name(x.service));
    FUZZ_CHECK(x.client_uid != static_cast<uid_t>(-1) && x.server_uid != static_cast<uid_t>(-1));
    FUZZ_CHECK(x.line > last_line);
    last_line = x.line;
    FUZZ_CHECK(b->find(x.client_uid, x.iface) == &x);  // so no client and interface twice
  }
  // Written back out and parsed again: the same table.
  const std::size_t cap = LEMSG_DIR_MAX_BINDINGS * (2 * (10 + 1 + LEMSG_MAX_NAME) + 5) + 1;
  char* out = static_cast<char*>(std::malloc(cap));
  FUZZ_CHECK(out != nullptr);
  const std::size_t len = write_out(*b, out, cap);
  Fresh<lemsg::Bindings, 1> again;
  again.make();
  FUZZ_CHECK(again->parse(out, len, nullptr, nullptr, 0) == Result::Ok);
  std::free(out);
  FUZZ_CHECK(again->size() == b->size());
  for (std::size_t i = 0; i < b->size(); ++i) {
    const lemsg::Binding &x = (*b)[i], &y = (*again)[i];
    FUZZ_CHECK(x.client_uid == y.client_uid && x.server_uid == y.server_uid);
    FUZZ_CHECK(std::strcmp(x.iface, y.iface) == 0 && std::strcmp(x.service, y.service) == 0);
  }
}

// ---- 3: the info record ---------------------------------------------------------

// The record `info` says, written as the service writes it.
std::size_t write_info(const lemsg::ServiceInfo& info, unsigned char* rec) {
  namespace d = lemsg::detail;
  const std::size_t nl = std::strlen(info.name), il = std::strlen(info.protocol_id);
  d::put32(rec, 1);
  d::put32(rec + 4, static_cast<std::uint32_t>(info.mode));
  d::put32(rec + 8, info.max_payload);
  d::put32(rec + 12, info.pool_in_use);
  d::put32(rec + 16, info.pool_high_water);
  d::put32(rec + 20, info.pool_capacity);
  d::put32(rec + 24, static_cast<std::uint32_t>(nl));
  d::put32(rec + 28, static_cast<std::uint32_t>(il));
  d::put32(rec + 32, info.session_count);
  d::put32(rec + 36, info.monitors);
  const std::uint64_t counters[] = {
      info.counters.requests,         info.counters.responses,        info.counters.messages_in,
      info.counters.messages_out,     info.counters.bad_frames,       info.counters.opened,
      info.counters.refused,          info.counters.monitors_dropped, info.counters.closed_by_client,
      info.counters.closed_here,      info.counters.closed_bad_frame, info.counters.closed_too_large,
      info.counters.closed_overflow,  info.counters.closed_stalled,   info.counters.closed_other};
  static_assert(sizeof counters / sizeof counters[0] == wire::info_counter_count, "one per counter");
  for (std::size_t i = 0; i < wire::info_counter_count; ++i) d::put64(rec + 40 + 8 * i, counters[i]);
  std::memcpy(rec + wire::info_fixed_size, info.name, nl);
  std::memcpy(rec + wire::info_fixed_size + nl, info.protocol_id, il);
  unsigned char* at = rec + wire::info_fixed_size + nl + il;
  for (std::uint32_t i = 0; i < info.session_count; ++i, at += wire::info_session_size) {
    const lemsg::SessionInfo& s = info.sessions[i];
    d::put32(at, s.session.value);
    d::put32(at + 4, static_cast<std::uint32_t>(s.creds.pid));
    d::put32(at + 8, static_cast<std::uint32_t>(s.creds.uid));
    d::put32(at + 12, static_cast<std::uint32_t>(s.creds.gid));
    d::put32(at + 16, s.pending);
    d::put32(at + 20, s.queued);
  }
  return static_cast<std::size_t>(at - rec);
}

void check_info(const lemsg::ServiceInfo& info) {
  const std::size_t nl = ::strnlen(info.name, sizeof info.name);
  const std::size_t il = ::strnlen(info.protocol_id, sizeof info.protocol_id);
  FUZZ_CHECK(nl <= LEMSG_MAX_NAME && il >= 1 && il <= LEMSG_MAX_PROTOCOL_ID);
  FUZZ_CHECK(nl == 0 || lemsg::detail::valid_name(info.name));
  FUZZ_CHECK(info.mode == lemsg::ServiceMode::Direct || info.mode == lemsg::ServiceMode::Directory);
  FUZZ_CHECK(info.pool_in_use <= info.pool_high_water && info.pool_high_water <= info.pool_capacity);
  FUZZ_CHECK(info.session_count <= LEMSG_MAX_SESSIONS);
  for (std::uint32_t i = 0; i < info.session_count; ++i) FUZZ_CHECK(static_cast<bool>(info.sessions[i].session));
}

bool info_empty(const lemsg::ServiceInfo& info) {
  return info.name[0] == '\0' && info.protocol_id[0] == '\0' && info.session_count == 0 && info.max_payload == 0 &&
         info.counters.requests == 0;
}

void fuzz_info(fuzz::Input& in) {
  const std::uint8_t variant = in.u8();
  const Exact rec(in.p + in.i, in.n - in.i);
  std::unique_ptr<lemsg::ServiceInfo> info(new lemsg::ServiceInfo);
  info->server.pid = 7;
  info->server.uid = 8;
  info->server.gid = 9;
  const Result decoded = lemsg::detail::decode_info(rec.p, rec.n, *info);
  FUZZ_CHECK(decoded == Result::Ok || decoded == Result::BadFrame);
  if (decoded == Result::Ok) {
    check_info(*info);
    FUZZ_CHECK(info->server.pid == 7 && info->server.uid == 8 && info->server.gid == 9);
    std::unique_ptr<unsigned char[]> again(new unsigned char[wire::info_max_size]);
    FUZZ_CHECK(rec.n <= wire::info_max_size);
    FUZZ_CHECK(write_info(*info, again.get()) == rec.n && std::memcmp(again.get(), rec.p, rec.n) == 0);
  }

  // The same through query_info_fd, with sv[1] as the service.
  Pair pair;
  const int how = variant % 5;
  std::unique_ptr<unsigned char[]> frame(new unsigned char[wire::header_size + rec.n]);
  if (how <= 1) {  // framed, with an fd or not
    wire::encode(wire::Header{wire::FrameType::Message, static_cast<std::uint8_t>(how == 1 ? wire::FlagFd : 0), 0,
                              static_cast<std::uint32_t>(rec.n)},
                 frame.get());
    std::memcpy(frame.get() + wire::header_size, rec.p, rec.n);
    const int fd = how == 1 ? dev_null() : -1;
    const Result s = lemsg::detail::send_datagram(pair.sv[1], frame.get(), wire::header_size + rec.n, fd);
    FUZZ_CHECK(s == Result::Ok || s == Result::TooBigForSocket);
    if (fd >= 0) ::close(fd);
  } else if (how == 2) {  // raw: the record is the whole datagram
    (void)lemsg::detail::send_datagram(pair.sv[1], rec.p, rec.n, -1);
  } else if (how == 3) {  // nothing: the service hangs up
    pair.close_end(1);
  }  // 4: nothing, the service is still there: Timeout
  if (variant & 0x80) pair.close_end(1);  // it hangs up after sending
  lemsg::detail::clear_info(*info);
  std::strcpy(info->name, "untouched");
  const Result q = lemsg::query_info_fd(pair.sv[0], *info, 0);
  if (q == Result::Ok) {
    check_info(*info);
    FUZZ_CHECK(info->server.pid == ::getpid());
  } else {
    // Nothing half-written: untouched (it failed before reading a record) or empty.
    FUZZ_CHECK(std::strcmp(info->name, "untouched") == 0 || info_empty(*info));
  }
  if (how == 0 && wire::header_size + rec.n <= wire::header_size + wire::info_max_size)
    FUZZ_CHECK(q == decoded);
  if (how == 0 && rec.n > wire::info_max_size) FUZZ_CHECK(q == Result::TooLarge);
  if (how == 1) FUZZ_CHECK(q == Result::BadFrame);
  if (how == 3) FUZZ_CHECK(q == Result::Closed);
  if (how == 4) FUZZ_CHECK(q == ((variant & 0x80) ? Result::Closed : Result::Timeout));
  if (q == Result::Ok) FUZZ_CHECK(how == 0 || how == 2);
  // What the client asked: a Hello for the info id.
  if (pair.sv[1] >= 0) {
    unsigned char hello[wire::header_size + 8 + LEMSG_MAX_PROTOCOL_ID + 1];
    const ssize_t n = ::recv(pair.sv[1], hello, sizeof hello, MSG_DONTWAIT);
    wire::Header h;
    FUZZ_CHECK(n > 0 && wire::decode(hello, static_cast<std::size_t>(n), 0, h) == Result::Ok);
    FUZZ_CHECK(h.type == wire::FrameType::Hello && h.length == 8 + sizeof wire::info_id - 1);
    FUZZ_CHECK(std::memcmp(hello + wire::header_size + 8, wire::info_id, sizeof wire::info_id - 1) == 0);
  }
}

// ---- 4: the monitor --------------------------------------------------------------

std::size_t write_monitor(const lemsg::MonitorRecord& m, unsigned char* rec) {
  namespace d = lemsg::detail;
  d::put64(rec, m.time_ns);
  d::put32(rec + 8, m.session.value);
  rec[12] = static_cast<unsigned char>(m.direction);
  rec[13] = static_cast<unsigned char>(m.type);
  rec[14] = static_cast<unsigned char>((m.has_fd ? wire::FlagFd : 0) | (m.error ? wire::FlagError : 0));
  rec[15] = 0;
  d::put32(rec + 16, m.txn);
  d::put32(rec + 20, m.size);
  d::put32(rec + 24, m.payload_size);
  std::memcpy(rec + wire::record_fixed_size, m.payload, m.payload_size);
  return wire::record_fixed_size + m.payload_size;
}

void fuzz_monitor(fuzz::Input& in) {
  const std::uint8_t variant = in.u8();
  Pair pair;
  const int handshake = (variant >> 1) % 4;
  if (handshake == 0) {
    unsigned char welcome[wire::header_size];
    wire::encode(wire::Header{wire::FrameType::Welcome, 0, 0, 0}, welcome);
    FUZZ_CHECK(lemsg::detail::send_datagram(pair.sv[1], welcome, sizeof welcome, -1) == Result::Ok);
  } else if (handshake == 1) {
    unsigned char refuse[wire::header_size + 4];
    wire::encode(wire::Header{wire::FrameType::Refuse, wire::FlagError, 0, 4}, refuse);
    const std::uint32_t code = in.u32();
    std::memcpy(refuse + wire::header_size, &code, 4);
    FUZZ_CHECK(lemsg::detail::send_datagram(pair.sv[1], refuse, sizeof refuse, -1) == Result::Ok);
  } else if (handshake == 2) {
    const std::uint8_t len = in.u8();
    unsigned char raw[255];
    const std::size_t got = in.bytes(raw, len, sizeof raw);
    FUZZ_CHECK(lemsg::detail::send_datagram(pair.sv[1], raw, got, -1) == Result::Ok);
  } else {
    pair.close_end(1);
  }
  lemsg::Monitor mon;
  const int fd = pair.sv[0];
  pair.sv[0] = -1;  // attach_fd takes it in every case
  const Result a = mon.attach_fd(fd, (variant & 1) != 0, 0);
  FUZZ_CHECK(mon.attached() == (a == Result::Ok));
  if (handshake == 1) FUZZ_CHECK(a != Result::Ok);
  if (handshake == 3) FUZZ_CHECK(a == Result::Closed);
  if (handshake == 0) FUZZ_CHECK(a == Result::Ok);
  if (a != Result::Ok) return;

  // The records: each a byte (bit 0 raw, bit 1 with an fd), a length, the bytes.
  static unsigned char sent[32][wire::header_size + 255];
  std::size_t sent_len[32];
  int count = 0;
  while (count < 32 && !in.done()) {
    const std::uint8_t how = in.u8();
    const std::uint8_t len = in.u8();
    unsigned char* d = sent[count];
    std::size_t n;
    if (how & 1) {
      n = in.bytes(d, len, 255);
    } else {
      n = in.bytes(d + wire::header_size, len, 255);
      wire::encode(wire::Header{wire::FrameType::Message, 0, 0, static_cast<std::uint32_t>(n)}, d);
      n += wire::header_size;
    }
    const int pass = (how & 2) ? dev_null() : -1;
    const Result s = lemsg::detail::send_datagram(pair.sv[1], d, n, pass);
    if (pass >= 0) ::close(pass);
    if (s != Result::Ok) break;
    sent_len[count++] = n;
  }
  const bool hung_up = (variant & 0x80) != 0;
  if (hung_up) pair.close_end(1);

  lemsg::MonitorRecord m;
  for (int i = 0; i <= count; ++i) {
    const Result r = mon.next(m, 0);
    if (r == Result::Ok) {
      FUZZ_CHECK(i < count);
      FUZZ_CHECK(mon.attached());
      FUZZ_CHECK(m.payload_size <= LEMSG_MONITOR_PAYLOAD && m.payload_size <= m.size);
      FUZZ_CHECK(m.direction == lemsg::Direction::In || m.direction == lemsg::Direction::Out);
      FUZZ_CHECK(static_cast<bool>(m.session));
      FUZZ_CHECK((m.type == wire::FrameType::Message) == (m.txn == 0));
      FUZZ_CHECK(m.type == wire::FrameType::Message || m.type == wire::FrameType::Request ||
                 m.type == wire::FrameType::Response);
      unsigned char again[wire::record_fixed_size + LEMSG_MONITOR_PAYLOAD + 1];
      const std::size_t n = write_monitor(m, again);
      FUZZ_CHECK(sent_len[i] == wire::header_size + n && std::memcmp(sent[i] + wire::header_size, again, n) == 0);
      continue;
    }
    FUZZ_CHECK(r == Result::Timeout || r == Result::Closed || r == Result::BadFrame);
    if (r == Result::Timeout) FUZZ_CHECK(i == count && !hung_up && mon.attached());
    if (r == Result::Closed) FUZZ_CHECK(hung_up);
    if (r != Result::Timeout) {
      FUZZ_CHECK(!mon.attached());
      FUZZ_CHECK(mon.next(m, 0) == Result::NotFound);
    }
    break;
  }
}

}  // namespace

LEMSG_FUZZ_TARGET(directory) {
  fuzz::QuietLog quiet;
  fuzz::runtime_dir();
  const int fds_before = fuzz::count_fds();
  {
    Passwd passwd;
    fuzz::Input in{data, size};
    switch (in.u8() % 5) {
      case 0: fuzz_record(in); break;
      case 1: fuzz_daemon(in); break;
      case 2: fuzz_bindings(in); break;
      case 3: fuzz_info(in); break;
      default: fuzz_monitor(in); break;
    }
  }
  FUZZ_CHECK(fuzz::count_fds() == fds_before);
  return 0;
}
