// Fuzz target: a Service on a Loop, driven by raw client sockets.
//
// The input is a small program. Each operation is one byte (mod the number
// of operations) and its arguments; missing bytes read as 0. The harness
// holds up to kRaw raw client sockets connected to a Service advertised in a
// private LEMSG_RUNTIME_DIR, all in this process, and lets the loop run until
// it is quiet after every operation. Operations: connect; send a correct (or
// a slightly wrong) hello; send a frame built from the input (type, flags,
// txn, length, payload, broken magic/version/reserved/length, and an fd: the
// connection's own socket, another connection's socket, a directory, a file,
// a pipe, two fds, a fresh socket); send raw bytes; half-close; close; read
// what the server sent; choose how the receive handler treats frames
// (release, respond echoing the fd, hold, respond without the fd, close the
// session, send to the session) and what the open handler (close or send to
// its session) and the close handler (close or send to another session) do;
// respond to or release held requests; send
// to or close a session from the server; hide and advertise again. The
// handler may also hand the session a resource in a RefMap the Service tracks.
//
// Invariants, checked after every operation and at the end:
//   - session_count() equals the raw clients still connected (not hung up);
//   - a tracked resource's owner is a session that exists: a session's
//     entries are released (once each) when it closes;
//   - every frame the server sends decodes as a valid frame; a Response
//     answers a Request this client sent and has not had answered (never
//     twice), and at the end every request of a client still connected has
//     been answered exactly once;
//   - when all clients are closed: no session is left, the pool is back to 0
//     blocks in use, and the process has the fds it had before the input.
#include "fuzz.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <memory>

namespace {

using lemsg::Message;
using lemsg::Result;
using lemsg::SessionRef;
namespace wire = lemsg::wire;

constexpr std::uint32_t kMaxPayload = 64;
constexpr std::size_t kPoolCount = 12;
constexpr int kRaw = 6;
constexpr int kHeld = 6;
constexpr int kTxns = 16;
const char kName[] = "fuzz-service";
const lemsg::Protocol kProtocol{"lemsg.fuzz.service/1", kMaxPayload};

using Pool = lemsg::MessagePool<kMaxPayload, kPoolCount>;

struct Raw {
  int fd = -1;
  bool passed = false;      // its socket was passed to the server as an fd
  bool shut_rd = false;     // it cannot read any more: its requests are not checked
  bool untracked = false;   // more requests than the table holds: not checked
  bool welcomed = false;    // a Welcome was read: the server holds a session for it
  std::uint32_t txn[kTxns] = {};
  int count[kTxns] = {};
};

enum class Mode : std::uint8_t { Release, Respond, Hold, RespondNoFd, CloseSession, SendToo, Count };

struct Harness {
  lemsg::Loop loop;
  Pool pool;
  // Resources the handler hands to sessions, tracked so a closing session's
  // entries are released; declared before the Service, which must go first.
  lemsg::RefMap<int, 8> res;
  int res_obj = 0;
  int res_added = 0, res_released = 0, res_removed = 0;
  bool res_on = false;
  // Owned apart, so the end of an input can check the pool after it goes.
  std::unique_ptr<lemsg::Service> svc_owner{new lemsg::Service(loop, kProtocol, pool)};
  lemsg::Service& svc = *svc_owner;
  Raw raw[kRaw];
  Message held[kHeld];
  int zombies = 0;  // closed clients whose socket the server may still hold (defect 18)
  Mode mode = Mode::Release;
  std::uint8_t send_byte = 0;
  // What the open and close handlers do: 0 nothing, 1 close (this session in
  // the open handler, another one in the close handler), 2 send to it.
  std::uint8_t open_mode = 0, close_mode = 0;

  void on_open(SessionRef s) {
    if (open_mode == 1) FUZZ_CHECK(svc.close(s) == Result::Ok);
    if (open_mode == 2) send_to(s);
  }

  void on_close(SessionRef s, Result why) {
    FUZZ_CHECK(why == Result::Ok || why == Result::Closed || why == Result::BadFrame || why == Result::TooLarge ||
               why == Result::Overflow || lemsg::detail::known_result(static_cast<std::int32_t>(why)));
    if (close_mode == 0) return;
    SessionRef other{};
    svc.for_each_session([&](SessionRef o) {
      if (o.value != s.value && !other) other = o;
    });
    if (!other) return;
    if (close_mode == 1) {
      const Result r = svc.close(other);
      FUZZ_CHECK(r == Result::Ok || r == Result::NotFound);
    } else {
      send_to(other);
    }
  }

  void on_receive(Message& m) {
    if (res_on) {
      std::uint32_t ref = 0;
      const Result r = res.add(&res_obj, ref, m.session().value);
      FUZZ_CHECK(r == Result::Ok || r == Result::NoMemory);
      if (r == Result::Ok) ++res_added;
    }
    switch (mode) {
      case Mode::Release:
        break;
      case Mode::Respond:
        if (m.needs_response()) check_respond(svc.respond(std::move(m)));
        break;
      case Mode::RespondNoFd: {
        const int fd = m.take_fd();
        if (fd >= 0) ::close(fd);
        if (m.needs_response()) check_respond(svc.respond(std::move(m)));
        break;
      }
      case Mode::Hold:
        hold(std::move(m));
        break;
      case Mode::CloseSession:
        FUZZ_CHECK(svc.close(m.session()) == Result::Ok);
        // The session is gone: a response now is harmless and consumed.
        if (m.needs_response()) FUZZ_CHECK(svc.respond(std::move(m)) == Result::Closed);
        break;
      case Mode::SendToo:
        send_to(m.session());
        if (m.needs_response()) check_respond(svc.respond(std::move(m)));
        break;
      case Mode::Count:
        break;
    }
  }

  static void check_respond(Result r) {
    FUZZ_CHECK(r == Result::Ok || r == Result::Closed || r == Result::Overflow);
  }

  void hold(Message&& m) {
    for (Message& h : held)
      if (!h) {
        h = std::move(m);
        return;
      }
    held[0] = std::move(m);  // releases the oldest held
  }

  void send_to(SessionRef s) {
    Message m;
    if (svc.create_message(m) != Result::Ok) return;
    FUZZ_CHECK(m.assign(&send_byte, 1) == Result::Ok);
    const Result r = svc.send(s, std::move(m));
    FUZZ_CHECK(r == Result::Ok || r == Result::NotFound || r == Result::Overflow || r == Result::Closed);
  }

  SessionRef session_at(std::uint8_t i) {
    SessionRef found{};
    std::size_t k = 0;
    const std::size_t n = svc.session_count();
    if (n == 0) return found;
    const std::size_t want = i % n;
    svc.for_each_session([&](SessionRef s) {
      if (k++ == want) found = s;
    });
    return found;
  }

  bool hung_up(const Raw& r) const {
    struct pollfd p = {r.fd, 0, 0};
    return ::poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR));
  }

  void check_sessions() {
    // A connection is a session only once its hello was taken (until then
    // it waits in the handshake table): a live peer whose Welcome was read
    // has one; one whose Welcome was not read yet may.
    int live = 0, maybe = 0;
    for (const Raw& r : raw) {
      if (r.fd < 0 || hung_up(r)) continue;
      if (r.welcomed) ++live;
      else ++maybe;
    }
    const int sessions = static_cast<int>(svc.session_count());
    // An entry outlives no session: its owner is a session that exists.
    res.for_each([&](int*, std::uint32_t ref) {
      lemsg::Credentials c;
      FUZZ_CHECK(svc.credentials(SessionRef{res.owner_of(ref)}, c) == Result::Ok);
    });
    FUZZ_CHECK(res_added == res_released + res_removed + static_cast<int>(res.size()));
#if LEMSG_FUZZ_KNOWN_DEFECT_18
    FUZZ_CHECK(sessions >= live && sessions <= live + maybe + zombies);
#else
    FUZZ_CHECK(sessions >= live && sessions <= live + maybe);
#endif
  }

  // Reads everything waiting on a raw client and checks each frame.
  int drain(Raw& r) {
    if (r.fd < 0 || r.shut_rd) return 0;
    int frames = 0;
    for (;;) {
      alignas(8) unsigned char buf[wire::header_size + kMaxPayload + 8];
      struct iovec iov = {buf, sizeof buf};
      struct msghdr mh;
      std::memset(&mh, 0, sizeof mh);
      mh.msg_iov = &iov;
      mh.msg_iovlen = 1;
      alignas(struct cmsghdr) unsigned char control[CMSG_SPACE(8 * sizeof(int))];
      mh.msg_control = control;
      mh.msg_controllen = sizeof control;
      const ssize_t n = ::recvmsg(r.fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
      if (n <= 0) return frames;  // empty, or the end (the server closed)
      int nfds = 0;
      // musl's CMSG_NXTHDR trips clang's -Wsign-compare (as in lemsg.hpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
      for (struct cmsghdr* c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t j = 0; j < k; ++j) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + j * sizeof(int), sizeof fd);
          ::close(fd);
          ++nfds;
        }
      }
#pragma GCC diagnostic pop
      ++frames;
      FUZZ_CHECK(!(mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)));
      wire::Header h;
      FUZZ_CHECK(wire::decode(buf, static_cast<std::size_t>(n), kMaxPayload, h) == Result::Ok);
      FUZZ_CHECK(h.type == wire::FrameType::Welcome || h.type == wire::FrameType::Refuse ||
                 h.type == wire::FrameType::Message || h.type == wire::FrameType::Response);
      FUZZ_CHECK(nfds == ((h.flags & wire::FlagFd) ? 1 : 0));
      if (h.type == wire::FrameType::Welcome) r.welcomed = true;
      if (h.type == wire::FrameType::Response && !r.untracked) {
        int k = 0;
        while (k < kTxns && !(r.count[k] > 0 && r.txn[k] == h.txn)) ++k;
        FUZZ_CHECK(k < kTxns);  // a response to a request that is not pending
        --r.count[k];
      }
    }
  }

  void note_request(Raw& r, std::uint32_t txn) {
    for (int k = 0; k < kTxns; ++k)
      if (r.count[k] > 0 && r.txn[k] == txn) {
        ++r.count[k];
        return;
      }
    for (int k = 0; k < kTxns; ++k)
      if (r.count[k] == 0) {
        r.txn[k] = txn;
        r.count[k] = 1;
        return;
      }
    r.untracked = true;
  }

  void close_raw(Raw& r) {
    if (r.fd < 0) return;
    ::close(r.fd);
    if (r.passed) ++zombies;
    r = Raw{};
  }

  Raw* pick(std::uint8_t i) {
    Raw& r = raw[i % kRaw];
    return r.fd >= 0 ? &r : nullptr;
  }

  // An fd to pass of the given kind; `extra` gets a second one for kind 6.
  int make_fd(std::uint8_t kind, Raw& self, std::uint8_t other, int& extra) {
    extra = -1;
    switch (kind % 8) {
      case 1:
        self.passed = true;
        return ::fcntl(self.fd, F_DUPFD_CLOEXEC, 0);
      case 2: {
        Raw* o = pick(other);
        if (!o) return -1;
        o->passed = true;
        return ::fcntl(o->fd, F_DUPFD_CLOEXEC, 0);
      }
      case 3:
        return ::open(fuzz::runtime_dir(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      case 4:
        return ::open("/dev/null", O_RDONLY | O_CLOEXEC);
      case 5: {
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0) return -1;
        ::close(p[1]);
        return p[0];
      }
      case 6:
        extra = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        return ::open("/dev/null", O_RDONLY | O_CLOEXEC);
      case 7: {
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return -1;
        ::close(sv[1]);
        return sv[0];
      }
      default:
        return -1;
    }
  }

  void send_frame(Raw& r, const unsigned char* buf, std::size_t len, int fd, int extra) {
    struct iovec iov = {const_cast<unsigned char*>(buf), len};
    struct msghdr mh;
    std::memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    alignas(struct cmsghdr) unsigned char control[CMSG_SPACE(2 * sizeof(int))];
    const int fds[2] = {fd, extra};
    const std::size_t nfds = fd < 0 ? 0 : (extra < 0 ? 1 : 2);
    if (nfds) {
      std::memset(control, 0, sizeof control);
      mh.msg_control = control;
      mh.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
      struct cmsghdr* c = CMSG_FIRSTHDR(&mh);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
      std::memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    // Fails when the server's queue is full or it has gone: that is fine.
    (void)::sendmsg(r.fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (fd >= 0) ::close(fd);
    if (extra >= 0) ::close(extra);
  }

  void op_connect() {
    for (Raw& r : raw) {
      if (r.fd >= 0) continue;
      int fd = -1;
      if (lemsg::detail::connect_to(svc_path, fd) == Result::Ok) r.fd = fd;
      return;
    }
  }

  void op_hello(fuzz::Input& in) {
    Raw* r = pick(in.u8());
    const std::uint8_t variant = in.u8();
    if (!r) return;
    unsigned char buf[wire::header_size + 8 + LEMSG_MAX_PROTOCOL_ID];
    const std::uint32_t idlen = static_cast<std::uint32_t>(std::strlen(kProtocol.id));
    std::uint32_t max = kProtocol.max_payload;
    std::uint32_t said = idlen;
    if (variant % 5 == 1) max += 1;
    if (variant % 5 == 2) said += 1;
    std::memcpy(buf + wire::header_size, &max, 4);
    std::memcpy(buf + wire::header_size + 4, &said, 4);
    std::memcpy(buf + wire::header_size + 8, kProtocol.id, idlen);
    if (variant % 5 == 3) buf[wire::header_size + 8] ^= 1;  // another protocol
    std::uint32_t len = 8 + idlen;
    if (variant % 5 == 4) len -= 1;  // cut short
    wire::encode(wire::Header{wire::FrameType::Hello, 0, 0, len}, buf);
    send_frame(*r, buf, wire::header_size + len, -1, -1);
  }

  void op_frame(fuzz::Input& in) {
    Raw* r = pick(in.u8());
    const std::uint8_t type = in.u8();
    const std::uint8_t flags = in.u8();
    const std::uint8_t txn = in.u8();
    const std::uint8_t len = in.u8();
    const std::uint8_t tweak = in.u8();
    const std::uint8_t other = in.u8();
    alignas(8) unsigned char buf[wire::header_size + 255];
    std::memset(buf, 0, sizeof buf);
    const std::size_t got = in.bytes(buf + wire::header_size, len, 255);
    if (!r) return;
    std::uint32_t length = static_cast<std::uint32_t>(got);
    wire::Header h{static_cast<wire::FrameType>(type % 8), static_cast<std::uint8_t>(flags % 8),
                   static_cast<std::uint32_t>(txn % 8), length};
    wire::encode(h, buf);
    if (tweak & 1) buf[0] ^= 0xff;
    if (tweak & 2) buf[1] ^= 0xff;
    if (tweak & 4) buf[12] = 1;
    if (tweak & 8) {
      length += 1;
      std::memcpy(buf + 8, &length, 4);
    }
    int extra = -1;
    const int fd = make_fd(static_cast<std::uint8_t>(tweak >> 4), *r, other, extra);
    if (type % 8 == static_cast<int>(wire::FrameType::Request) && txn % 8 != 0) note_request(*r, txn % 8);
    send_frame(*r, buf, wire::header_size + got, fd, extra);
  }

  void op_bytes(fuzz::Input& in) {
    Raw* r = pick(in.u8());
    const std::uint8_t len = in.u8();
    unsigned char buf[255];
    const std::size_t got = in.bytes(buf, len, sizeof buf);
    if (r) send_frame(*r, buf, got, -1, -1);
  }

  void op_shutdown(fuzz::Input& in) {
    Raw* r = pick(in.u8());
    const std::uint8_t how = in.u8();
    if (!r) return;
    const int h = how % 3 == 0 ? SHUT_WR : how % 3 == 1 ? SHUT_RD : SHUT_RDWR;
    (void)::shutdown(r->fd, h);
    if (h != SHUT_WR) r->shut_rd = true;
  }

  void advertise() { FUZZ_CHECK(svc.advertise(kName) == Result::Ok); }

  void step(fuzz::Input& in) {
    const std::uint8_t op = in.u8();
    switch (op % 15) {
      case 0: op_connect(); break;
      case 1: op_hello(in); break;
      case 2: case 3: op_frame(in); break;
      case 4: op_bytes(in); break;
      case 5: op_shutdown(in); break;
      case 6: {
        Raw* r = pick(in.u8());
        if (r) close_raw(*r);
        break;
      }
      case 7: {
        Raw* r = pick(in.u8());
        if (r) drain(*r);
        break;
      }
      case 8: {
        const std::uint8_t b = in.u8();
        mode = static_cast<Mode>((b & 0x7f) % static_cast<std::uint8_t>(Mode::Count));
        res_on = (b & 0x80) != 0;
        break;
      }
      case 9: {  // answer (or release) one held message
        const std::uint8_t i = in.u8();
        Message& m = held[i % kHeld];
        if (m && (i & 0x80) && m.needs_response()) check_respond(svc.respond(std::move(m)));
        m.release();
        break;
      }
      case 10: {
        const SessionRef s = session_at(in.u8());
        send_byte = in.u8();
        if (s) send_to(s);
        break;
      }
      case 11: {
        const SessionRef s = session_at(in.u8());
        if (s) FUZZ_CHECK(svc.close(s) == Result::Ok);
        break;
      }
      case 12:
        if (svc.is_advertised()) FUZZ_CHECK(svc.hide() == Result::Ok);
        else advertise();
        break;
      case 13: {  // a stale or forged session handle (or resource) is refused
        SessionRef s{in.u32()};
        if (res.remove(s.value) == Result::Ok) ++res_removed;
        Message m;
        if (svc.create_message(m) == Result::Ok) {
          const Result r = svc.send(s, std::move(m));
          FUZZ_CHECK(r == Result::Ok || r == Result::NotFound || r == Result::Overflow || r == Result::Closed);
        }
        break;
      }
      case 14: {
        const std::uint8_t b = in.u8();
        open_mode = static_cast<std::uint8_t>((b & 3) % 3);
        close_mode = static_cast<std::uint8_t>(((b >> 2) & 3) % 3);
        break;
      }
    }
  }

  char svc_path[sizeof(sockaddr_un::sun_path)] = {};
};

}  // namespace

LEMSG_FUZZ_TARGET(service) {
  fuzz::QuietLog quiet;
  fuzz::runtime_dir();
  const int fds_before = fuzz::count_fds();
  {
    std::unique_ptr<Harness> hp(new Harness);
    Harness& t = *hp;
    FUZZ_CHECK(t.svc.status() == Result::Ok);
    FUZZ_CHECK(lemsg::detail::socket_path(kName, t.svc_path) == Result::Ok);
    t.svc.set_receive_handler([&t](Message& m) { t.on_receive(m); });
    t.svc.set_open_handler([&t](SessionRef s) { t.on_open(s); });
    t.svc.set_close_handler([&t](SessionRef s, Result why) { t.on_close(s, why); });
    FUZZ_CHECK(t.svc.track(t.res, [&t](void* obj, std::uint32_t) {
      FUZZ_CHECK(obj == &t.res_obj);
      ++t.res_released;
    }) == Result::Ok);
    t.advertise();

    fuzz::Input in{data, size};
    for (int steps = 0; !in.done() && steps < 256; ++steps) {
      t.step(in);
      fuzz::settle(t.loop);
      t.check_sessions();
    }

    // Every held request is answered (Unanswered), then everything the
    // server sent is read until nothing more comes.
    for (Message& m : t.held) m.release();
    t.mode = Mode::Release;
    t.open_mode = t.close_mode = 0;
    for (int round = 0; round < 32; ++round) {
      fuzz::settle(t.loop, 10);
      int frames = 0;
      for (Raw& r : t.raw) frames += t.drain(r);
      if (frames == 0) break;
    }
    fuzz::settle(t.loop, 10);
    t.check_sessions();
    for (Raw& r : t.raw)
      if (r.fd >= 0 && !r.shut_rd && !r.untracked && !t.hung_up(r))
        for (int k = 0; k < kTxns; ++k) FUZZ_CHECK(r.count[k] == 0);  // a request never answered

    // All clients close: every session goes, and its blocks with it.
    for (Raw& r : t.raw) t.close_raw(r);
    fuzz::settle(t.loop, 10);
    t.check_sessions();
    if (t.svc.session_count() == 0) FUZZ_CHECK(t.pool.in_use() == 0);
    t.svc_owner.reset();  // closes what defect 18 kept open
    FUZZ_CHECK(t.pool.in_use() == 0);
    FUZZ_CHECK(t.loop.watch_count() == 0 && t.loop.timer_count() == 0);
    FUZZ_CHECK(t.res.size() == 0 && t.res_added == t.res_released + t.res_removed);
    hp.reset();
  }
  FUZZ_CHECK(fuzz::count_fds() == fds_before);
  return 0;
}
