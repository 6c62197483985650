// Section 12 (typed): the frames of typed interfaces.
//
// The encoding, byte by byte, is what the section's comment documents, for
// every field type and every frame (request, one-way, subscription,
// response, event). A malformed payload from a client (a count above its
// bound or beyond the frame, a truncated field, trailing bytes, an unknown
// item index, an item sent the wrong way, a bad Optional tag, bool or Fd
// flag, an fd nothing declares, a malformed subscription) closes only that
// client's session with BadFrame, and is logged; no handler sees any part of
// it, and a well-behaved typed client of the same service goes on. The
// mirror: a server that sends a malformed response or event closes the
// TypedClient's session with BadFrame, its pending calls complete, and it
// opens again (by itself when told to reconnect). A declaration that differs in a bound, a field, the order of
// two items or an item's name or kind is refused at open with
// ProtocolMismatch; a renamed field is not.
//
// The peers that send malformed payloads are a plain Session and a plain
// Service speaking the typed protocol id: the typed layer is above the frame
// layer, and they send any payload, with or without an fd, as a request or a
// one-way frame. Malformed frame headers are rogue.cpp's.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"
#include "messaging_util.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace framestest {

enum class Mode : std::uint8_t { Off = 0, On = 1 };
enum class Wide : std::int64_t { Low = -2, High = 0x0102030405060708 };
enum class Bit : std::uint16_t { A = 1, B = 2, Top = 0x8000 };
struct Rec {
  lemsg::String<4> s;
  lemsg::Array<std::uint16_t, 3> a;
  lemsg::Bytes<300> b;  // a two-byte count
  lemsg::Optional<std::uint8_t> o;
  bool flag;
  Mode mode;
};
struct Text {
  lemsg::String<300> t;  // a two-byte count
};
struct Num {
  std::uint32_t n;
};
struct WithFd {
  lemsg::Fd fd;
  std::uint8_t tag;
};

LEMSG_METHOD(Put, Rec, Num);         // 0
LEMSG_ONEWAY(Note, Rec);             // 1
LEMSG_METHOD(Say, Text, Num);        // 2
LEMSG_METHOD(Pass, WithFd, Num);     // 3
LEMSG_METHOD(Get, Num, Rec);         // 4
LEMSG_METHOD(Ping, lemsg::Void, Num);  // 5
LEMSG_EVENT(Tick, Num);              // 6
LEMSG_EVENT(News, Rec);              // 7
struct Api : lemsg::Interface<Put, Note, Say, Pass, Get, Ping, Tick, News> {
  static constexpr const char* name = "lemsg.test.frames";
};
using Info = lemsg::InterfaceInfo<Api>;
using Pool = lemsg::TypedPool<Api, 24>;

// Declarations that differ from v1 in one way each (all named alike, so
// only the hash tells them apart).
struct Inner {
  lemsg::Array<std::uint8_t, 4> x;
};
namespace v1 {
struct Req {
  lemsg::String<8> name;
  std::uint32_t n;
  Inner in;
};
LEMSG_METHOD(A, Req, Num);
LEMSG_METHOD(B, Num, Num);
struct Api : lemsg::Interface<A, B> {
  static constexpr const char* name = "lemsg.test.decl";
};
}  // namespace v1
namespace renamed {  // every field renamed: compatible
struct Req {
  lemsg::String<8> label;
  std::uint32_t count;
  Inner inside;
};
LEMSG_METHOD(A, Req, Num);
LEMSG_METHOD(B, Num, Num);
struct Api : lemsg::Interface<A, B> {
  static constexpr const char* name = "lemsg.test.decl";
};
}  // namespace renamed
namespace bound {  // String<8> -> String<9>
struct Req {
  lemsg::String<9> name;
  std::uint32_t n;
  Inner in;
};
LEMSG_METHOD(A, Req, Num);
LEMSG_METHOD(B, Num, Num);
struct Api : lemsg::Interface<A, B> {
  static constexpr const char* name = "lemsg.test.decl";
};
}  // namespace bound
namespace nested {  // Array<std::uint8_t, 4> -> 5 inside the nested struct
struct In5 {
  lemsg::Array<std::uint8_t, 5> x;
};
struct Req {
  lemsg::String<8> name;
  std::uint32_t n;
  In5 in;
};
LEMSG_METHOD(A, Req, Num);
LEMSG_METHOD(B, Num, Num);
struct Api : lemsg::Interface<A, B> {
  static constexpr const char* name = "lemsg.test.decl";
};
}  // namespace nested
namespace added {  // one field more
struct Req {
  lemsg::String<8> name;
  std::uint32_t n;
  Inner in;
  std::uint8_t extra;
};
LEMSG_METHOD(A, Req, Num);
LEMSG_METHOD(B, Num, Num);
struct Api : lemsg::Interface<A, B> {
  static constexpr const char* name = "lemsg.test.decl";
};
}  // namespace added
namespace reordered {  // two fields swapped
struct Req {
  std::uint32_t n;
  lemsg::String<8> name;
  Inner in;
};
LEMSG_METHOD(A, Req, Num);
LEMSG_METHOD(B, Num, Num);
struct Api : lemsg::Interface<A, B> {
  static constexpr const char* name = "lemsg.test.decl";
};
}  // namespace reordered
namespace swapped {  // the two methods swapped
using v1::A;
using v1::B;
struct Api : lemsg::Interface<B, A> {
  static constexpr const char* name = "lemsg.test.decl";
};
}  // namespace swapped
namespace signedness {  // std::uint32_t -> std::int32_t
struct Req {
  lemsg::String<8> name;
  std::int32_t n;
  Inner in;
};
LEMSG_METHOD(A, Req, Num);
LEMSG_METHOD(B, Num, Num);
struct Api : lemsg::Interface<A, B> {
  static constexpr const char* name = "lemsg.test.decl";
};
}  // namespace signedness
namespace itemname {  // B renamed C
using v1::A;
LEMSG_METHOD(C, Num, Num);
struct Api : lemsg::Interface<A, C> {
  static constexpr const char* name = "lemsg.test.decl";
};
}  // namespace itemname
namespace kind {  // B a one-way item
using v1::A;
struct B : lemsg::OneWay<Num> {
  static constexpr const char* name = "B";
};
struct Api : lemsg::Interface<A, B> {
  static constexpr const char* name = "lemsg.test.decl";
};
}  // namespace kind

}  // namespace framestest

TEST_SUITE("typed_frames") {

using namespace msgtest;
using namespace framestest;
using lemsg::Responder;
using lemsg::TypedClient;
using lemsg::TypedService;

// ---- payloads by hand ----------------------------------------------------------

// A payload built byte by byte (multi-byte values little-endian, as documented).
struct Pay {
  unsigned char b[512] = {};
  std::uint32_t n = 0;
  Pay& u8(unsigned v) {
    b[n++] = static_cast<unsigned char>(v);
    return *this;
  }
  Pay& u16(unsigned v) { return u8(v & 0xff).u8((v >> 8) & 0xff); }
  Pay& u32(std::uint32_t v) { return u16(v & 0xffff).u16(v >> 16); }
  Pay& u64(std::uint64_t v) { return u32(static_cast<std::uint32_t>(v)).u32(static_cast<std::uint32_t>(v >> 32)); }
  Pay& raw(const char* s, std::size_t k) {
    std::memcpy(b + n, s, k);
    n += static_cast<std::uint32_t>(k);
    return *this;
  }
  Pay& fill(std::size_t k, unsigned char c = 'x') {
    std::memset(b + n, c, k);
    n += static_cast<std::uint32_t>(k);
    return *this;
  }
};

// A well-formed Rec: s "ab", a {1, 2}, b "xyz", o 7, flag true, mode On.
Pay& rec(Pay& p) { return p.u8(2).raw("ab", 2).u8(2).u16(1).u16(2).u16(3).raw("xyz", 3).u8(1).u8(7).u8(1).u8(1); }
// An empty Rec up to (not including) the field named: s, a, b, o, flag, mode.
Pay& empty_rec_after_s(Pay& p) { return p.u8(0).u16(0).u8(0).u8(0).u8(0); }

Rec the_rec() {
  Rec r{};
  REQUIRE(r.s.assign("ab") == Result::Ok);
  REQUIRE(r.a.push_back(1) == Result::Ok);
  REQUIRE(r.a.push_back(2) == Result::Ok);
  REQUIRE(r.b.assign("xyz", 3) == Result::Ok);
  r.o = std::uint8_t{7};
  r.flag = true;
  r.mode = Mode::On;
  return r;
}

bool is_the_rec(const Rec& r) {
  return r.s == "ab" && r.a.size() == 2 && r.a[0] == 1 && r.a[1] == 2 && r.b.size() == 3 &&
         std::memcmp(r.b.data(), "xyz", 3) == 0 && r.o.has_value() && *r.o == 7 && r.flag && r.mode == Mode::On;
}

// What a handler may see: every bound kept, strings NUL-terminated, a bool
// that is 0 or 1 in memory. (A half-decoded value would break one of these.)
bool well_formed(const Rec& r) {
  unsigned char flag_byte = 0;
  std::memcpy(&flag_byte, &r.flag, 1);
  return r.s.size() <= 4 && std::strlen(r.s.c_str()) == r.s.size() && r.a.size() <= 3 && r.b.size() <= 300 &&
         flag_byte <= 1;
}

bool same_bytes(const unsigned char* got, std::size_t n, std::initializer_list<int> want) {
  if (n != want.size()) return false;
  std::size_t i = 0;
  for (int w : want)
    if (got[i++] != static_cast<unsigned char>(w)) return false;
  return true;
}

// Encodes `v` as a field (the Codec, as encode() does) and compares.
template <typename T>
bool encodes_as(const T& v, std::initializer_list<int> want) {
  unsigned char buf[64];
  lemsg::detail::Writer w{buf, buf + sizeof buf};
  lemsg::detail::Codec<T>::put(w, v);
  const std::size_t n = static_cast<std::size_t>(w.p - buf);
  INFO("encoded " << n << " bytes, expected " << want.size());
  return w.ok && same_bytes(buf, n, want);
}

// A pipe's read end (the write end closed), to ride with a frame.
int a_pipe_fd() {
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  close(p[1]);
  return p[0];
}

// ---- peers -------------------------------------------------------------------------

// A TypedService<Api> whose handlers count every run and check what they got.
struct FrameServer {
  TypedService<Api> svc;
  int handled = 0;  // handler runs, every item
  int notes = 0;
  Mode last_mode = Mode::Off;
  int opens = 0;
  int closes = 0;
  SessionRef last_open;
  SessionRef last_closed;
  Result last_reason = Result::Ok;

  FrameServer(Loop& loop, lemsg::MessagePoolBase& pool) : svc(loop, pool) {
    REQUIRE(svc.status() == Result::Ok);
    svc.service().set_open_handler([this](SessionRef s) {
      ++opens;
      last_open = s;
    });
    svc.service().set_close_handler([this](SessionRef s, Result why) {
      ++closes;
      last_closed = s;
      last_reason = why;
    });
    svc.set_handler<Put>([this](Responder<Put>& r, Rec& v) {
      ++handled;
      CHECK(well_formed(v));
      last_mode = v.mode;
      CHECK(r.reply(Num{static_cast<std::uint32_t>(v.s.size() + v.a.size() + v.b.size())}) == Result::Ok);
    });
    svc.set_handler<Note>([this](const lemsg::Caller&, Rec& v) {
      ++handled;
      ++notes;
      CHECK(well_formed(v));
    });
    svc.set_handler<Say>([this](Responder<Say>& r, Text& t) {
      ++handled;
      CHECK((t.t.size() <= 300 && std::strlen(t.t.c_str()) == t.t.size()));
      CHECK(r.reply(Num{static_cast<std::uint32_t>(t.t.size())}) == Result::Ok);
    });
    svc.set_handler<Pass>([this](Responder<Pass>& r, WithFd& w) {
      ++handled;
      CHECK(r.reply(Num{w.fd.valid() ? 1u : 0u}) == Result::Ok);
    });
    svc.set_handler<Get>([this](Responder<Get>& r, Num&) {
      ++handled;
      CHECK(r.reply(the_rec()) == Result::Ok);
    });
    svc.set_handler<Ping>([this](Responder<Ping>& r, lemsg::Void&) {
      ++handled;
      CHECK(r.reply(Num{0x01020304}) == Result::Ok);
    });
  }
};

// What a request's completion saw.
struct Reply {
  int calls = 0;
  Result r = Result::Ok;
  unsigned char bytes[512] = {};
  std::uint32_t size = 0;
};

// A plain Session speaking Api's protocol id: it sends whatever it is given.
struct RawClient {
  Session s;
  int opens = 0;
  Result open_result = Result::Ok;
  int closes = 0;
  Result reason = Result::Ok;
  int frames = 0;  // one-way frames received
  unsigned char last[512] = {};
  std::uint32_t last_size = 0;

  RawClient(Loop& loop, lemsg::MessagePoolBase& pool) : s(loop, Info::protocol(), pool) {
    REQUIRE(s.status() == Result::Ok);
    s.set_close_handler([this](Result why) {
      ++closes;
      reason = why;
    });
    s.set_receive_handler([this](Message& m) {
      ++frames;
      last_size = m.size();
      if (m.size() <= sizeof last) std::memcpy(last, m.payload(), m.size());
    });
  }
  bool open(Loop& loop, const char* name) {
    const int before = opens;
    if (s.open(name, [this](Result r) {
          ++opens;
          open_result = r;
        }) != Result::Ok)
      return false;
    return testutil::run_until(loop, [&] { return opens > before; }, kWaitMs) && open_result == Result::Ok;
  }
  // Sends `p` (with `fd`, taken over; -1: none) as a request whose
  // completion fills `rep`, or as a one-way frame.
  Result put(const Pay& p, bool request, int fd, Reply& rep) {
    Message m;
    Result r = s.create_message(m);
    if (r == Result::Ok) r = m.assign(p.b, p.n);
    if (r == Result::Ok && fd >= 0) {
      r = m.set_fd(fd);
      fd = -1;
    }
    if (fd >= 0) close(fd);
    if (r != Result::Ok) return r;
    if (!request) return s.send(std::move(m));
    return s.request(std::move(m), [&rep](Result why, Message& resp) {
      ++rep.calls;
      rep.r = why;
      rep.size = resp ? resp.size() : 0;
      if (resp && resp.size() <= sizeof rep.bytes) std::memcpy(rep.bytes, resp.payload(), resp.size());
    });
  }
};

// A typed client that is expected to keep working.
struct GoodClient {
  TypedClient<Api> c;
  int opens = 0;
  int closes = 0;
  int ticks = 0;
  GoodClient(Loop& loop, lemsg::MessagePoolBase& pool) : c(loop, pool) {
    REQUIRE(c.status() == Result::Ok);
    c.session().set_close_handler([this](Result) { ++closes; });
  }
  bool open(Loop& loop, const char* name) {
    if (c.open(name, [this](Result r) { opens += r == Result::Ok; }) != Result::Ok) return false;
    return testutil::run_until(loop, [&] { return opens == 1; }, kWaitMs);
  }
  // One Put call answered right.
  bool served(Loop& loop) {
    bool done = false;
    Result got = Result::Closed;
    std::uint32_t n = 0;
    if (c.call_async<Put>(the_rec(), [&](Result r, Num& v) {
          done = true;
          got = r;
          n = v.n;
        }) != Result::Ok)
      return false;
    return testutil::run_until(loop, [&] { return done; }, kWaitMs) && got == Result::Ok && n == 2 + 2 + 3;
  }
};

// ---- the encoding, byte by byte --------------------------------------------------

struct Pair {
  std::uint8_t a;
  std::uint32_t b;
};
struct Outer {
  std::uint8_t x;
  Num in;
  lemsg::Void none;
};
struct Thing;  // a server object (Ref's tag)

TEST_CASE("typed frames: each field type encodes as the section documents, little-endian, no padding") {
  // bool: 1 byte, 0 or 1.
  CHECK(encodes_as(true, {1}));
  CHECK(encodes_as(false, {0}));
  // Integers: N/8 bytes, two's complement.
  CHECK(encodes_as(std::int8_t{-2}, {0xfe}));
  CHECK(encodes_as(std::uint8_t{0xab}, {0xab}));
  CHECK(encodes_as(std::int16_t{-2}, {0xfe, 0xff}));
  CHECK(encodes_as(std::uint16_t{0x0102}, {0x02, 0x01}));
  CHECK(encodes_as(std::int32_t{-2}, {0xfe, 0xff, 0xff, 0xff}));
  CHECK(encodes_as(std::uint32_t{0x01020304}, {4, 3, 2, 1}));
  CHECK(encodes_as(std::int64_t{-2}, {0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}));
  CHECK(encodes_as(std::uint64_t{0x0102030405060708}, {8, 7, 6, 5, 4, 3, 2, 1}));
  // float and double: the IEEE-754 bits.
  CHECK(encodes_as(1.0f, {0x00, 0x00, 0x80, 0x3f}));
  CHECK(encodes_as(-2.0, {0, 0, 0, 0, 0, 0, 0x00, 0xc0}));
  // Enums and Flags: the underlying type's size.
  CHECK(encodes_as(Mode::On, {1}));
  CHECK(encodes_as(Wide::Low, {0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}));
  CHECK(encodes_as(Wide::High, {8, 7, 6, 5, 4, 3, 2, 1}));
  CHECK(encodes_as(lemsg::Flags<Bit>(Bit::A) | Bit::Top, {0x01, 0x80}));
  // String: a count (1 byte below 256, 2 below 65536, else 4), the bytes, no NUL.
  CHECK(encodes_as(lemsg::String<4>("ab"), {2, 'a', 'b'}));
  CHECK(encodes_as(lemsg::String<4>(""), {0}));
  CHECK(encodes_as(lemsg::String<255>("ab"), {2, 'a', 'b'}));
  CHECK(encodes_as(lemsg::String<256>("ab"), {2, 0, 'a', 'b'}));
  static lemsg::String<65535> s65535("ab");
  static lemsg::String<65536> s65536("ab");
  CHECK(encodes_as(s65535, {2, 0, 'a', 'b'}));
  CHECK(encodes_as(s65536, {2, 0, 0, 0, 'a', 'b'}));
  // Array: a count, then only the used elements.
  lemsg::Array<std::uint16_t, 3> a;
  REQUIRE(a.push_back(0x0102) == Result::Ok);
  REQUIRE(a.push_back(0x0304) == Result::Ok);
  CHECK(encodes_as(a, {2, 0x02, 0x01, 0x04, 0x03}));
  lemsg::Array<Pair, 300> pairs;
  REQUIRE(pairs.push_back(Pair{9, 0x01020304}) == Result::Ok);
  CHECK(encodes_as(pairs, {1, 0, 9, 4, 3, 2, 1}));
  // Bytes: as an Array of bytes.
  lemsg::Bytes<3> b3;
  REQUIRE(b3.assign("xyz", 3) == Result::Ok);
  CHECK(encodes_as(b3, {3, 'x', 'y', 'z'}));
  lemsg::Bytes<300> b300;
  REQUIRE(b300.assign("xyz", 3) == Result::Ok);
  CHECK(encodes_as(b300, {3, 0, 'x', 'y', 'z'}));
  // Optional: 0 (absent) or 1 then the value.
  lemsg::Optional<std::uint16_t> o;
  CHECK(encodes_as(o, {0}));
  o = std::uint16_t{0x0102};
  CHECK(encodes_as(o, {1, 0x02, 0x01}));
  // Ref: 4 bytes, its value.
  CHECK(encodes_as(lemsg::Ref<Thing>(0x01020304), {4, 3, 2, 1}));
  // Structs: the fields in order, no padding; Void is nothing.
  CHECK(encodes_as(Pair{9, 0x01020304}, {9, 4, 3, 2, 1}));
  CHECK(encodes_as(Outer{7, Num{0x0a0b0c0d}, {}}, {7, 0x0d, 0x0c, 0x0b, 0x0a}));
  CHECK(encodes_as(lemsg::Void{}, {}));
  // Fd: 1 byte, and the descriptor rides with the message.
  Pool pool;
  {
    Message m;
    REQUIRE(pool.create(m) == Result::Ok);
    WithFd w;
    w.tag = 5;
    REQUIRE(lemsg::detail::encode(m, -1, w) == Result::Ok);
    CHECK(same_bytes(static_cast<const unsigned char*>(m.payload()), m.size(), {0, 5}));
    CHECK(!m.has_fd());
    w.fd.reset(a_pipe_fd());
    REQUIRE(lemsg::detail::encode(m, 3, w) == Result::Ok);  // with an item index in front
    CHECK(same_bytes(static_cast<const unsigned char*>(m.payload()), m.size(), {3, 1, 5}));
    CHECK(m.has_fd());
    CHECK(fcntl(w.fd.get(), F_GETFD) >= 0);  // a duplicate went: the sender keeps its own
  }
  CHECK(pool.in_use() == 0);
}

TEST_CASE("typed frames: the largest encodings are what the bounds say, and the protocol's largest payload covers every frame") {
  using lemsg::max_encoded_size;
  CHECK(max_encoded_size<bool>() == 1);
  CHECK(max_encoded_size<double>() == 8);
  CHECK(max_encoded_size<Wide>() == 8);
  CHECK(max_encoded_size<lemsg::Flags<Bit>>() == 2);
  CHECK(max_encoded_size<lemsg::String<255>>() == 1 + 255);
  CHECK(max_encoded_size<lemsg::String<256>>() == 2 + 256);
  CHECK(max_encoded_size<lemsg::String<65535>>() == 2 + 65535);
  CHECK(max_encoded_size<lemsg::String<65536>>() == 4 + 65536);
  CHECK(max_encoded_size<lemsg::Array<Pair, 3>>() == 1 + 3 * 5);
  CHECK(max_encoded_size<lemsg::Bytes<300>>() == 2 + 300);
  CHECK(max_encoded_size<lemsg::Bytes<65536>>() == 4 + 65536);
  CHECK(max_encoded_size<lemsg::Optional<Pair>>() == 1 + 5);
  CHECK(max_encoded_size<lemsg::Fd>() == 1);
  CHECK(max_encoded_size<lemsg::Ref<Thing>>() == 4);
  CHECK(max_encoded_size<lemsg::Void>() == 0);
  const std::size_t rec = (1 + 4) + (1 + 3 * 2) + (2 + 300) + (1 + 1) + 1 + 1;
  CHECK(max_encoded_size<Rec>() == rec);
  // Put's request [index][Rec] is the largest frame; a subscription is 9.
  CHECK(Info::max_payload == 1 + rec);
  CHECK(lemsg::InterfaceInfo<v1::Api>::max_payload == 1 + (1 + 8) + 4 + (1 + 4));
  CHECK(Info::item_count == 8);
  CHECK(Info::event_bits == ((1u << 6) | (1u << 7)));
}

// A plain Service speaking Api's protocol: it records what a TypedClient
// sends and answers with whatever it is given.
struct FakeServer {
  Service svc;
  int opens = 0;
  int closes = 0;
  SessionRef client;
  int frames = 0;      // every frame received
  int subscriptions = 0;
  std::uint64_t bits = 0;  // of the last subscription frame
  unsigned char last[512] = {};
  std::uint32_t last_size = 0;
  bool last_request = false;
  bool hold = false;  // keep the next request unanswered
  Message held;
  Pay answer;          // what a request is answered with
  bool answer_fd = false;

  FakeServer(Loop& loop, lemsg::MessagePoolBase& pool) : svc(loop, Info::protocol(), pool) {
    REQUIRE(svc.status() == Result::Ok);
    svc.set_open_handler([this](SessionRef s) {
      ++opens;
      client = s;
    });
    svc.set_close_handler([this](SessionRef, Result) { ++closes; });
    svc.set_receive_handler([this](Message& m) {
      ++frames;
      last_size = m.size();
      last_request = m.needs_response();
      if (m.size() <= sizeof last) std::memcpy(last, m.payload(), m.size());
      const unsigned char* p = static_cast<const unsigned char*>(m.payload());
      if (m.size() == 9 && p[0] == 0xFF) {
        ++subscriptions;
        bits = 0;
        for (int i = 8; i >= 1; --i) bits = (bits << 8) | p[i];
      }
      if (!m.needs_response()) return;
      if (hold) {
        hold = false;
        held = std::move(m);
        return;
      }
      REQUIRE(m.assign(answer.b, answer.n) == Result::Ok);
      if (answer_fd) REQUIRE(m.set_fd(a_pipe_fd()) == Result::Ok);
      CHECK(svc.respond(std::move(m)) == Result::Ok);
    });
  }
  // Sends `p` to the client as a one-way frame (an event, if well-formed).
  bool tell(const Pay& p, bool with_fd = false) {
    Message m;
    if (svc.create_message(m) != Result::Ok || m.assign(p.b, p.n) != Result::Ok) return false;
    if (with_fd && m.set_fd(a_pipe_fd()) != Result::Ok) return false;
    return svc.send(client, std::move(m)) == Result::Ok;
  }
};

TEST_CASE("typed frames: a client's frames are [index][request], one-way as a message, and a subscription is [0xFF][event bits, 8 bytes LE]") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  FakeServer fake(loop, pool);
  REQUIRE(fake.svc.advertise("frames-capture") == Result::Ok);
  TypedClient<Api> cl(loop, pool);
  REQUIRE(cl.subscribe<News>([](Rec&) {}) == Result::Ok);  // sent at open
  bool opened = false;
  REQUIRE(cl.open("frames-capture", [&](Result r) { opened = r == Result::Ok; }) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return opened && fake.subscriptions == 1; }, kWaitMs));
  CHECK(same_bytes(fake.last, fake.last_size, {0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0}));
  CHECK(!fake.last_request);
  REQUIRE(cl.subscribe<Tick>([](Num&) {}) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return fake.subscriptions == 2; }, kWaitMs));
  CHECK(same_bytes(fake.last, fake.last_size, {0xFF, 0xC0, 0, 0, 0, 0, 0, 0, 0}));
  REQUIRE(cl.unsubscribe<News>() == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return fake.subscriptions == 3; }, kWaitMs));
  CHECK(same_bytes(fake.last, fake.last_size, {0xFF, 0x40, 0, 0, 0, 0, 0, 0, 0}));
  CHECK(fake.bits == (std::uint64_t{1} << Info::index_of<Tick>));

  // A method: a request, index 0, then the Rec.
  fake.answer = Pay{};
  fake.answer.u32(0x01020304);
  bool done = false;
  Num got{};
  REQUIRE(cl.call_async<Put>(the_rec(), [&](Result r, Num& n) {
    done = r == Result::Ok;
    got = n;
  }) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return done; }, kWaitMs));
  CHECK(got.n == 0x01020304);
  CHECK(fake.last_request);
  CHECK(same_bytes(fake.last, fake.last_size,
                   {0, 2, 'a', 'b', 2, 1, 0, 2, 0, 3, 0, 'x', 'y', 'z', 1, 7, 1, 1}));
  // A one-way item: a message, index 1.
  const int frames = fake.frames;
  REQUIRE(cl.send<Note>(Rec{}) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return fake.frames == frames + 1; }, kWaitMs));
  CHECK(!fake.last_request);
  CHECK(same_bytes(fake.last, fake.last_size, {1, 0, 0, 0, 0, 0, 0, 0}));
  // A Void request is the index alone.
  done = false;
  REQUIRE(cl.call_async<Ping>(lemsg::Void{}, [&](Result r, Num&) { done = r == Result::Ok; }) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return done; }, kWaitMs));
  CHECK(same_bytes(fake.last, fake.last_size, {5}));
  cl.close();
  CHECK(testutil::run_until(loop, [&] { return pool.in_use() == 0; }, kWaitMs));
}

TEST_CASE("typed frames: a server's response is the response alone, and an event is [index][event]") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  FrameServer srv(loop, pool);
  REQUIRE(srv.svc.advertise("frames-server") == Result::Ok);
  RawClient raw(loop, pool);
  REQUIRE(raw.open(loop, "frames-server"));
  Reply rep;
  REQUIRE(raw.put(Pay{}.u8(Info::index_of<Ping>), true, -1, rep) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return rep.calls == 1; }, kWaitMs));
  CHECK(rep.r == Result::Ok);
  CHECK(same_bytes(rep.bytes, rep.size, {4, 3, 2, 1}));
  REQUIRE(raw.put(Pay{}.u8(Info::index_of<Get>).u32(0), true, -1, rep) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return rep.calls == 2; }, kWaitMs));
  CHECK(same_bytes(rep.bytes, rep.size, {2, 'a', 'b', 2, 1, 0, 2, 0, 3, 0, 'x', 'y', 'z', 1, 7, 1, 1}));
  // Subscribed by hand to both events.
  REQUIRE(raw.put(Pay{}.u8(0xFF).u64(0xC0), false, -1, rep) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return srv.svc.subscriber_count<News>() == 1; }, kWaitMs));
  CHECK(srv.svc.emit<Tick>(Num{0x0a0b0c0d}) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return raw.frames == 1; }, kWaitMs));
  CHECK(same_bytes(raw.last, raw.last_size, {6, 0x0d, 0x0c, 0x0b, 0x0a}));
  CHECK(srv.svc.emit<News>(Rec{}) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return raw.frames == 2; }, kWaitMs));
  CHECK(same_bytes(raw.last, raw.last_size, {7, 0, 0, 0, 0, 0, 0, 0}));
  CHECK(srv.closes == 0);
  raw.s.close();
  CHECK(testutil::run_until(loop, [&] { return srv.closes == 1 && pool.in_use() == 0; }, kWaitMs));
}

// ---- malformed frames from a client -------------------------------------------------

enum class Send { Request, OneWay };

struct BadRequest {
  const char* what;
  void (*build)(Pay&);
  Send as;
  bool fd;
  const char* logged;  // in the server's warning
};

const BadRequest kBadRequests[] = {
    {"an empty payload", [](Pay&) {}, Send::Request, false, "empty payload"},
    {"an empty one-way payload", [](Pay&) {}, Send::OneWay, false, "empty payload"},
    {"an unknown item index (the item count)", [](Pay& p) { rec(p.u8(8)); }, Send::Request, false,
     "unknown item index"},
    {"item index 0xFE", [](Pay& p) { rec(p.u8(0xFE)); }, Send::OneWay, false, "unknown item index"},
    {"a String count above its bound (5 > 4), its bytes there",
     [](Pay& p) { empty_rec_after_s(p.u8(0).u8(5).raw("abcde", 5)); }, Send::Request, false, "Put"},
    {"a String count of 255 for a String<4>", [](Pay& p) { empty_rec_after_s(p.u8(0).u8(255).fill(255)); },
     Send::Request, false, "Put"},
    {"a String count beyond the frame", [](Pay& p) { p.u8(0).u8(4).raw("ab", 2); }, Send::Request, false, "Put"},
    {"a NUL inside a String", [](Pay& p) { empty_rec_after_s(p.u8(0).u8(3).raw("a\0b", 3)); }, Send::Request,
     false, "Put"},
    {"an Array count above its bound (4 > 3), its elements there",
     [](Pay& p) { p.u8(0).u8(0).u8(4).u16(1).u16(2).u16(3).u16(4).u16(0).u8(0).u8(0).u8(0); }, Send::Request,
     false, "Put"},
    {"an Array count beyond the frame", [](Pay& p) { p.u8(0).u8(0).u8(3).u16(1); }, Send::Request, false, "Put"},
    {"a Bytes count above its bound (two-byte count 301 > 300), its bytes there",
     [](Pay& p) { p.u8(0).u8(0).u8(0).u16(301).fill(301).u8(0).u8(0).u8(0); }, Send::Request, false, "Put"},
    {"a Bytes count beyond the frame", [](Pay& p) { p.u8(0).u8(0).u8(0).u16(300).fill(10); }, Send::Request, false,
     "Put"},
    {"a String<300> count above its bound (two-byte count 301)", [](Pay& p) { p.u8(2).u16(301).fill(301); },
     Send::Request, false, "Say"},
    {"a String<300> count of 0xFFFF", [](Pay& p) { p.u8(2).u16(0xFFFF).fill(100); }, Send::Request, false, "Say"},
    {"half of a two-byte Array element", [](Pay& p) { p.u8(0).u8(0).u8(1).u8(9); }, Send::Request, false, "Put"},
    {"half of a two-byte count", [](Pay& p) { p.u8(2).u8(1); }, Send::Request, false, "Say"},
    {"the last field missing",
     [](Pay& p) {
       rec(p.u8(0));
       --p.n;
     },
     Send::Request, false, "Put"},
    {"the index alone for an item with fields", [](Pay& p) { p.u8(0); }, Send::Request, false, "Put"},
    {"a trailing byte after a whole request", [](Pay& p) { rec(p.u8(0)).u8(0); }, Send::Request, false, "Put"},
    {"a trailing byte after a Void request", [](Pay& p) { p.u8(Info::index_of<Ping>).u8(0); }, Send::Request, false,
     "Ping"},
    {"an Optional tag of 2", [](Pay& p) { p.u8(0).u8(0).u8(0).u16(0).u8(2).u8(7).u8(0).u8(0); }, Send::Request,
     false, "Put"},
    {"an Optional tag of 0xFF", [](Pay& p) { p.u8(0).u8(0).u8(0).u16(0).u8(0xFF).u8(0).u8(0); }, Send::Request,
     false, "Put"},
    {"a bool of 2", [](Pay& p) { p.u8(0).u8(0).u8(0).u16(0).u8(0).u8(2).u8(0); }, Send::Request, false, "Put"},
    {"a one-way item sent as a request", [](Pay& p) { rec(p.u8(1)); }, Send::Request, false,
     "a one-way item sent as a request"},
    {"a method sent as a one-way frame", [](Pay& p) { rec(p.u8(0)); }, Send::OneWay, false,
     "a method sent without a response"},
    {"an event's index sent by a client", [](Pay& p) { p.u8(Info::index_of<Tick>).u32(1); }, Send::OneWay, false,
     "an event sent by a client"},
    {"an event's index sent as a request", [](Pay& p) { rec(p.u8(Info::index_of<News>)); }, Send::Request, false,
     "an event sent by a client"},
    {"a subscription sent as a request", [](Pay& p) { p.u8(0xFF).u64(0x40); }, Send::Request, false,
     "malformed subscription"},
    {"a subscription of 8 bytes", [](Pay& p) { p.u8(0xFF).u32(0x40).u16(0).u8(0); }, Send::OneWay, false,
     "malformed subscription"},
    {"a subscription of 10 bytes", [](Pay& p) { p.u8(0xFF).u64(0x40).u8(0); }, Send::OneWay, false,
     "malformed subscription"},
    {"a subscription of 1 byte", [](Pay& p) { p.u8(0xFF); }, Send::OneWay, false, "malformed subscription"},
    {"a subscription with an fd", [](Pay& p) { p.u8(0xFF).u64(0x40); }, Send::OneWay, true,
     "malformed subscription"},
    {"a subscription to a method's bit", [](Pay& p) { p.u8(0xFF).u64(0x41); }, Send::OneWay, false,
     "not an event"},
    {"a subscription to bit 8 (one past the items)", [](Pay& p) { p.u8(0xFF).u64(0x140); }, Send::OneWay, false,
     "not an event"},
    {"a subscription to bit 63", [](Pay& p) { p.u8(0xFF).u64(std::uint64_t{1} << 63); }, Send::OneWay, false,
     "not an event"},
    {"an Fd flag of 1 without an fd", [](Pay& p) { p.u8(3).u8(1).u8(9); }, Send::Request, false, "Pass"},
    {"an Fd flag of 0 with an fd", [](Pay& p) { p.u8(3).u8(0).u8(9); }, Send::Request, true, "Pass"},
    {"an Fd flag of 2 with an fd", [](Pay& p) { p.u8(3).u8(2).u8(9); }, Send::Request, true, "Pass"},
    {"an Fd with the tag missing", [](Pay& p) { p.u8(3).u8(1); }, Send::Request, true, "Pass"},
    {"an fd with an item that declares none", [](Pay& p) { rec(p.u8(0)); }, Send::Request, true, "Put"},
    {"a one-way item with a String count above its bound",
     [](Pay& p) { empty_rec_after_s(p.u8(1).u8(5).raw("abcde", 5)); }, Send::OneWay, false, "Note"},
    {"a one-way item with a trailing byte", [](Pay& p) { rec(p.u8(1)).u8(1); }, Send::OneWay, false, "Note"},
    {"a one-way item with an fd it does not declare", [](Pay& p) { rec(p.u8(1)); }, Send::OneWay, true, "Note"},
};

// The bench of the malformed-request case: the service, a good client, a
// rogue, and the resources each round must give back.
struct RequestBench {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  FrameServer srv{loop, pool};
  GoodClient good{loop, pool};
  RawClient raw{loop, pool};
  int base_fds = 0;

  bool start() {
    if (srv.svc.advertise("frames-rogue") != Result::Ok || !good.open(loop, "frames-rogue")) return false;
    if (good.c.subscribe<Tick>([this](Num&) { ++good.ticks; }) != Result::Ok) return false;
    if (!testutil::run_until(loop, [&] { return srv.svc.subscriber_count<Tick>() == 1; }, kWaitMs)) return false;
    base_fds = testutil::count_open_fds();
    return good.served(loop);
  }

  // The good client is served, and gets an event.
  bool good_goes_on() {
    const int ticks = good.ticks;
    if (!good.served(loop) || srv.svc.emit<Tick>(Num{1}) != Result::Ok) return false;
    return testutil::run_until(loop, [&] { return good.ticks == ticks + 1; }, kWaitMs) && good.closes == 0;
  }
};

TEST_CASE("typed frames: each malformed request or one-way frame closes only its sender's session with BadFrame; no handler sees it") {
  RequestBench b;
  REQUIRE(b.start());
  for (const BadRequest& bad : kBadRequests) {
    INFO(doctest::String(bad.what));
    const int opens = b.srv.opens;
    const int closes = b.srv.closes;
    if (b.raw.s.is_open()) b.raw.s.close();  // a round that failed: the next one starts afresh
    REQUIRE(b.raw.open(b.loop, "frames-rogue"));
    REQUIRE(b.srv.opens == opens + 1);
    const SessionRef rogue = b.srv.last_open;
    const int handled = b.srv.handled;
    const int raw_closes = b.raw.closes;
    Reply rep;
    {
      LogLines log;
      Pay p;
      bad.build(p);
      REQUIRE(b.raw.put(p, bad.as == Send::Request, bad.fd ? a_pipe_fd() : -1, rep) == Result::Ok);
      // The server closes that session, with BadFrame, and says why.
      CHECK(testutil::run_until(b.loop, [&] { return b.srv.closes == closes + 1; }, kWaitMs));
      CHECK(b.srv.last_closed.value == rogue.value);
      CHECK(b.srv.last_reason == Result::BadFrame);
      CHECK(log.has("bad typed frame", bad.logged));
    }
    CHECK(b.srv.handled == handled);
    // The sender hears of it: its request completes, its session closes.
    CHECK(testutil::run_until(b.loop, [&] { return b.raw.closes == raw_closes + 1; }, kWaitMs));
    CHECK(b.raw.reason == Result::Closed);
    if (bad.as == Send::Request) {
      CHECK(rep.calls == 1);
      CHECK(rep.r == Result::Closed);
    }
    // Only that session: the good client goes on, nothing is left behind.
    CHECK(b.srv.svc.service().session_count() == 1);
    CHECK(b.good_goes_on());
    CHECK(b.srv.handled == handled + 1);
    CHECK(testutil::run_until(b.loop, [&] { return b.pool.in_use() == 0; }, kWaitMs));
    CHECK(testutil::count_open_fds() == b.base_fds);
  }
}

TEST_CASE("typed frames: the well-formed frames of the same session are served, an enum value that names no enumerator included (values are not checked)") {
  RequestBench b;
  REQUIRE(b.start());
  REQUIRE(b.raw.open(b.loop, "frames-rogue"));
  Reply rep;
  const int handled = b.srv.handled;
  REQUIRE(b.raw.put(rec(Pay{}.u8(0)), true, -1, rep) == Result::Ok);
  REQUIRE(testutil::run_until(b.loop, [&] { return rep.calls == 1; }, kWaitMs));
  CHECK(rep.r == Result::Ok);
  CHECK(same_bytes(rep.bytes, rep.size, {7, 0, 0, 0}));
  Pay odd;
  rec(odd.u8(0));
  odd.b[odd.n - 1] = 9;  // mode 9
  REQUIRE(b.raw.put(odd, true, -1, rep) == Result::Ok);
  REQUIRE(testutil::run_until(b.loop, [&] { return rep.calls == 2; }, kWaitMs));
  CHECK(rep.r == Result::Ok);
  CHECK(static_cast<int>(b.srv.last_mode) == 9);
  // Bounds exactly: String 4, Array 3, Bytes 300, String<300> 300.
  Pay full;
  full.u8(0).u8(4).raw("abcd", 4).u8(3).u16(1).u16(2).u16(3).u16(300).fill(300).u8(0).u8(0).u8(0);
  REQUIRE(b.raw.put(full, true, -1, rep) == Result::Ok);
  REQUIRE(testutil::run_until(b.loop, [&] { return rep.calls == 3; }, kWaitMs));
  CHECK(same_bytes(rep.bytes, rep.size, {4 + 3 + 300 - 256, 1, 0, 0}));
  REQUIRE(b.raw.put(Pay{}.u8(2).u16(300).fill(300), true, -1, rep) == Result::Ok);
  REQUIRE(testutil::run_until(b.loop, [&] { return rep.calls == 4; }, kWaitMs));
  CHECK(same_bytes(rep.bytes, rep.size, {300 - 256, 1, 0, 0}));
  // An Fd with its fd; a one-way item; a subscription; then an unsubscription.
  REQUIRE(b.raw.put(Pay{}.u8(3).u8(1).u8(9), true, a_pipe_fd(), rep) == Result::Ok);
  REQUIRE(testutil::run_until(b.loop, [&] { return rep.calls == 5; }, kWaitMs));
  CHECK(same_bytes(rep.bytes, rep.size, {1, 0, 0, 0}));
  const int notes = b.srv.notes;
  REQUIRE(b.raw.put(rec(Pay{}.u8(1)), false, -1, rep) == Result::Ok);
  REQUIRE(testutil::run_until(b.loop, [&] { return b.srv.notes == notes + 1; }, kWaitMs));
  REQUIRE(b.raw.put(Pay{}.u8(0xFF).u64(0xC0), false, -1, rep) == Result::Ok);
  REQUIRE(testutil::run_until(b.loop, [&] { return b.srv.svc.subscriber_count<News>() == 1; }, kWaitMs));
  REQUIRE(b.raw.put(Pay{}.u8(0xFF).u64(0), false, -1, rep) == Result::Ok);
  REQUIRE(testutil::run_until(b.loop, [&] { return b.srv.svc.subscriber_count<News>() == 0; }, kWaitMs));
  CHECK(b.srv.handled == handled + 6);
  CHECK(b.srv.closes == 0);
  CHECK(b.raw.closes == 0);
  CHECK(b.good_goes_on());
}

// ---- malformed frames from a server ------------------------------------------------

enum class From { GetResponse, PutResponse, Event };

struct BadAnswer {
  const char* what;
  void (*build)(Pay&);
  From from;
  bool fd;
};

const BadAnswer kBadAnswers[] = {
    {"a response whose String count is above its bound", [](Pay& p) { empty_rec_after_s(p.u8(5).raw("abcde", 5)); },
     From::GetResponse, false},
    {"a response whose Array count is beyond the frame", [](Pay& p) { p.u8(0).u8(3).u16(1); }, From::GetResponse,
     false},
    {"a response with a bool of 2", [](Pay& p) { p.u8(0).u8(0).u16(0).u8(0).u8(2).u8(0); }, From::GetResponse,
     false},
    {"a response with an Optional tag of 2", [](Pay& p) { p.u8(0).u8(0).u16(0).u8(2).u8(1).u8(0); },
     From::GetResponse, false},
    {"a response with a trailing byte", [](Pay& p) { rec(p).u8(0); }, From::GetResponse, false},
    {"a response one byte short", [](Pay& p) { p.u8(1).u8(2).u8(3); }, From::PutResponse, false},
    {"an empty response", [](Pay&) {}, From::PutResponse, false},
    {"a response with an fd it does not declare", [](Pay& p) { p.u32(1); }, From::PutResponse, true},
    {"an event with an unknown index (the item count)", [](Pay& p) { p.u8(8).u32(1); }, From::Event, false},
    {"a message with index 0xFF", [](Pay& p) { p.u8(0xFF).u64(0x40); }, From::Event, false},
    {"a method's index in a server's message", [](Pay& p) { p.u8(0).u32(1); }, From::Event, false},
    {"an empty message from the server", [](Pay&) {}, From::Event, false},
    {"an event one byte short", [](Pay& p) { p.u8(6).u8(1).u8(2).u8(3); }, From::Event, false},
    {"an event with a trailing byte", [](Pay& p) { p.u8(6).u32(1).u8(0); }, From::Event, false},
    {"an event with an fd it does not declare", [](Pay& p) { p.u8(6).u32(1); }, From::Event, true},
    {"an event not subscribed to, malformed", [](Pay& p) { empty_rec_after_s(p.u8(7).u8(5).raw("abcde", 5)); },
     From::Event, false},
};

TEST_CASE("typed frames: a malformed response or event closes the TypedClient's session with BadFrame, its calls complete, and it opens again") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  FakeServer fake(loop, pool);
  REQUIRE(fake.svc.advertise("frames-fake") == Result::Ok);
  TypedClient<Api> cl(loop, pool);
  int opens = 0, closes = 0, ticks = 0;
  Result reason = Result::Ok;
  cl.session().set_close_handler([&](Result why) {
    ++closes;
    reason = why;
  });
  REQUIRE(cl.subscribe<Tick>([&](Num&) { ++ticks; }) == Result::Ok);
  const int base_fds = testutil::count_open_fds();
  for (const BadAnswer& bad : kBadAnswers) {
    INFO(doctest::String(bad.what));
    // Opens (again), and its subscription is sent again each time.
    const int subs = fake.subscriptions;
    if (cl.is_open()) cl.close();  // a round that failed: the next one starts afresh
    REQUIRE(cl.open("frames-fake", [&](Result r) { opens += r == Result::Ok; }) == Result::Ok);
    const int want = opens + 1;
    REQUIRE(testutil::run_until(loop, [&] { return opens == want && fake.subscriptions == subs + 1; }, kWaitMs));
    CHECK(fake.bits == (std::uint64_t{1} << Info::index_of<Tick>));
    // A call the server keeps: it must complete when the session goes.
    fake.hold = true;
    bool held_done = false;
    Result held_r = Result::Ok;
    REQUIRE(cl.call_async<Ping>(lemsg::Void{}, [&](Result r, Num&) {
      held_done = true;
      held_r = r;
    }) == Result::Ok);
    REQUIRE(testutil::run_until(loop, [&] { return static_cast<bool>(fake.held); }, kWaitMs));
    const int closes_before = closes;
    const int ticks_before = ticks;
    bool bad_done = false;
    Result bad_r = Result::Ok;
    {
      LogLines log;
      fake.answer = Pay{};
      bad.build(fake.answer);
      fake.answer_fd = bad.fd;
      if (bad.from == From::GetResponse) {
        REQUIRE(cl.call_async<Get>(Num{1}, [&](Result r, Rec& v) {
          bad_done = true;
          bad_r = r;
          CHECK(v.s.size() == 0);  // nothing half-decoded
          CHECK(v.a.size() == 0);
        }) == Result::Ok);
      } else if (bad.from == From::PutResponse) {
        REQUIRE(cl.call_async<Put>(the_rec(), [&](Result r, Num& v) {
          bad_done = true;
          bad_r = r;
          CHECK(v.n == 0);
        }) == Result::Ok);
      } else {
        bad_done = true;
        bad_r = Result::BadFrame;
        REQUIRE(fake.tell(fake.answer, bad.fd));
      }
      CHECK(testutil::run_until(loop, [&] { return closes == closes_before + 1; }, kWaitMs));
      CHECK(log.has("server sent a bad typed frame"));
    }
    CHECK(reason == Result::BadFrame);
    CHECK(bad_done);
    CHECK(bad_r == Result::BadFrame);
    CHECK(held_done);
    CHECK(held_r == Result::Closed);
    CHECK(ticks == ticks_before);
    CHECK(!cl.is_open());
    fake.answer_fd = false;
    fake.held.release();
    CHECK(testutil::run_until(loop, [&] { return fake.svc.session_count() == 0 && pool.in_use() == 0; }, kWaitMs));
    CHECK(testutil::count_open_fds() == base_fds);
  }
  // Opens once more and is served: a right response, a right event, and a
  // well-formed event it did not subscribe to is ignored.
  REQUIRE(cl.open("frames-fake", [&](Result r) { opens += r == Result::Ok; }) == Result::Ok);
  const int want = opens + 1;
  REQUIRE(testutil::run_until(loop, [&] { return opens == want && fake.svc.session_count() == 1; }, kWaitMs));
  fake.answer = Pay{};
  rec(fake.answer);
  bool done = false;
  REQUIRE(cl.call_async<Get>(Num{1}, [&](Result r, Rec& v) { done = r == Result::Ok && is_the_rec(v); }) ==
          Result::Ok);
  CHECK(testutil::run_until(loop, [&] { return done; }, kWaitMs));
  REQUIRE(fake.tell(rec(Pay{}.u8(7))));
  REQUIRE(fake.tell(Pay{}.u8(6).u32(5)));
  CHECK(testutil::run_until(loop, [&] { return ticks == 1; }, kWaitMs));
  CHECK(cl.is_open());
  cl.close();
}

TEST_CASE("typed frames: a TypedClient told to reconnect opens again by itself after a malformed event, with its subscriptions") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  FakeServer fake(loop, pool);
  REQUIRE(fake.svc.advertise("frames-again") == Result::Ok);
  TypedClient<Api> cl(loop, pool);
  cl.session().set_reconnect(true, 10, 100);
  int opens = 0, closes = 0, ticks = 0;
  Result reason = Result::Ok;
  cl.session().set_close_handler([&](Result why) {
    ++closes;
    reason = why;
  });
  REQUIRE(cl.subscribe<Tick>([&](Num& n) { ticks += n.n == 5; }) == Result::Ok);
  REQUIRE(cl.open("frames-again", [&](Result r) { opens += r == Result::Ok; }) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return opens == 1 && fake.subscriptions == 1; }, kWaitMs));
  {
    LogLines log;
    REQUIRE(fake.tell(Pay{}.u8(Info::item_count).u32(5)));
    REQUIRE(testutil::run_until(loop, [&] { return closes == 1; }, kWaitMs));
    CHECK(reason == Result::BadFrame);
    CHECK(log.has("server sent a bad typed frame", "unknown item index"));
  }
  // Back by itself, subscribed again, and served.
  REQUIRE(testutil::run_until(loop, [&] { return opens == 2 && fake.subscriptions == 2; }, kWaitMs));
  CHECK(fake.bits == (std::uint64_t{1} << Info::index_of<Tick>));
  REQUIRE(fake.tell(Pay{}.u8(Info::index_of<Tick>).u32(5)));
  CHECK(testutil::run_until(loop, [&] { return ticks == 1; }, kWaitMs));
  CHECK(closes == 1);
  cl.close();
  CHECK(testutil::run_until(loop, [&] { return fake.svc.session_count() == 0 && pool.in_use() == 0; }, kWaitMs));
}

TEST_CASE("typed frames: a synchronous call given a malformed response returns BadFrame with the response reset, and the client opens again") {
  testutil::RuntimeDir dir;
  testutil::Pipe ready;
  // The fake server, in a child: the first Get is answered with a String
  // count above its bound, the next one right.
  const pid_t child = testutil::spawn([&] {
    die_with_parent();
    testutil::LogCapture quiet;
    Loop l;
    Pool p;
    FakeServer fake(l, p);
    CHILD_CHECK(fake.svc.advertise("frames-sync") == Result::Ok);
    ready.put('r');
    empty_rec_after_s(fake.answer.u8(5).raw("abcde", 5));
    CHILD_CHECK(testutil::run_until(l, [&] { return fake.frames == 1; }, kWaitMs));
    fake.answer = Pay{};
    rec(fake.answer);
    CHILD_CHECK(testutil::run_until(l, [&] { return fake.frames == 2 && fake.closes == 2; }, kWaitMs));
    return 0;
  });
  REQUIRE(child > 0);
  REQUIRE(ready.get(kWaitMs) == 'r');
  testutil::LogCapture log;
  Loop loop;
  Pool pool;
  TypedClient<Api> cl(loop, pool);
  int closes = 0;
  Result reason = Result::Ok;
  cl.session().set_close_handler([&](Result why) {
    ++closes;
    reason = why;
  });
  REQUIRE(cl.open_sync("frames-sync", kWaitMs) == Result::Ok);
  Rec got = the_rec();
  CHECK(cl.call<Get>(Num{1}, got, kWaitMs) == Result::BadFrame);
  CHECK(got.s.size() == 0);
  CHECK(got.a.size() == 0);
  CHECK(!got.o.has_value());
  CHECK(!cl.is_open());
  CHECK(testutil::run_until(loop, [&] { return closes == 1; }, kWaitMs));
  CHECK(reason == Result::BadFrame);
  REQUIRE(cl.open_sync("frames-sync", kWaitMs) == Result::Ok);
  CHECK(cl.call<Get>(Num{1}, got, kWaitMs) == Result::Ok);
  CHECK(is_the_rec(got));
  cl.close();
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  CHECK(pool.in_use() == 0);
}

// ---- the declaration at open ----------------------------------------------------------

// Opens a TypedClient<V> to the v1 service `name`; the open's result.
template <typename V>
Result open_as(Loop& loop, lemsg::MessagePoolBase& pool, const char* name) {
  TypedClient<V> c(loop, pool);
  Result got = Result::Busy;
  bool called = false;
  if (c.open(name, [&](Result r) {
        called = true;
        got = r;
      }) != Result::Ok)
    return Result::BadParameter;
  if (!testutil::run_until(loop, [&] { return called; }, kWaitMs)) return Result::Timeout;
  c.close();
  return got;
}

template <typename V>
bool differs_in_hash_only() {
  using A = lemsg::InterfaceInfo<v1::Api>;
  using B = lemsg::InterfaceInfo<V>;
  return A::hash != B::hash && std::strncmp(A::id.text, B::id.text, std::strlen("lemsg.test.decl#")) == 0 &&
         std::strcmp(A::id.text, B::id.text) != 0;
}

TEST_CASE("typed frames: a declaration changed in a bound, a field, the order of fields or items, or an item's name or kind is refused at open with ProtocolMismatch; renamed fields are compatible") {
  testutil::RuntimeDir dir;
  testutil::LogCapture log;  // each refusal is a warning
  Loop loop;
  lemsg::MessagePool<64, 16> pool;
  TypedService<v1::Api> svc(loop, pool);
  REQUIRE(svc.status() == Result::Ok);
  int handled = 0;
  svc.set_handler<v1::A>([&](Responder<v1::A>& r, v1::Req& q) {
    ++handled;
    CHECK(r.reply(Num{q.n + static_cast<std::uint32_t>(q.name.size() + q.in.x.size())}) == Result::Ok);
  });
  REQUIRE(svc.advertise("frames-decl") == Result::Ok);

  CHECK(differs_in_hash_only<bound::Api>());
  CHECK(differs_in_hash_only<nested::Api>());
  CHECK(differs_in_hash_only<added::Api>());
  CHECK(differs_in_hash_only<reordered::Api>());
  CHECK(differs_in_hash_only<swapped::Api>());
  CHECK(differs_in_hash_only<signedness::Api>());
  CHECK(differs_in_hash_only<itemname::Api>());
  CHECK(differs_in_hash_only<kind::Api>());
  CHECK(lemsg::InterfaceInfo<renamed::Api>::hash == lemsg::InterfaceInfo<v1::Api>::hash);

  CHECK(open_as<bound::Api>(loop, pool, "frames-decl") == Result::ProtocolMismatch);
  CHECK(open_as<nested::Api>(loop, pool, "frames-decl") == Result::ProtocolMismatch);
  CHECK(open_as<added::Api>(loop, pool, "frames-decl") == Result::ProtocolMismatch);
  CHECK(open_as<reordered::Api>(loop, pool, "frames-decl") == Result::ProtocolMismatch);
  CHECK(open_as<swapped::Api>(loop, pool, "frames-decl") == Result::ProtocolMismatch);
  CHECK(open_as<signedness::Api>(loop, pool, "frames-decl") == Result::ProtocolMismatch);
  CHECK(open_as<itemname::Api>(loop, pool, "frames-decl") == Result::ProtocolMismatch);
  CHECK(open_as<kind::Api>(loop, pool, "frames-decl") == Result::ProtocolMismatch);
  CHECK(svc.service().session_count() == 0);
  CHECK(handled == 0);

  // Renamed fields: the same protocol, and the values land by position.
  TypedClient<renamed::Api> c(loop, pool);
  bool opened = false;
  REQUIRE(c.open("frames-decl", [&](Result r) { opened = r == Result::Ok; }) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return opened; }, kWaitMs));
  renamed::Req q{};
  REQUIRE(q.label.assign("abc") == Result::Ok);
  q.count = 100;
  REQUIRE(q.inside.x.push_back(1) == Result::Ok);
  bool done = false;
  std::uint32_t n = 0;
  REQUIRE(c.call_async<renamed::A>(q, [&](Result r, Num& v) {
    done = r == Result::Ok;
    n = v.n;
  }) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return done; }, kWaitMs));
  CHECK(n == 104);
  CHECK(handled == 1);
  c.close();
  CHECK(testutil::run_until(loop, [&] { return svc.service().session_count() == 0 && pool.in_use() == 0; }, kWaitMs));
}

}  // TEST_SUITE
