// Fuzz target: a Session on a Loop, against a fake server the harness plays.
//
// The input is a small program (one operation byte, then its arguments;
// missing bytes read as 0). The fake server is a raw listening socket at
// <LEMSG_RUNTIME_DIR>/fuzz-session in this process: it accepts, reads what
// the client sent (and learns the txns of its requests), and answers with
// Welcome, Refuse, responses to real, stale or forged txns, error responses
// with known and unknown codes, messages with and without fds, frames built
// from the input, half-closes and closes. The client side opens, sends,
// makes requests (no timeout, 1 ms, or one that cannot pass during the
// input), makes short synchronous requests, lets a few ms pass, closes and
// opens again, reconnects by itself, and its handlers may hold messages,
// close the session, open it again or make a new request.
//
// Invariants, after every operation and at the end:
//   - every request that request() accepted completes exactly once, and one
//     it refused never completes; pending_count() equals the accepted
//     requests not yet completed;
//   - every frame the client sends decodes as a valid client frame;
//   - after the Session is closed: every request has completed, the pool is
//     back to 0 blocks in use, and the process has the fds it had before.
#include "fuzz.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <memory>

namespace {

using lemsg::Message;
using lemsg::Result;
namespace wire = lemsg::wire;

constexpr std::uint32_t kMaxPayload = 64;
constexpr std::size_t kPoolCount = 10;
constexpr int kRequests = 64;
constexpr int kTxns = 16;
constexpr int kHeld = 4;
const char kName[] = "fuzz-session";
const lemsg::Protocol kProtocol{"lemsg.fuzz.session/1", kMaxPayload};

using Pool = lemsg::MessagePool<kMaxPayload, kPoolCount>;

enum class Mode : std::uint8_t { Release, Hold, Close, Request, Count };

struct Harness {
  lemsg::Loop loop;
  Pool pool;
  std::unique_ptr<lemsg::Session> owner{new lemsg::Session(loop, kProtocol, pool)};
  lemsg::Session& s = *owner;
  char path[sizeof(sockaddr_un::sun_path)] = {};
  int listen_fd = -1;
  int conn = -1;  // the fake server's end of the connection
  std::uint32_t txns[kTxns] = {};  // txns of requests the server has read
  int ntxns = 0;
  std::uint32_t last_txn = 0;
  Message held[kHeld];
  Mode mode = Mode::Release;
  int sync_calls = 0;
  int waits = 0;
  std::uint8_t close_mode = 0;  // the close handler: 0 nothing, 1 open again, 2 close

  void on_close(Result why) {
    FUZZ_CHECK(why == Result::Closed || why == Result::BadFrame || why == Result::TooLarge ||
               why == Result::Overflow || lemsg::detail::known_result(static_cast<std::int32_t>(why)));
    FUZZ_CHECK(!s.is_open());
    if (close_mode == 1) open();
    if (close_mode == 2) s.close();
  }

  void open() {
    const Result r = s.open(kName, [](Result res) {
      FUZZ_CHECK(res == Result::Ok || lemsg::detail::known_result(static_cast<std::int32_t>(res)));
    });
    FUZZ_CHECK(r == Result::Ok || r == Result::Busy);
  }

  // Requests: how many request() accepted, and how often each completed.
  bool accepted[kRequests] = {};
  int completed[kRequests] = {};
  int nreq = 0;

  void on_done(int id, Result r, Message& m) {
    FUZZ_CHECK(id >= 0 && id < nreq);
    FUZZ_CHECK(accepted[id]);        // a refused request never completes
    FUZZ_CHECK(completed[id] == 0);  // nor one that already did
    ++completed[id];
    FUZZ_CHECK(r == Result::Ok ? static_cast<bool>(m) : !m);
    react(m);
  }

  void on_receive(Message& m) {
    FUZZ_CHECK(static_cast<bool>(m));
    react(m);
  }

  // What a handler does, by the current mode: handlers may close the session
  // or make a new request from inside.
  void react(Message& m) {
    switch (mode) {
      case Mode::Hold:
        if (m) {
          for (Message& h : held)
            if (!h) {
              h = std::move(m);
              return;
            }
          held[0] = std::move(m);
        }
        break;
      case Mode::Close:
        s.close();
        break;
      case Mode::Request:
        mode = Mode::Release;  // once, or a response handler would chain forever
        request(0);
        break;
      default:
        break;
    }
  }

  void request(std::uint32_t timeout_ms) {
    if (nreq == kRequests) return;
    Message m;
    if (s.create_message(m) != Result::Ok) return;
    const int id = nreq++;
    FUZZ_CHECK(m.set_size(static_cast<std::uint32_t>(id % 8)) == Result::Ok);
    Harness* t = this;
    const Result r = s.request(std::move(m), [t, id](Result res, Message& resp) { t->on_done(id, res, resp); },
                               timeout_ms);
    FUZZ_CHECK(r == Result::Ok || r == Result::Closed || r == Result::Overflow ||
               r == Result::PendingTableFull);
    accepted[id] = r == Result::Ok;
  }

  void check_pending() {
    std::size_t open = 0;
    for (int i = 0; i < nreq; ++i) {
      FUZZ_CHECK(completed[i] <= 1);
      if (accepted[i] && completed[i] == 0) ++open;
    }
    FUZZ_CHECK(s.pending_count() == open);
  }

  void listen() {
    if (listen_fd >= 0) return;
    FUZZ_CHECK(lemsg::detail::listen_at(path, 0600, listen_fd) == Result::Ok);
  }
  void unlisten() {
    if (listen_fd < 0) return;
    ::close(listen_fd);
    ::unlink(path);
    listen_fd = -1;
  }
  void drop_conn() {
    if (conn >= 0) ::close(conn);
    conn = -1;
    ntxns = 0;
  }

  void accept_one() {
    if (listen_fd < 0) return;
    const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    drop_conn();
    conn = fd;
  }

  // Reads what the client sent; each frame must be a valid client frame.
  void server_read() {
    if (conn < 0) return;
    for (;;) {
      alignas(8) unsigned char buf[wire::header_size + 8 + LEMSG_MAX_PROTOCOL_ID + kMaxPayload];
      struct iovec iov = {buf, sizeof buf};
      struct msghdr mh;
      std::memset(&mh, 0, sizeof mh);
      mh.msg_iov = &iov;
      mh.msg_iovlen = 1;
      alignas(struct cmsghdr) unsigned char control[CMSG_SPACE(4 * sizeof(int))];
      mh.msg_control = control;
      mh.msg_controllen = sizeof control;
      const ssize_t n = ::recvmsg(conn, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
      if (n <= 0) return;
      FUZZ_CHECK(CMSG_FIRSTHDR(&mh) == nullptr);  // this client never sends an fd
      wire::Header h;
      FUZZ_CHECK(wire::decode(buf, static_cast<std::size_t>(n), kMaxPayload, h) == Result::Ok);
      FUZZ_CHECK(h.type == wire::FrameType::Hello || h.type == wire::FrameType::Message ||
                 h.type == wire::FrameType::Request);
      if (h.type == wire::FrameType::Hello) {
        std::uint32_t max, idlen;
        std::memcpy(&max, buf + wire::header_size, 4);
        std::memcpy(&idlen, buf + wire::header_size + 4, 4);
        FUZZ_CHECK(max == kMaxPayload && idlen == std::strlen(kProtocol.id) && h.length == 8 + idlen);
      }
      if (h.type == wire::FrameType::Request) {
        last_txn = h.txn;
        if (ntxns < kTxns) txns[ntxns++] = h.txn;
      }
    }
  }

  void server_send(const unsigned char* buf, std::size_t len, int fd) {
    if (conn < 0) return;
    // The library's own sender: what is under test is the Session's receiving end.
    (void)lemsg::detail::send_datagram(conn, buf, len, fd);
  }


  void send_header(wire::FrameType type, std::uint8_t flags, std::uint32_t txn, const void* payload,
                   std::uint32_t len, int fd = -1) {
    alignas(8) unsigned char buf[wire::header_size + 255];
    if (len > 255) len = 255;
    wire::encode(wire::Header{type, flags, txn, len}, buf);
    if (len) std::memcpy(buf + wire::header_size, payload, len);
    server_send(buf, wire::header_size + len, fd);
  }

  int make_fd(std::uint8_t kind) {
    switch (kind % 5) {
      case 1: return ::open("/dev/null", O_RDONLY | O_CLOEXEC);
      case 2: return ::open(fuzz::runtime_dir(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      case 3: return conn >= 0 ? ::fcntl(conn, F_DUPFD_CLOEXEC, 0) : -1;
      case 4: {
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0) return -1;
        ::close(p[1]);
        return p[0];
      }
      default: return -1;
    }
  }

  void step(fuzz::Input& in) {
    const std::uint8_t op = in.u8();
    switch (op % 18) {
      case 0: open(); break;
      case 1: accept_one(); break;
      case 2: {  // the handshake answer
        const std::uint8_t v = in.u8();
        const std::int32_t code = static_cast<std::int32_t>(in.u8()) - 2;
        if (v % 4 == 0) send_header(wire::FrameType::Welcome, 0, 0, nullptr, 0);
        else if (v % 4 == 1) send_header(wire::FrameType::Refuse, wire::FlagError, 0, &code, 4);
        else if (v % 4 == 2) send_header(wire::FrameType::Welcome, 0, 0, &code, 4);  // bad length
        else send_header(wire::FrameType::Message, 0, 0, &code, 1);
        break;
      }
      case 3: request(0); break;
      case 4: request(60000); break;  // a deadline that cannot pass during one input
      case 5: {
        Message m;
        if (s.create_message(m) == Result::Ok) {
          const std::uint8_t b = in.u8();
          FUZZ_CHECK(m.assign(&b, 1) == Result::Ok);
          const Result r = s.send(std::move(m));
          FUZZ_CHECK(r == Result::Ok || r == Result::Closed || r == Result::Overflow);
        }
        break;
      }
      case 6: server_read(); break;
      case 7: {  // a response to a txn the server saw, the last one, or a forged one
        const std::uint8_t which = in.u8();
        const std::uint8_t kind = in.u8();
        const std::uint8_t len = in.u8();
        std::uint32_t txn = which & 0x80 ? last_txn : (ntxns ? txns[which % ntxns] : 1u);
        if ((kind & 0x30) == 0x30) txn = in.u32();
        if (txn == 0) txn = 1;
        const std::int32_t code = static_cast<std::int32_t>(kind & 0x0f) - 1;
        unsigned char payload[kMaxPayload + 8] = {};
        if (kind & 0x40) {
          send_header(wire::FrameType::Response, wire::FlagError, txn, &code, 4);
        } else {
          const int fd = make_fd(static_cast<std::uint8_t>(kind));
          send_header(wire::FrameType::Response, fd >= 0 ? wire::FlagFd : 0, txn, payload,
                      len % (kMaxPayload + 4), fd);
          if (fd >= 0) ::close(fd);
        }
        break;
      }
      case 8: {  // any frame from the input
        const std::uint8_t type = in.u8();
        const std::uint8_t flags = in.u8();
        const std::uint32_t txn = in.u8();
        const std::uint8_t len = in.u8();
        const std::uint8_t kind = in.u8();
        alignas(8) unsigned char buf[wire::header_size + 255];
        std::memset(buf, 0, sizeof buf);
        const std::size_t got = in.bytes(buf + wire::header_size, len, 255);
        wire::encode(wire::Header{static_cast<wire::FrameType>(type % 8), static_cast<std::uint8_t>(flags % 8),
                                  txn % 4 == 3 ? last_txn : txn, static_cast<std::uint32_t>(got)},
                     buf);
        if (kind & 0x80) buf[12] = 1;
        const int fd = make_fd(kind);
        server_send(buf, wire::header_size + got, fd);
        if (fd >= 0) ::close(fd);
        break;
      }
      case 9: {  // a one-way message, maybe with an fd
        const std::uint8_t kind = in.u8();
        const int fd = make_fd(kind);
        send_header(wire::FrameType::Message, fd >= 0 ? wire::FlagFd : 0, 0, &kind, 1, fd);
        if (fd >= 0) ::close(fd);
        break;
      }
      case 10: {
        const std::uint8_t how = in.u8();
        if (conn >= 0 && how % 3 != 2) (void)::shutdown(conn, how % 3 == 0 ? SHUT_WR : SHUT_RD);
        else drop_conn();
        break;
      }
      case 11: s.close(); break;
      case 12: mode = static_cast<Mode>(in.u8() % static_cast<std::uint8_t>(Mode::Count)); break;
      case 13:
        for (Message& h : held) h.release();
        break;
      case 14:
        if (listen_fd >= 0) unlisten();
        else listen();
        break;
      case 15: {  // a short synchronous request: frames meanwhile are deferred
        if (sync_calls >= 4) break;
        ++sync_calls;
        Message m, resp;
        if (s.create_message(m) != Result::Ok) break;
        const Result r = s.request_sync(std::move(m), resp, 1);
        FUZZ_CHECK(r == Result::Ok || r == Result::Timeout || r == Result::Closed || r == Result::Overflow ||
                   r == Result::PoolEmpty || r == Result::PendingTableFull ||
                   lemsg::detail::known_result(static_cast<std::int32_t>(r)));
        FUZZ_CHECK(r == Result::Ok ? static_cast<bool>(resp) : !resp);
        break;
      }
      case 16: {  // handler behaviour, reconnecting, or a request with a 1 ms timeout
        const std::uint8_t b = in.u8();
        if (b & 0x80) request(1);
        else if (b & 0x40) s.set_reconnect((b & 1) != 0, 1, 4);
        else close_mode = static_cast<std::uint8_t>(b % 3);
        break;
      }
      case 17:  // let a few ms pass: request timeouts, backoff, a paused reader
        if (waits < 4) {
          ++waits;
          fuzz::settle(loop, 5);
        }
        break;
    }
  }
};

}  // namespace

LEMSG_FUZZ_TARGET(session) {
  fuzz::QuietLog quiet;
  fuzz::runtime_dir();
  const int fds_before = fuzz::count_fds();
  {
    std::unique_ptr<Harness> hp(new Harness);
    Harness& t = *hp;
    FUZZ_CHECK(t.s.status() == Result::Ok);
    FUZZ_CHECK(lemsg::detail::socket_path(kName, t.path) == Result::Ok);
    ::unlink(t.path);
    t.listen();
    t.s.set_receive_handler([&t](Message& m) { t.on_receive(m); });
    t.s.set_close_handler([&t](Result why) { t.on_close(why); });

    fuzz::Input in{data, size};
    for (int steps = 0; !in.done() && steps < 256; ++steps) {
      t.step(in);
      fuzz::settle(t.loop);
      t.check_pending();
    }

    // Closing completes every accepted request, exactly once.
    t.mode = Mode::Release;
    t.close_mode = 0;
    t.s.close();
    t.check_pending();
    FUZZ_CHECK(t.s.pending_count() == 0);
    for (int i = 0; i < t.nreq; ++i) FUZZ_CHECK(t.completed[i] == (t.accepted[i] ? 1 : 0));
    fuzz::settle(t.loop, 10);
    for (Message& h : t.held) h.release();
    FUZZ_CHECK(t.pool.in_use() == 0);
    t.drop_conn();
    t.unlisten();
    t.owner.reset();
    FUZZ_CHECK(t.pool.in_use() == 0);
    FUZZ_CHECK(t.loop.watch_count() == 0 && t.loop.timer_count() == 0);
    hp.reset();
  }
  FUZZ_CHECK(fuzz::count_fds() == fds_before);
  return 0;
}
