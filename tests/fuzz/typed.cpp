// Fuzz target: the typed layer's decoder (lemsg.hpp section 12), on any
// bytes, directly and through a real TypedService and TypedClient.
//
// The interface has a field of every kind: integers of each width, bool,
// float, double, enums, Flags, String<N> (one- and two-byte counts),
// Array<T, N> of structs and of strings, Bytes<N> (up to a four-byte count),
// Optional, nested structs, Ref, Fd, Optional<Fd>, and an Array of empty
// structs. The first input byte picks a mode:
//   - decode: the rest (after a byte choosing the type and whether an fd
//     rides along) is one payload for detail::decode();
//   - service: a program of frames (each: an operation byte, a length, the
//     bytes) that a plain Session speaking the typed protocol id sends to a
//     TypedService on the same Loop, as a request or a one-way frame, with
//     or without an fd; or emits an event, or opens the session again;
//   - client: a program in which a plain Service speaking the protocol holds
//     a TypedClient's calls and answers them with the input's bytes, sends
//     the input's bytes as events, and the client subscribes, unsubscribes,
//     closes and opens again.
//
// Invariants:
//   - a decode that succeeds re-encodes to exactly the bytes it came from
//     (the encoding is canonical), with the fd when an Fd field holds it;
//     every String is NUL-terminated at its size, within its bound, with no
//     NUL inside; every count is within its bound; a bool is 0 or 1;
//   - a decode that fails leaves the value empty (it encodes as T{}) and
//     closes the frame's fd;
//   - the service closes the sender's session with BadFrame exactly when the
//     section says the frame is malformed (a model of it decides, using the
//     same decode), and then no handler runs; otherwise the handler runs
//     (unless a Ref does not resolve) with a value that re-encodes to the
//     frame, and an echo comes back as the same bytes;
//   - the client's session closes with BadFrame exactly when a response or
//     an event is malformed; the malformed call completes with BadFrame, the
//     others with Closed, every call exactly once; an event handler runs only
//     for a well-formed event subscribed to;
//   - at the end: the pool is back to 0 blocks in use, the process has the
//     fds it had before.
#include "fuzz.hpp"

#include <fcntl.h>

#include <memory>

namespace {

using lemsg::Message;
using lemsg::Result;
using lemsg::SessionRef;

// ---- the interface: every field kind --------------------------------------------

enum class Color : std::uint8_t { Red = 1, Green = 2 };
enum class Wide : std::int64_t { Low = -1, High = 1 };
enum class Perm : std::uint16_t { Read = 1, Write = 2 };
struct Obj {
  int n = 0;
};
struct Point {
  std::int16_t x;
  std::uint16_t y;
};
struct Inner {
  Point p;
  lemsg::Optional<Point> q;
  lemsg::Array<lemsg::String<3>, 2> words;
  lemsg::Ref<Obj> ref;
};
struct All {
  bool b;
  std::int8_t i8;
  std::uint8_t u8;
  std::int16_t i16;
  std::uint16_t u16;
  std::int32_t i32;
  std::uint32_t u32;
  std::int64_t i64;
  std::uint64_t u64;
  float f;
  double d;
  Color c;
  Wide w;
  lemsg::Flags<Perm> perm;
  lemsg::String<5> s;
  lemsg::String<300> text;
  lemsg::Array<Point, 4> pts;
  lemsg::Bytes<20> bytes;
  lemsg::Optional<std::uint32_t> opt;
  lemsg::Optional<lemsg::String<4>> ostr;
  Inner inner;
  lemsg::Ref<Obj> ref;
  lemsg::Fd fd;
};
struct Voids {
  lemsg::Array<lemsg::Void, 300> v;  // elements of no bytes
  bool last;
};
struct MaybeFd {
  lemsg::Optional<lemsg::Fd> fd;
  std::uint8_t tag;
};
struct Huge {
  lemsg::Bytes<65536> b;  // a four-byte count
};
struct Num {
  std::uint32_t n;
};

LEMSG_METHOD(Echo, All, All);        // 0
LEMSG_ONEWAY(Note, All);             // 1
LEMSG_METHOD(Count, Voids, Num);     // 2
LEMSG_METHOD(PassFd, MaybeFd, MaybeFd);  // 3
LEMSG_EVENT(Tick, Num);              // 4
LEMSG_EVENT(Big, All);               // 5
struct Api : lemsg::Interface<Echo, Note, Count, PassFd, Tick, Big> {
  static constexpr const char* name = "lemsg.fuzz.typed";
};
using Info = lemsg::InterfaceInfo<Api>;
using Pool = lemsg::TypedPool<Api, 10>;
const char kName[] = "fuzz-typed";
constexpr lemsg::ItemKind kKinds[] = {lemsg::ItemKind::Method, lemsg::ItemKind::OneWay, lemsg::ItemKind::Method,
                                      lemsg::ItemKind::Method, lemsg::ItemKind::Event, lemsg::ItemKind::Event};
static_assert(sizeof kKinds / sizeof kKinds[0] == Info::item_count, "one kind per item");

// ---- what a decoded value may look like ------------------------------------------

template <std::size_t N>
void check(const lemsg::String<N>& s) {
  FUZZ_CHECK(s.size() <= N);
  FUZZ_CHECK(s.c_str()[s.size()] == 0);
  FUZZ_CHECK(std::strlen(s.c_str()) == s.size());
}
template <std::size_t N>
void check(const lemsg::Bytes<N>& b) {
  FUZZ_CHECK(b.size() <= N);
}
void check(const bool& b) {
  unsigned char c;
  std::memcpy(&c, &b, 1);
  FUZZ_CHECK(c <= 1);
}
void check(const Point&) {}
void check(const lemsg::Void&) {}
void check(const std::uint32_t&) {}
void check(const lemsg::Fd&) {}
template <typename T, std::size_t N>
void check(const lemsg::Array<T, N>& a) {
  FUZZ_CHECK(a.size() <= N);
  for (const T& e : a) check(e);
}
template <typename T>
void check(const lemsg::Optional<T>& o) {
  if (o) check(*o);
}
void check(const Inner& i) {
  check(i.q);
  check(i.words);
}
void check(const All& a) {
  check(a.b);
  check(a.s);
  check(a.text);
  check(a.pts);
  check(a.bytes);
  check(a.opt);
  check(a.ostr);
  check(a.inner);
}
void check(const Voids& v) {
  check(v.v);
  check(v.last);
}
void check(const MaybeFd& m) { check(m.fd); }
void check(const Huge& h) { check(h.b); }
void check(const Num&) {}

// The descriptor an Fd field holds (-1: none).
int fd_of(const All& a) { return a.fd.get(); }
int fd_of(const MaybeFd& m) { return m.fd && m.fd->valid() ? m.fd->get() : -1; }
template <typename T>
int fd_of(const T&) {
  return -1;
}

// Fills a value with something of every field, so a failed decode has
// something to reset.
void fill(All& a) {
  a.b = true;
  a.i8 = -1;
  a.u32 = 7;
  a.f = 1.5f;
  a.d = -2.5;
  a.c = Color::Green;
  a.w = Wide::High;
  a.perm = lemsg::Flags<Perm>(Perm::Read) | Perm::Write;
  (void)a.s.assign("abc");
  (void)a.text.assign("text");
  (void)a.pts.push_back(Point{1, 2});
  (void)a.bytes.assign("xy", 2);
  a.opt = 9u;
  a.ostr.emplace() = lemsg::String<4>("ab");
  a.inner.q = Point{3, 4};
  (void)a.inner.words.push_back(lemsg::String<3>("w"));
  a.inner.ref = lemsg::Ref<Obj>(5);
  a.ref = lemsg::Ref<Obj>(6);
}
void fill(Voids& v) {
  (void)v.v.resize(3);
  v.last = true;
}
void fill(MaybeFd& m) {
  m.fd.emplace();
  m.tag = 1;
}
void fill(Inner& i) {
  i.q = Point{1, 2};
  i.ref = lemsg::Ref<Obj>(3);
}
void fill(Huge& h) { (void)h.b.assign("abc", 3); }
void fill(Num& n) { n.n = 1; }

// Scratch messages for the checks: a pool apart from the harnesses', with
// blocks larger than any input the fuzzers make (-max_len).
using Scratch = lemsg::MessagePool<1024, 4>;
Scratch& scratch() {
  static Scratch pool;
  return pool;
}

bool fd_open(int fd) { return fd >= 0 && ::fcntl(fd, F_GETFD) >= 0; }

// Encodes `v` and compares with `p`, `n` (and says whether an fd went along).
template <typename T>
bool encodes_to(const T& v, const unsigned char* p, std::size_t n, bool& with_fd) {
  Message m;
  FUZZ_CHECK(scratch().create(m) == Result::Ok);
  FUZZ_CHECK(lemsg::detail::encode(m, -1, v) == Result::Ok);
  with_fd = m.has_fd();
  return m.size() == n && (n == 0 || std::memcmp(m.payload(), p, n) == 0);
}

// The model's decode: `p`, `n` with an fd (a fresh one) when `with_fd`.
// Every invariant of one decode is checked here.
template <typename T>
bool decodes(const unsigned char* p, std::size_t n, bool with_fd, T& v) {
  Message m;
  FUZZ_CHECK(scratch().create(m) == Result::Ok);
  if (n > m.capacity()) return false;
  FUZZ_CHECK(m.assign(p, static_cast<std::uint32_t>(n)) == Result::Ok);
  int fd = -1;
  if (with_fd) {
    fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    FUZZ_CHECK(fd >= 0 && m.set_fd(fd) == Result::Ok);
  }
  fill(v);
  const bool ok = lemsg::detail::decode(m, 0, v);
  FUZZ_CHECK(!m.has_fd());  // taken, whatever the outcome
  bool fd_back = false;
  if (ok) {
    check(v);
    FUZZ_CHECK(encodes_to(v, p, n, fd_back));  // canonical: the same bytes again
    FUZZ_CHECK(fd_back == with_fd);
    if (with_fd) FUZZ_CHECK(fd_of(v) == fd);
  } else {
    if (with_fd) FUZZ_CHECK(!fd_open(fd));  // closed with the frame
    static unsigned char empty[1024];
    Message e;
    FUZZ_CHECK(scratch().create(e) == Result::Ok);
    static T fresh{};
    FUZZ_CHECK(lemsg::detail::encode(e, -1, fresh) == Result::Ok);
    std::memcpy(empty, e.payload(), e.size());
    FUZZ_CHECK(encodes_to(v, empty, e.size(), fd_back));  // reset, not half-decoded
    FUZZ_CHECK(!fd_back);
  }
  return ok;
}

template <typename T>
void decode_one(const unsigned char* p, std::size_t n, bool with_fd) {
  static T v;  // static: Huge is 64 KiB
  (void)decodes(p, n, with_fd, v);
  v = T{};
}

// Whether item `index`'s request (or event) decodes from `p`, `n`.
bool item_decodes(std::size_t index, const unsigned char* p, std::size_t n, bool with_fd) {
  switch (index) {
    case 0:
    case 1:
    case 5: {
      static All a;
      const bool ok = decodes(p, n, with_fd, a);
      a = All{};
      return ok;
    }
    case 2: {
      Voids v;
      return decodes(p, n, with_fd, v);
    }
    case 3: {
      MaybeFd m;
      return decodes(p, n, with_fd, m);
    }
    default: {
      Num k;
      return decodes(p, n, with_fd, k);
    }
  }
}

// The section's rules for a frame from a client: true when it is malformed.
bool client_frame_malformed(const unsigned char* p, std::size_t n, bool request, bool with_fd) {
  if (n == 0) return true;
  if (p[0] == 0xFF) {
    if (request || n != 9 || with_fd) return true;
    std::uint64_t bits = 0;
    for (int i = 8; i >= 1; --i) bits = (bits << 8) | p[i];
    return (bits & ~Info::event_bits) != 0;
  }
  if (p[0] >= Info::item_count) return true;
  const lemsg::ItemKind k = kKinds[p[0]];
  if (k == lemsg::ItemKind::Event) return true;
  if (request != (k == lemsg::ItemKind::Method)) return true;
  return !item_decodes(p[0], p + 1, n - 1, with_fd);
}

// ---- the service side ------------------------------------------------------------

struct Reply {
  int calls = 0;
  Result r = Result::Ok;
  unsigned char bytes[1024];
  std::uint32_t size = 0;
  bool fd = false;
};

struct ServiceSide {
  lemsg::Loop loop;
  Pool pool;
  lemsg::RefMap<Obj, 4> objs;  // before the service, which goes first
  Obj obj;
  std::unique_ptr<lemsg::TypedService<Api>> svc_owner{new lemsg::TypedService<Api>(loop, pool)};
  lemsg::TypedService<Api>& svc = *svc_owner;
  std::unique_ptr<lemsg::Session> raw_owner{new lemsg::Session(loop, Info::protocol(), pool)};
  lemsg::Session& raw = *raw_owner;
  lemsg::Ref<Obj> ref;  // made for the raw session at open
  int handled = 0;
  int closes = 0;
  Result reason = Result::Ok;
  int raw_opens = 0;
  int raw_closes = 0;
  int events = 0;  // frames the raw session received
  // The frame on its way, so a handler can compare.
  unsigned char frame[1024];
  std::uint32_t frame_n = 0;
  bool frame_fd = false;

  void start() {
    FUZZ_CHECK(svc.status() == Result::Ok && raw.status() == Result::Ok);
    FUZZ_CHECK(svc.bind_refs<Obj>(objs, nullptr) == Result::Ok);
    svc.service().set_open_handler([this](SessionRef s) { FUZZ_CHECK(svc.make_ref(s, &obj, ref) == Result::Ok); });
    svc.service().set_close_handler([this](SessionRef, Result why) {
      ++closes;
      reason = why;
    });
    svc.set_handler<Echo>([this](lemsg::Responder<Echo>& r, All& a) {
      seen(a);
      const Result res = r.reply(a);
      FUZZ_CHECK(res == Result::Ok || res == Result::Closed || res == Result::Overflow);
    });
    svc.set_handler<Note>([this](const lemsg::Caller&, All& a) { seen(a); });
    svc.set_handler<Count>([this](lemsg::Responder<Count>& r, Voids& v) {
      seen(v);
      (void)r.reply(Num{static_cast<std::uint32_t>(v.v.size())});
    });
    svc.set_handler<PassFd>([this](lemsg::Responder<PassFd>& r, MaybeFd& m) {
      seen(m);
      (void)r.reply(m);
    });
    raw.set_close_handler([this](Result) { ++raw_closes; });
    raw.set_receive_handler([this](Message& m) {
      ++events;
      // An event: [index][event], well-formed.
      const unsigned char* p = static_cast<const unsigned char*>(m.payload());
      FUZZ_CHECK(m.size() >= 1 && p[0] < Info::item_count && kKinds[p[0]] == lemsg::ItemKind::Event);
      FUZZ_CHECK(item_decodes(p[0], p + 1, m.size() - 1, m.has_fd()));
    });
    FUZZ_CHECK(svc.advertise(kName) == Result::Ok);
    open();
  }

  // Every value a handler gets is whole, refs resolve, and it re-encodes
  // to the frame it came in.
  template <typename T>
  void seen(const T& v) {
    ++handled;
    check(v);
    bool fd = false;
    FUZZ_CHECK(frame_n >= 1 && encodes_to(v, frame + 1, frame_n - 1, fd));
    FUZZ_CHECK(fd == frame_fd);
  }

  void open() {
    if (raw.is_open()) return;
    const int before = raw_opens;
    Result got = Result::Closed;
    FUZZ_CHECK(raw.open(kName, [this, &got](Result r) {
      ++raw_opens;
      got = r;
    }) == Result::Ok);
    fuzz::settle(loop, 10);
    FUZZ_CHECK(raw_opens == before + 1 && got == Result::Ok);
  }

  // Sends `p`, `n` and checks what came of it.
  void send(const unsigned char* p, std::uint32_t n, bool request, bool with_fd, bool fix_refs) {
    if (!raw.is_open()) return;
    std::memcpy(frame, p, n);
    frame_n = n;
    frame_fd = with_fd;
    // Points the Ref fields of a well-formed All at the session's object.
    if (fix_refs && n >= 1 && (p[0] == 0 || p[0] == 1)) {
      static All a;
      if (decodes(p + 1, n - 1, with_fd, a)) {
        a.ref = ref;
        a.inner.ref = ref;
        Message m;
        FUZZ_CHECK(scratch().create(m) == Result::Ok);
        FUZZ_CHECK(lemsg::detail::encode(m, p[0], a) == Result::Ok);
        FUZZ_CHECK(m.size() == n);
        std::memcpy(frame, m.payload(), n);
      }
      a = All{};
    }
    const bool malformed = client_frame_malformed(frame, n, request, with_fd);
    bool refs_ok = true;
    if (!malformed && (frame[0] == 0 || frame[0] == 1)) {
      static All a;
      FUZZ_CHECK(decodes(frame + 1, n - 1, with_fd, a));
      refs_ok = svc.object(a.ref) != nullptr && svc.object(a.inner.ref) != nullptr;
      a = All{};
    }
    Message m;
    if (raw.create_message(m) != Result::Ok) return;
    FUZZ_CHECK(m.assign(frame, n) == Result::Ok);
    if (with_fd) FUZZ_CHECK(m.set_fd(::open("/dev/null", O_RDONLY | O_CLOEXEC)) == Result::Ok);
    Reply rep;
    const int handled_before = handled, closes_before = closes, raw_closes_before = raw_closes;
    Result r;
    if (request) {
      r = raw.request(std::move(m), [&rep](Result why, Message& resp) {
        ++rep.calls;
        rep.r = why;
        rep.size = resp ? resp.size() : 0;
        rep.fd = resp && resp.has_fd();
        if (resp) std::memcpy(rep.bytes, resp.payload(), resp.size());
      });
    } else {
      r = raw.send(std::move(m));
    }
    FUZZ_CHECK(r == Result::Ok || r == Result::PendingTableFull || r == Result::Overflow);
    if (r != Result::Ok) return;
    fuzz::settle(loop, 10);
    if (malformed) {
      // That session, and only it, closed with BadFrame; no handler ran.
      FUZZ_CHECK(closes == closes_before + 1 && reason == Result::BadFrame);
      FUZZ_CHECK(raw_closes == raw_closes_before + 1 && !raw.is_open());
      FUZZ_CHECK(handled == handled_before);
      if (request) FUZZ_CHECK(rep.calls == 1 && rep.r == Result::Closed);
      open();
      return;
    }
    FUZZ_CHECK(closes == closes_before && raw.is_open());
    // A subscription runs no handler; an item whose Ref does not resolve neither.
    const bool handler = frame[0] != lemsg::detail::subscribe_index && refs_ok;
    FUZZ_CHECK(handled == handled_before + (handler ? 1 : 0));
    if (!request) return;
    FUZZ_CHECK(rep.calls == 1);
    if (!refs_ok) {
      FUZZ_CHECK(rep.r == Result::BadReference);
    } else if (frame[0] == 0 || frame[0] == 3) {
      // An echo: the response is the request's bytes after the index.
      FUZZ_CHECK(rep.r == Result::Ok && rep.size == n - 1 && std::memcmp(rep.bytes, frame + 1, n - 1) == 0);
      FUZZ_CHECK(rep.fd == with_fd);
    } else {
      FUZZ_CHECK(rep.r == Result::Ok && rep.size == 4);
    }
  }

  void step(fuzz::Input& in) {
    const std::uint8_t op = in.u8();
    if (op & 8) {  // emit an event: bit 7 Big, else Tick
      const int before = events;
      const bool tick = svc.subscriber_count<Tick>() == 1;
      const bool big = svc.subscriber_count<Big>() == 1;
      if (op & 0x80) {
        static All a;
        fill(a);
        FUZZ_CHECK(svc.emit<Big>(a) == Result::Ok);
        a = All{};
        fuzz::settle(loop, 10);
        FUZZ_CHECK(events == before + (big ? 1 : 0));
      } else {
        FUZZ_CHECK(svc.emit<Tick>(Num{in.u32()}) == Result::Ok);
        fuzz::settle(loop, 10);
        FUZZ_CHECK(events == before + (tick ? 1 : 0));
      }
      return;
    }
    // A frame: op bit 0 a request (else one-way), bit 1 with an fd, bit 2
    // the Ref fields made to resolve; a two-byte length (modulo the
    // protocol's maximum + 1), then the bytes.
    std::uint32_t len = in.u8();
    len |= static_cast<std::uint32_t>(in.u8()) << 8;
    len %= Info::max_payload + 1;
    unsigned char buf[1024] = {};
    const std::size_t got = in.bytes(buf, len, sizeof buf);
    send(buf, static_cast<std::uint32_t>(got), op & 1, op & 2, op & 4);
  }
};

// ---- the client side ---------------------------------------------------------------

constexpr int kCalls = 32;

struct ClientSide {
  lemsg::Loop loop;
  Pool pool;
  std::unique_ptr<lemsg::Service> fake_owner{new lemsg::Service(loop, Info::protocol(), pool)};
  lemsg::Service& fake = *fake_owner;
  std::unique_ptr<lemsg::TypedClient<Api>> cl_owner{new lemsg::TypedClient<Api>(loop, pool)};
  lemsg::TypedClient<Api>& cl = *cl_owner;
  SessionRef peer;
  Message held[4];
  int closes = 0;
  Result reason = Result::Ok;
  int ticks = 0, bigs = 0;
  int completed[kCalls] = {};
  Result result[kCalls] = {};
  bool accepted[kCalls] = {};
  int ncalls = 0;
  // What the client is answered with, for the completion to compare.
  unsigned char answer[1024];
  std::uint32_t answer_n = 0;
  bool answer_fd = false;

  void start() {
    FUZZ_CHECK(fake.status() == Result::Ok && cl.status() == Result::Ok);
    fake.set_open_handler([this](SessionRef s) { peer = s; });
    fake.set_receive_handler([this](Message& m) {
      if (!m.needs_response()) return;  // a subscription
      for (Message& h : held)
        if (!h) {
          h = std::move(m);
          return;
        }
    });
    cl.session().set_close_handler([this](Result why) {
      ++closes;
      reason = why;
    });
    FUZZ_CHECK(fake.advertise(kName) == Result::Ok);
    open();
  }

  void open() {
    if (cl.is_open()) return;
    Result got = Result::Closed;
    bool called = false;
    FUZZ_CHECK(cl.open(kName, [&](Result r) {
      called = true;
      got = r;
    }) == Result::Ok);
    fuzz::settle(loop, 10);
    FUZZ_CHECK(called && got == Result::Ok && cl.is_open());
  }

  void call() {
    if (ncalls == kCalls || !cl.is_open()) return;
    const int id = ncalls++;
    static All a;
    fill(a);
    ClientSide* t = this;
    const Result r = cl.call_async<Echo>(a, [t, id](Result why, All& resp) {
      FUZZ_CHECK(t->completed[id]++ == 0);
      t->result[id] = why;
      if (why == Result::Ok) {
        check(resp);
        bool fd = false;
        FUZZ_CHECK(encodes_to(resp, t->answer, t->answer_n, fd));
        FUZZ_CHECK(fd == t->answer_fd);
      }
    });
    a = All{};
    FUZZ_CHECK(r == Result::Ok || r == Result::PendingTableFull || r == Result::Overflow || r == Result::PoolEmpty);
    accepted[id] = r == Result::Ok;
    fuzz::settle(loop, 10);
  }

  int outstanding() const {
    int k = 0;
    for (int i = 0; i < ncalls; ++i) k += accepted[i] && !completed[i];
    return k;
  }

  // Answers a held call with the input's bytes.
  void answer_held(std::uint8_t which, const unsigned char* p, std::uint32_t n, bool with_fd) {
    Message& h = held[which % 4];
    if (!h) return;
    std::memcpy(answer, p, n);
    answer_n = n;
    answer_fd = with_fd;
    static All a;
    const bool ok = decodes(p, n, with_fd, a);
    a = All{};
    const int closes_before = closes;
    int done_before[kCalls];
    std::memcpy(done_before, completed, sizeof done_before);
    const bool was_open = cl.is_open();
    FUZZ_CHECK(h.assign(p, n) == Result::Ok);
    if (with_fd) FUZZ_CHECK(h.set_fd(::open("/dev/null", O_RDONLY | O_CLOEXEC)) == Result::Ok);
    const Result r = fake.respond(std::move(h));
    FUZZ_CHECK(r == Result::Ok || r == Result::Closed || r == Result::Overflow);
    fuzz::settle(loop, 10);
    if (r != Result::Ok || !was_open) return;
    int answered = -1;
    for (int i = 0; i < ncalls; ++i)
      if (completed[i] != done_before[i]) {
        if (answered < 0 && (result[i] == Result::Ok || result[i] == Result::BadFrame)) answered = i;
      }
    FUZZ_CHECK(answered >= 0);
    if (ok) {
      FUZZ_CHECK(result[answered] == Result::Ok && closes == closes_before && cl.is_open());
    } else {
      // Malformed: BadFrame for it, Closed for every other call, the session gone.
      FUZZ_CHECK(result[answered] == Result::BadFrame);
      FUZZ_CHECK(closes == closes_before + 1 && reason == Result::BadFrame && !cl.is_open());
      FUZZ_CHECK(outstanding() == 0);
      for (int i = 0; i < ncalls; ++i)
        if (i != answered && completed[i] != done_before[i]) FUZZ_CHECK(result[i] == Result::Closed);
      for (Message& m : held) m.release();
    }
  }

  // Sends the input's bytes to the client as a one-way frame.
  void tell(const unsigned char* p, std::uint32_t n, bool with_fd) {
    if (!cl.is_open()) return;
    bool malformed = n == 0 || p[0] >= Info::item_count || kKinds[p[0]] != lemsg::ItemKind::Event;
    if (!malformed) malformed = !item_decodes(p[0], p + 1, n - 1, with_fd);
    const bool subscribed = !malformed && (p[0] == 4 ? cl.is_subscribed<Tick>() : cl.is_subscribed<Big>());
    Message m;
    if (fake.create_message(m) != Result::Ok) return;
    FUZZ_CHECK(m.assign(p, n) == Result::Ok);
    if (with_fd) FUZZ_CHECK(m.set_fd(::open("/dev/null", O_RDONLY | O_CLOEXEC)) == Result::Ok);
    const int closes_before = closes, events_before = ticks + bigs;
    const Result r = fake.send(peer, std::move(m));
    FUZZ_CHECK(r == Result::Ok || r == Result::Overflow);
    if (r != Result::Ok) return;
    std::memcpy(answer, p, n);
    answer_n = n;
    answer_fd = with_fd;
    fuzz::settle(loop, 10);
    if (malformed) {
      FUZZ_CHECK(closes == closes_before + 1 && reason == Result::BadFrame && !cl.is_open());
      FUZZ_CHECK(outstanding() == 0);
      FUZZ_CHECK(ticks + bigs == events_before);
      for (Message& h : held) h.release();
    } else {
      FUZZ_CHECK(closes == closes_before && cl.is_open());
      FUZZ_CHECK(ticks + bigs == events_before + (subscribed ? 1 : 0));
    }
  }

  template <typename E, typename T>
  void toggle(int& count) {
    ClientSide* t = this;
    if (cl.is_subscribed<E>()) {
      (void)cl.unsubscribe<E>();
      return;
    }
    (void)cl.subscribe<E>([t, &count](T& v) {
      ++count;
      check(v);
      bool fd = false;
      FUZZ_CHECK(t->answer_n >= 1 && encodes_to(v, t->answer + 1, t->answer_n - 1, fd));
      FUZZ_CHECK(fd == t->answer_fd);
    });
  }

  void step(fuzz::Input& in) {
    // op bits 0-2: what (modulo 6); bit 3: with an fd, or the other event,
    // or close; bits 4-5: which held call.
    const std::uint8_t op = in.u8();
    switch ((op & 7) % 6) {
      case 0: call(); break;
      case 1:
      case 2: {
        std::uint32_t len = in.u8();
        len |= static_cast<std::uint32_t>(in.u8()) << 8;
        len %= Info::max_payload + 1;
        unsigned char buf[1024] = {};
        const std::uint32_t got = static_cast<std::uint32_t>(in.bytes(buf, len, sizeof buf));
        if ((op & 7) % 6 == 1) answer_held(static_cast<std::uint8_t>(op >> 4), buf, got, op & 8);
        else tell(buf, got, op & 8);
        break;
      }
      case 3:
        if (op & 8) toggle<Big, All>(bigs);
        else toggle<Tick, Num>(ticks);
        fuzz::settle(loop, 10);
        break;
      case 4:
        if (op & 8) {
          cl.close();
          for (Message& h : held) h.release();
          fuzz::settle(loop, 10);
          FUZZ_CHECK(outstanding() == 0);
        } else {
          open();
        }
        break;
      case 5:  // a held call answered Unanswered (released)
        held[(op >> 4) % 4].release();
        fuzz::settle(loop, 10);
        break;
    }
  }
};

}  // namespace

LEMSG_FUZZ_TARGET(typed) {
  fuzz::QuietLog quiet;
  fuzz::runtime_dir();
  const int fds_before = fuzz::count_fds();
  fuzz::Input in{data, size};
  const std::uint8_t mode = in.u8();
  if (mode % 4 < 2) {
    // One payload, decoded as one of the types.
    const std::uint8_t how = in.u8();
    const unsigned char* p = data + in.i;
    const std::size_t n = size - in.i;
    const bool with_fd = how & 0x80;
    switch (how % 6) {
      case 0: decode_one<All>(p, n, with_fd); break;
      case 1: decode_one<Voids>(p, n, with_fd); break;
      case 2: decode_one<MaybeFd>(p, n, with_fd); break;
      case 3: decode_one<Huge>(p, n, with_fd); break;
      case 4: decode_one<Inner>(p, n, with_fd); break;
      default: decode_one<Num>(p, n, with_fd); break;
    }
  } else if (mode % 4 == 2) {
    std::unique_ptr<ServiceSide> t(new ServiceSide);
    t->start();
    for (int steps = 0; !in.done() && steps < 64; ++steps) t->step(in);
    t->raw.close();
    fuzz::settle(t->loop, 10);
    FUZZ_CHECK(t->svc.service().session_count() == 0);
    t->raw_owner.reset();
    t->svc_owner.reset();
    FUZZ_CHECK(t->pool.in_use() == 0);
    FUZZ_CHECK(t->objs.size() == 0);  // the session's references went with it
  } else {
    std::unique_ptr<ClientSide> t(new ClientSide);
    t->start();
    for (int steps = 0; !in.done() && steps < 64; ++steps) t->step(in);
    t->cl.close();
    for (Message& h : t->held) h.release();
    fuzz::settle(t->loop, 10);
    FUZZ_CHECK(t->outstanding() == 0);  // every call completed
    for (int i = 0; i < t->ncalls; ++i) FUZZ_CHECK(t->completed[i] == (t->accepted[i] ? 1 : 0));
    t->cl_owner.reset();
    t->fake_owner.reset();
    FUZZ_CHECK(t->pool.in_use() == 0);
  }
  FUZZ_CHECK(scratch().in_use() == 0);
  FUZZ_CHECK(fuzz::count_fds() == fds_before);
  return 0;
}
