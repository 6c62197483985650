// Section 12 (typed): typed interfaces.
//
// Every field type round-trips at its bounds, through the codec and through
// real calls; bounded containers refuse more than their bound; responders
// answer now, later, with an error, or not at all (Unanswered); an Fd travels
// both ways; events reach subscribed sessions only, stop on unsubscribe,
// follow a client across a server killed with kill -9, and a subscriber that
// does not read is closed without holding up the others; a reference resolves
// only for the session it was made for; a relay forwards calls (deferred
// responders) and events. Malformed frames, the encoded sizes and the
// declaration hash are in typed_frames.cpp; no heap in faults.cpp.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"
#include "testutil.hpp"
#include "messaging_util.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace typedtest {

enum class Color : std::uint8_t { Red = 1, Green = 2, Blue = 4 };
enum class Wide : std::int64_t { Low = std::numeric_limits<std::int64_t>::min(), High = std::numeric_limits<std::int64_t>::max() };
struct Point {
  std::int16_t x;
  std::int16_t y;
};
struct Inner {
  Point p;
  lemsg::Optional<Point> q;
  lemsg::Array<lemsg::String<4>, 2> words;
};
// One field of every kind but Fd and Ref.
struct Everything {
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
  lemsg::Flags<Color> flags;
  lemsg::String<8> s;
  lemsg::Array<Point, 3> pts;
  lemsg::Bytes<300> bytes;
  Inner inner;
  lemsg::Optional<std::uint32_t> opt;
};
struct WithFd {
  lemsg::Fd fd;
  std::uint32_t tag;
};
struct Call;  // the server's object; the client never sees inside it
struct Name {
  lemsg::String<16> text;
};
struct CallRef {
  lemsg::Ref<Call> call;
};
struct Count {
  std::uint32_t n;
};

LEMSG_METHOD(Echo, Everything, Everything);
LEMSG_METHOD(PassFd, WithFd, WithFd);
LEMSG_METHOD(Dial, Name, CallRef);
LEMSG_METHOD(Describe, CallRef, Name);
LEMSG_METHOD(Hold, Count, Count);
LEMSG_ONEWAY(Note, Count);
LEMSG_ONEWAY(Answer, Count);
LEMSG_EVENT(Tick, Count);
LEMSG_EVENT(Alarm, Name);
struct Api : lemsg::Interface<Echo, PassFd, Dial, Describe, Hold, Note, Answer, Tick, Alarm> {
  static constexpr const char* name = "lemsg.test.typed";
};
using Info = lemsg::InterfaceInfo<Api>;
using Pool = lemsg::TypedPool<Api, 24>;

}  // namespace typedtest

// The server's object behind Ref<Call>.
struct typedtest::Call {
  Name name;
  bool released = false;
};

TEST_SUITE("typed") {

using namespace msgtest;
using namespace typedtest;
using lemsg::Responder;
using lemsg::TypedClient;
using lemsg::TypedService;

Everything lowest() {
  Everything e{};
  e.b = false;
  e.i8 = std::numeric_limits<std::int8_t>::min();
  e.u8 = 0;
  e.i16 = std::numeric_limits<std::int16_t>::min();
  e.u16 = 0;
  e.i32 = std::numeric_limits<std::int32_t>::min();
  e.u32 = 0;
  e.i64 = std::numeric_limits<std::int64_t>::min();
  e.u64 = 0;
  e.f = -std::numeric_limits<float>::infinity();
  e.d = -std::numeric_limits<double>::infinity();
  e.c = Color::Red;
  e.w = Wide::Low;
  return e;  // strings and arrays empty, optionals absent
}

Everything highest() {
  Everything e{};
  e.b = true;
  e.i8 = std::numeric_limits<std::int8_t>::max();
  e.u8 = std::numeric_limits<std::uint8_t>::max();
  e.i16 = std::numeric_limits<std::int16_t>::max();
  e.u16 = std::numeric_limits<std::uint16_t>::max();
  e.i32 = std::numeric_limits<std::int32_t>::max();
  e.u32 = std::numeric_limits<std::uint32_t>::max();
  e.i64 = std::numeric_limits<std::int64_t>::max();
  e.u64 = std::numeric_limits<std::uint64_t>::max();
  e.f = std::numeric_limits<float>::infinity();
  e.d = std::numeric_limits<double>::quiet_NaN();
  e.c = Color::Blue;
  e.w = Wide::High;
  e.flags = lemsg::Flags<Color>(Color::Red) | Color::Blue;
  REQUIRE(e.s.assign("12345678") == lemsg::Result::Ok);
  for (int i = 0; i < 3; ++i) REQUIRE(e.pts.push_back(Point{static_cast<std::int16_t>(-i), static_cast<std::int16_t>(i * 1000)}) == lemsg::Result::Ok);
  unsigned char raw[300];
  for (int i = 0; i < 300; ++i) raw[i] = static_cast<unsigned char>(i * 7);
  REQUIRE(e.bytes.assign(raw, sizeof raw) == lemsg::Result::Ok);
  e.inner.p = Point{-32768, 32767};
  e.inner.q.emplace() = Point{7, -7};
  REQUIRE(e.inner.words.push_back(lemsg::String<4>("abcd")) == lemsg::Result::Ok);
  REQUIRE(e.inner.words.push_back(lemsg::String<4>("")) == lemsg::Result::Ok);
  e.opt = 0xdeadbeefu;
  return e;
}

// Bit-exact comparison of floats (NaN equals NaN of the same bits).
template <typename F>
bool same_bits(F a, F b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

bool same(const Point& a, const Point& b) { return a.x == b.x && a.y == b.y; }

bool same(const Everything& a, const Everything& b) {
  bool ok = a.b == b.b && a.i8 == b.i8 && a.u8 == b.u8 && a.i16 == b.i16 && a.u16 == b.u16 && a.i32 == b.i32 &&
            a.u32 == b.u32 && a.i64 == b.i64 && a.u64 == b.u64 && same_bits(a.f, b.f) && same_bits(a.d, b.d) &&
            a.c == b.c && a.w == b.w && a.flags == b.flags && a.s == b.s && a.s.c_str()[a.s.size()] == 0 &&
            a.pts.size() == b.pts.size() && a.bytes.size() == b.bytes.size() &&
            std::memcmp(a.bytes.data(), b.bytes.data(), a.bytes.size()) == 0 && same(a.inner.p, b.inner.p) &&
            a.inner.q.has_value() == b.inner.q.has_value() && a.inner.words.size() == b.inner.words.size() &&
            a.opt.has_value() == b.opt.has_value();
  for (std::size_t i = 0; ok && i < a.pts.size(); ++i) ok = same(a.pts[i], b.pts[i]);
  for (std::size_t i = 0; ok && i < a.inner.words.size(); ++i) ok = a.inner.words[i] == b.inner.words[i];
  if (ok && a.inner.q) ok = same(*a.inner.q, *b.inner.q);
  if (ok && a.opt) ok = *a.opt == *b.opt;
  return ok;
}

// Encodes `in` into a message of `pool` and decodes it into `out`.
template <typename T>
bool round_trip(lemsg::MessagePoolBase& pool, const T& in, T& out) {
  Message m;
  if (pool.create(m) != Result::Ok) return false;
  if (lemsg::detail::encode(m, -1, in) != Result::Ok) return false;
  return lemsg::detail::decode(m, 0, out);
}

// A TypedService<Api> and what its handlers saw.
struct Server {
  Loop& loop;
  TypedService<Api> svc;
  lemsg::RefMap<Call, 4> calls;
  Call call_store[4];
  int notes = 0;
  std::uint32_t last_note = 0;
  int opens = 0;
  int closes = 0;
  Result last_close = Result::Ok;
  int released = 0;
  Responder<Hold> held[4];
  std::size_t held_count = 0;

  Server(Loop& l, lemsg::MessagePoolBase& pool) : loop(l), svc(l, pool) {
    REQUIRE(svc.status() == Result::Ok);
    svc.service().set_open_handler([this](SessionRef) { ++opens; });
    svc.service().set_close_handler([this](SessionRef, Result why) {
      ++closes;
      last_close = why;
    });
    svc.set_handler<Echo>([](Responder<Echo>& r, Everything& e) { CHECK(r.reply(e) == Result::Ok); });
    svc.set_handler<PassFd>([](Responder<PassFd>& r, WithFd& in) {
      // Answer with a pipe whose read end says how many bytes the fd that
      // came held ("<n>").
      char buf[16] = {};
      const ssize_t n = in.fd.valid() ? read(in.fd.get(), buf, sizeof buf) : -1;
      int p[2];
      REQUIRE(pipe(p) == 0);
      char say = static_cast<char>('0' + (n < 0 ? 0 : n));
      REQUIRE(write(p[1], &say, 1) == 1);
      close(p[1]);
      WithFd out;
      out.fd.reset(p[0]);
      out.tag = in.tag + 1;
      CHECK(r.reply(out) == Result::Ok);
    });
    REQUIRE(svc.bind_refs<Call>(calls, [this](void* obj, std::uint32_t) {
      static_cast<Call*>(obj)->released = true;
      ++released;
    }) == Result::Ok);
    svc.set_handler<Dial>([this](Responder<Dial>& r, Name& n) {
      Call* c = nullptr;
      for (Call& slot : call_store)
        if (!slot.name.text.size()) {
          c = &slot;
          break;
        }
      if (!c) {
        CHECK(r.fail(Result::NoMemory) == Result::Ok);
        return;
      }
      c->name = n;
      c->released = false;
      CallRef out;
      const Result made = svc.make_ref(r.session(), c, out.call);
      if (made != Result::Ok) {
        CHECK(r.fail(made) == Result::Ok);
        return;
      }
      CHECK(r.reply(out) == Result::Ok);
    });
    svc.set_handler<Describe>([this](Responder<Describe>& r, CallRef& ref) {
      Call* c = svc.object(ref.call);
      REQUIRE(c != nullptr);  // resolved before the handler runs
      CHECK(r.reply(c->name) == Result::Ok);
    });
    svc.set_handler<Hold>([this](Responder<Hold>& r, Count&) {
      if (held_count < 4) held[held_count++] = std::move(r);
    });
    svc.set_handler<Note>([this](const lemsg::Caller&, Count& c) {
      ++notes;
      last_note = c.n;
    });
    svc.set_handler<Answer>([this](const lemsg::Caller&, Count& c) {
      for (std::size_t i = 0; i < held_count; ++i)
        if (held[i]) {
          if (c.n == 0) held[i] = Responder<Hold>{};  // dropped unanswered
          else CHECK(held[i].reply(Count{c.n}) == Result::Ok);
          return;
        }
    });
  }
};

// An async TypedClient<Api> and what its handlers saw.
struct Client {
  TypedClient<Api> c;
  int opened = 0;
  int closes = 0;
  Result last_close = Result::Ok;
  int ticks = 0;
  std::uint32_t last_tick = 0;
  int alarms = 0;
  Client(Loop& loop, lemsg::MessagePoolBase& pool) : c(loop, pool) {
    REQUIRE(c.status() == Result::Ok);
    c.session().set_close_handler([this](Result why) {
      ++closes;
      last_close = why;
    });
  }
  bool open(Loop& loop, const char* name) {
    if (c.open(name, [this](Result r) { opened += r == Result::Ok; }) != Result::Ok) return false;
    const int before = opened;
    return testutil::run_until(loop, [&] { return opened > before; }, kWaitMs);
  }
  bool subscribe_ticks() {
    return c.subscribe<Tick>([this](Count& n) {
      ++ticks;
      last_tick = n.n;
    }) == Result::Ok;
  }
};

// The outcome of an async call.
template <typename M>
struct Outcome {
  bool done = false;
  Result r = Result::Ok;
  typename M::Response resp{};
};

template <typename M>
bool call_and_wait(Loop& loop, TypedClient<Api>& c, const typename M::Request& req, Outcome<M>& out) {
  out.done = false;
  const Result sent = c.call_async<M>(req, [&out](Result r, typename M::Response& resp) {
    out.done = true;
    out.r = r;
    out.resp = std::move(resp);
  });
  if (sent != Result::Ok) {
    out.done = true;
    out.r = sent;
    return true;
  }
  return testutil::run_until(loop, [&] { return out.done; }, kWaitMs);
}

// ---- declaration and codec ------------------------------------------------------

TEST_CASE("typed: the protocol id is the interface name and the declaration's hash, and the largest payload is computed") {
  const char* id = Info::id.text;
  CHECK(std::strncmp(id, "lemsg.test.typed#", 17) == 0);
  CHECK(std::strlen(id) == 17 + 16);
  // The largest frame is Echo's request: index + Everything at its bounds.
  const std::size_t everything = 1 + 1 + 1 + 2 + 2 + 4 + 4 + 8 + 8 + 4 + 8 + 1 + 8 + 1 + (1 + 8) + (1 + 3 * 4) +
                                 (2 + 300) + (4 + (1 + 4) + (1 + 2 * (1 + 4))) + (1 + 4);
  CHECK(lemsg::max_encoded_size<Everything>() == everything);
  CHECK(Info::max_payload == 1 + everything);
  CHECK(Info::item_count == 9);
  CHECK(Info::event_bits == ((1u << 7) | (1u << 8)));
  CHECK(Info::index_of<Echo> == 0);
  CHECK(Info::index_of<Alarm> == 8);
}

TEST_CASE("typed: every field type round-trips at its bounds through the codec") {
  Pool pool;
  Everything out;
  const Everything lo = lowest();
  REQUIRE(round_trip(pool, lo, out));
  CHECK(same(lo, out));
  CHECK(out.s.size() == 0);
  CHECK(out.s.c_str()[0] == 0);
  CHECK(!out.opt.has_value());
  CHECK(!out.inner.q.has_value());
  const Everything hi = highest();
  REQUIRE(round_trip(pool, hi, out));
  CHECK(same(hi, out));
  CHECK(std::isnan(out.d));
  CHECK(std::isinf(out.f));
  CHECK(out.s == "12345678");
  CHECK(out.bytes.size() == 300);
  CHECK(out.flags.has(Color::Red));
  CHECK(!out.flags.has(Color::Green));
  // A negative NaN and negative zero keep their bits.
  Everything odd = lowest();
  odd.f = -0.0f;
  odd.d = -std::numeric_limits<double>::quiet_NaN();
  REQUIRE(round_trip(pool, odd, out));
  CHECK(same(odd, out));
  CHECK(pool.in_use() == 0);
}

TEST_CASE("typed: a String, Array or Bytes refuses more than its bound with BoundExceeded and stays as it was") {
  lemsg::String<3> s;
  CHECK(s.assign("abc") == Result::Ok);
  CHECK(s.assign("abcd") == Result::BoundExceeded);
  CHECK(s == "abc");
  CHECK(s.assign(nullptr) == Result::BadParameter);
  CHECK(s.assign("a\0b", 3) == Result::BadParameter);  // a NUL inside could not travel
  CHECK(s == "abc");
  lemsg::Array<Point, 2> a;
  CHECK(a.push_back(Point{1, 1}) == Result::Ok);
  CHECK(a.push_back(Point{2, 2}) == Result::Ok);
  CHECK(a.push_back(Point{3, 3}) == Result::BoundExceeded);
  CHECK(a.size() == 2);
  CHECK(a.resize(3) == Result::BoundExceeded);
  CHECK(a[1].x == 2);
  lemsg::Bytes<4> b;
  const unsigned char five[5] = {1, 2, 3, 4, 5};
  CHECK(b.assign(five, 4) == Result::Ok);
  CHECK(b.assign(five, 5) == Result::BoundExceeded);
  CHECK(b.size() == 4);
  CHECK(b[3] == 4);
}

// ---- calls ---------------------------------------------------------------------

TEST_CASE("typed: a call carries every field type at its bounds both ways") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("typed-echo") == Result::Ok);
  Client cl(loop, pool);
  REQUIRE(cl.open(loop, "typed-echo"));
  for (const Everything& in : {lowest(), highest()}) {
    Outcome<Echo> out;
    REQUIRE(call_and_wait<Echo>(loop, cl.c, in, out));
    CHECK(out.r == Result::Ok);
    CHECK(same(in, out.resp));
  }
  // The same through a synchronous call from another process.
  const pid_t child = testutil::spawn([&] {
    die_with_parent();
    Loop l;
    Pool p;
    TypedClient<Api> c(l, p);
    CHILD_CHECK(c.open_sync("typed-echo", kWaitMs) == Result::Ok);
    const Everything hi = highest();
    Everything back;
    CHILD_CHECK(c.call<Echo>(hi, back, kWaitMs) == Result::Ok);
    CHILD_CHECK(same(hi, back));
    CHILD_CHECK(p.in_use() == 0);
    return 0;
  });
  CHECK(run_until_exit(loop, child, kWaitMs) == 0);
  CHECK(pool.in_use() == 0);
}

TEST_CASE("typed: an Fd field travels both ways, and the sender keeps its own descriptor") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("typed-fd") == Result::Ok);
  Client cl(loop, pool);
  REQUIRE(cl.open(loop, "typed-fd"));
  const int fds_before = testutil::count_open_fds();
  {
    int p[2];
    REQUIRE(pipe(p) == 0);
    REQUIRE(write(p[1], "abc", 3) == 3);
    close(p[1]);
    WithFd req;
    req.fd.reset(p[0]);
    req.tag = 41;
    Outcome<PassFd> out;
    REQUIRE(call_and_wait<PassFd>(loop, cl.c, req, out));
    REQUIRE(out.r == Result::Ok);
    CHECK(out.resp.tag == 42);
    REQUIRE(out.resp.fd.valid());
    char say = 0;
    CHECK(read(out.resp.fd.get(), &say, 1) == 1);
    CHECK(say == '3');
    CHECK(fcntl(req.fd.get(), F_GETFD) >= 0);  // still the caller's
    // No Fd: the flag says none, and none arrives.
    WithFd none;
    none.tag = 1;
    REQUIRE(call_and_wait<PassFd>(loop, cl.c, none, out));
    CHECK(out.r == Result::Ok);
    CHECK(out.resp.tag == 2);
  }
  CHECK(testutil::count_open_fds() == fds_before);
  CHECK(pool.in_use() == 0);
}

TEST_CASE("typed: a kept Responder answers later, one dropped unanswered completes with Unanswered, and fail() sends a code") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("typed-hold") == Result::Ok);
  Client cl(loop, pool);
  REQUIRE(cl.open(loop, "typed-hold"));

  Outcome<Hold> first, second;
  REQUIRE(cl.c.call_async<Hold>(Count{1}, [&](Result r, Count& c) {
    first.done = true;
    first.r = r;
    first.resp = c;
  }) == Result::Ok);
  REQUIRE(cl.c.call_async<Hold>(Count{2}, [&](Result r, Count& c) {
    second.done = true;
    second.r = r;
    second.resp = c;
  }) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return srv.held_count == 2; }, kWaitMs));
  CHECK(!first.done);
  CHECK(static_cast<bool>(srv.held[0]));
  CHECK(cl.c.send<Answer>(Count{77}) == Result::Ok);  // answers the first
  REQUIRE(testutil::run_until(loop, [&] { return first.done; }, kWaitMs));
  CHECK(first.r == Result::Ok);
  CHECK(first.resp.n == 77);
  CHECK(!srv.held[0]);
  CHECK(srv.held[0].reply(Count{1}) == Result::BadParameter);  // answered already
  CHECK(srv.held[0].fail(Result::NotPermitted) == Result::BadParameter);
  CHECK(cl.c.send<Answer>(Count{0}) == Result::Ok);  // drops the second
  REQUIRE(testutil::run_until(loop, [&] { return second.done; }, kWaitMs));
  CHECK(second.r == Result::Unanswered);

  // fail(): the client's call completes with the code.
  srv.svc.set_handler<Hold>([](Responder<Hold>& r, Count&) {
    CHECK(r.fail(Result::Ok) == Result::BadParameter);
    lemsg::Credentials c;
    CHECK(r.credentials(c) == Result::Ok);
    CHECK(c.pid == getpid());
    CHECK(r.fail(Result::NotPermitted) == Result::Ok);
  });
  Outcome<Hold> third;
  REQUIRE(call_and_wait<Hold>(loop, cl.c, Count{3}, third));
  CHECK(third.r == Result::NotPermitted);
  CHECK(srv.closes == 0);
  CHECK(pool.in_use() == 0);
}

TEST_CASE("typed: a Responder kept after its TypedService is gone answers Closed; a method without a handler completes with Unanswered") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  Responder<Hold> kept;
  Client cl(loop, pool);
  Outcome<Hold> held;  // outlives the service: its call completes when the session closes
  {
    TypedService<Api> svc(loop, pool);
    svc.set_handler<Hold>([&](Responder<Hold>& r, Count&) { kept = std::move(r); });
    REQUIRE(svc.advertise("typed-gone") == Result::Ok);
    REQUIRE(cl.open(loop, "typed-gone"));
    Outcome<Echo> no_handler;
    REQUIRE(call_and_wait<Echo>(loop, cl.c, lowest(), no_handler));
    CHECK(no_handler.r == Result::Unanswered);
    CHECK(cl.c.send<Note>(Count{5}) == Result::Ok);  // dropped: no handler
    REQUIRE(cl.c.call_async<Hold>(Count{1}, [&](Result r, Count&) {
      held.done = true;
      held.r = r;
    }) == Result::Ok);
    REQUIRE(testutil::run_until(loop, [&] { return static_cast<bool>(kept); }, kWaitMs));
    CHECK(!held.done);
  }
  CHECK(kept.reply(Count{1}) == Result::Closed);
  CHECK(!kept);
  REQUIRE(testutil::run_until(loop, [&] { return cl.closes == 1; }, kWaitMs));
  CHECK(held.done);
  CHECK(held.r == Result::Closed);
  CHECK(pool.in_use() == 0);
}

// ---- events --------------------------------------------------------------------

TEST_CASE("typed: events reach only subscribed sessions, stop after unsubscribe, and go with the session") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("typed-events") == Result::Ok);
  Client a(loop, pool), b(loop, pool);
  REQUIRE(a.subscribe_ticks());  // before the open: sent when it opens
  CHECK(a.c.is_subscribed<Tick>());
  REQUIRE(a.open(loop, "typed-events"));
  REQUIRE(b.open(loop, "typed-events"));
  REQUIRE(testutil::run_until(loop, [&] { return srv.svc.subscriber_count<Tick>() == 1; }, kWaitMs));
  CHECK(srv.svc.emit<Tick>(Count{1}) == Result::Ok);
  CHECK(srv.svc.emit<Alarm>(Name{"nobody"}) == Result::Ok);  // no subscriber: nothing sent
  REQUIRE(testutil::run_until(loop, [&] { return a.ticks == 1; }, kWaitMs));
  CHECK(a.last_tick == 1);
  REQUIRE(b.subscribe_ticks());  // while open
  REQUIRE(b.c.subscribe<Alarm>([&](Name& n) { b.alarms += n.text == "fire"; }) == Result::Ok);
  // Two frames: the server may take them in two turns of its loop.
  REQUIRE(testutil::run_until(
      loop, [&] { return srv.svc.subscriber_count<Tick>() == 2 && srv.svc.subscriber_count<Alarm>() == 1; },
      kWaitMs));
  CHECK(srv.svc.emit<Tick>(Count{2}) == Result::Ok);
  CHECK(srv.svc.emit<Alarm>(Name{"fire"}) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return a.ticks == 2 && b.ticks == 1 && b.alarms == 1; }, kWaitMs));
  CHECK(a.alarms == 0);
  REQUIRE(a.c.unsubscribe<Tick>() == Result::Ok);
  CHECK(!a.c.is_subscribed<Tick>());
  REQUIRE(testutil::run_until(loop, [&] { return srv.svc.subscriber_count<Tick>() == 1; }, kWaitMs));
  CHECK(srv.svc.emit<Tick>(Count{3}) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return b.ticks == 2; }, kWaitMs));
  (void)loop.run_once(20);
  CHECK(a.ticks == 2);
  // Subscriptions are the session's: closing it removes them.
  b.c.close();
  REQUIRE(testutil::run_until(loop, [&] { return srv.closes == 1; }, kWaitMs));
  CHECK(srv.svc.subscriber_count<Tick>() == 0);
  CHECK(srv.svc.subscriber_count<Alarm>() == 0);
  CHECK(pool.in_use() == 0);
}

TEST_CASE("typed: a client subscribed before a server is killed with kill -9 gets events from the next server without code of its own") {
  testutil::RuntimeDir dir;
  // Each server emits Tick{generation * 1000 + i} every 10 ms to whoever subscribed.
  auto server = [](std::uint32_t generation, testutil::Pipe& ready) {
    return testutil::spawn([generation, &ready] {
      die_with_parent();
      Loop l;
      Pool p;
      TypedService<Api> svc(l, p);
      CHILD_CHECK(svc.advertise("typed-restart") == Result::Ok);
      ready.put('r');
      std::uint32_t i = 0;
      lemsg::TimerId t;
      CHILD_CHECK(l.add_timer([&] { (void)svc.emit<Tick>(Count{generation * 1000 + i++}); }, t) == Result::Ok);
      CHILD_CHECK(l.arm_timer(t, 10, 10) == Result::Ok);
      (void)l.run();
      return 0;
    });
  };
  testutil::Pipe ready1, ready2;
  pid_t first = server(1, ready1);
  REQUIRE(first > 0);
  REQUIRE(ready1.get(kWaitMs) == 'r');
  Loop loop;
  Pool pool;
  Client cl(loop, pool);
  cl.c.session().set_reconnect(true, 10, 100);
  REQUIRE(cl.subscribe_ticks());
  REQUIRE(cl.open(loop, "typed-restart"));
  REQUIRE(testutil::run_until(loop, [&] { return cl.ticks >= 3; }, kWaitMs));
  CHECK(cl.last_tick / 1000 == 1);
  testutil::kill9(first);
  REQUIRE(testutil::run_until(loop, [&] { return cl.closes == 1; }, kWaitMs));
  const pid_t second = server(2, ready2);
  REQUIRE(second > 0);
  REQUIRE(testutil::run_until(loop, [&] { return cl.last_tick / 1000 == 2; }, kWaitMs));
  CHECK(cl.opened == 2);
  testutil::kill9(second);
}

TEST_CASE("typed: a subscriber that does not read has its own session closed with Overflow, and the others get every event") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("typed-slow") == Result::Ok);
  testutil::Pipe subscribed, done;
  const pid_t sleeper = testutil::spawn([&] {
    die_with_parent();
    Loop l;
    Pool p;
    TypedClient<Api> c(l, p);
    CHILD_CHECK(c.subscribe<Alarm>([](Name&) {}) == Result::Ok);
    CHILD_CHECK(c.open_sync("typed-slow", kWaitMs) == Result::Ok);
    subscribed.put('s');
    (void)done.get(kWaitMs * 2);  // reads nothing meanwhile
    return 0;
  });
  REQUIRE(sleeper > 0);
  REQUIRE(testutil::run_until(loop, [&] { return srv.svc.subscriber_count<Alarm>() == 1; }, kWaitMs));
  REQUIRE(subscribed.get(kWaitMs) == 's');
  Pool good_pool;  // the server's own pool holds the frames queued for the sleeper
  Client good(loop, good_pool);
  REQUIRE(good.c.subscribe<Alarm>([&](Name&) { ++good.alarms; }) == Result::Ok);
  REQUIRE(good.open(loop, "typed-slow"));
  REQUIRE(testutil::run_until(loop, [&] { return srv.svc.subscriber_count<Alarm>() == 2; }, kWaitMs));
  Name big;
  char text[17];
  std::memset(text, 'x', 16);
  text[16] = 0;
  REQUIRE(big.text.assign(text) == Result::Ok);
  int sent = 0;
  for (; sent < 20000 && srv.closes == 0; ++sent) {
    (void)srv.svc.emit<Alarm>(big);
    const int want = sent + 1;
    REQUIRE(testutil::run_until(loop, [&] { return good.alarms == want; }, kWaitMs));
  }
  CHECK(srv.closes == 1);
  CHECK(srv.last_close == Result::Overflow);
  CHECK(good.alarms == sent);
  CHECK(good.closes == 0);
  CHECK(srv.svc.subscriber_count<Alarm>() == 1);
  done.put('d');
  CHECK(run_until_exit(loop, sleeper, kWaitMs) == 0);
}

// ---- references -------------------------------------------------------------------

TEST_CASE("typed: a reference resolves only for the session it was made for; another session's, a stale or a forged one is refused") {
  testutil::RuntimeDir dir;
  Loop loop;
  Pool pool;
  Server srv(loop, pool);
  REQUIRE(srv.svc.advertise("typed-refs") == Result::Ok);
  Client a(loop, pool), b(loop, pool);
  REQUIRE(a.open(loop, "typed-refs"));
  REQUIRE(b.open(loop, "typed-refs"));
  Outcome<Dial> dialled;
  REQUIRE(call_and_wait<Dial>(loop, a.c, Name{"alice"}, dialled));
  REQUIRE(dialled.r == Result::Ok);
  const lemsg::Ref<Call> ref = dialled.resp.call;
  CHECK(static_cast<bool>(ref));
  Outcome<Describe> told;
  REQUIRE(call_and_wait<Describe>(loop, a.c, CallRef{ref}, told));
  CHECK(told.r == Result::Ok);
  CHECK(told.resp.text == "alice");
  // Session b holds the same value: refused before the handler runs.
  REQUIRE(call_and_wait<Describe>(loop, b.c, CallRef{ref}, told));
  CHECK(told.r == Result::BadReference);
  // Forged values: 0, and the reference with its generation bits flipped.
  REQUIRE(call_and_wait<Describe>(loop, a.c, CallRef{lemsg::Ref<Call>(0)}, told));
  CHECK(told.r == Result::BadReference);
  REQUIRE(call_and_wait<Describe>(loop, a.c, CallRef{lemsg::Ref<Call>(ref.value ^ 0x80000000u)}, told));
  CHECK(told.r == Result::BadReference);
  // A stale one: its entry was dropped.
  Call* obj = srv.svc.object(ref);
  REQUIRE(obj != nullptr);
  CHECK(srv.svc.drop_ref(ref) == Result::Ok);
  obj->name.text.clear();
  REQUIRE(call_and_wait<Describe>(loop, a.c, CallRef{ref}, told));
  CHECK(told.r == Result::BadReference);
  CHECK(srv.closes == 0);  // a bad reference is not a bad frame
  // The entries a session owns go when it closes.
  REQUIRE(call_and_wait<Dial>(loop, a.c, Name{"bob"}, dialled));
  REQUIRE(dialled.r == Result::Ok);
  CHECK(srv.calls.size() == 1);
  a.c.close();
  REQUIRE(testutil::run_until(loop, [&] { return srv.released == 1; }, kWaitMs));
  CHECK(srv.calls.size() == 0);
  CHECK(srv.svc.object(dialled.resp.call) == nullptr);
  // A one-way item with a bad reference is dropped; binding twice is refused.
  CHECK(srv.svc.bind_refs<Call>(srv.calls, nullptr) == Result::Duplicate);
  CHECK(pool.in_use() == 0);
}

// ---- relay ------------------------------------------------------------------------

TEST_CASE("typed: a relay forwards calls through deferred responders and events to its own clients") {
  testutil::RuntimeDir dir;
  // The back service, in a child: echoes, emits a Tick when asked to by a Note.
  testutil::Pipe ready;
  const pid_t back = testutil::spawn([&] {
    die_with_parent();
    Loop l;
    Pool p;
    TypedService<Api> svc(l, p);
    svc.set_handler<Echo>([](Responder<Echo>& r, Everything& e) {
      e.u32 += 1;  // so the test sees it went through here
      (void)r.reply(e);
    });
    svc.set_handler<Note>([&](const lemsg::Caller&, Count& c) { (void)svc.emit<Tick>(Count{c.n}); });
    CHILD_CHECK(svc.advertise("typed-back") == Result::Ok);
    ready.put('r');
    (void)l.run();
    return 0;
  });
  REQUIRE(back > 0);
  REQUIRE(ready.get(kWaitMs) == 'r');

  Loop loop;
  Pool pool;
  // The relay: a client of the back service and a server of the front one.
  TypedClient<Api> upstream(loop, pool);
  TypedService<Api> front(loop, pool);
  REQUIRE(upstream.open_sync("typed-back", kWaitMs) == Result::Ok);
  front.set_handler<Echo>([&](Responder<Echo>& r, Everything& e) {
    // A call that cannot be sent drops its completion, and the Responder
    // it owns with it (Unanswered): say why first.
    if (!upstream.is_open()) {
      CHECK(r.fail(Result::Closed) == Result::Ok);
      return;
    }
    const Result sent = upstream.call_async<Echo>(e, [r = std::move(r)](Result why, Everything& resp) mutable {
      if (why == Result::Ok) (void)r.reply(resp);
      else (void)r.fail(why);
    });
    CHECK(sent == Result::Ok);
  });
  front.set_handler<Note>([&](const lemsg::Caller&, Count& c) { CHECK(upstream.send<Note>(c) == Result::Ok); });
  REQUIRE(upstream.subscribe<Tick>([&](Count& c) { (void)front.emit<Tick>(c); }) == Result::Ok);
  REQUIRE(front.advertise("typed-front") == Result::Ok);

  Client cl(loop, pool);
  REQUIRE(cl.subscribe_ticks());
  REQUIRE(cl.open(loop, "typed-front"));
  Everything e = highest();
  e.u32 = 10;
  Outcome<Echo> out;
  REQUIRE(call_and_wait<Echo>(loop, cl.c, e, out));
  CHECK(out.r == Result::Ok);
  CHECK(out.resp.u32 == 11);
  CHECK(out.resp.bytes.size() == 300);
  REQUIRE(testutil::run_until(loop, [&] { return front.subscriber_count<Tick>() == 1; }, kWaitMs));
  CHECK(cl.c.send<Note>(Count{99}) == Result::Ok);
  REQUIRE(testutil::run_until(loop, [&] { return cl.ticks == 1; }, kWaitMs));
  CHECK(cl.last_tick == 99);
  // The back service dies: the relayed call completes with Closed.
  testutil::kill9(back);
  REQUIRE(call_and_wait<Echo>(loop, cl.c, e, out));
  CHECK(out.r == Result::Closed);
  CHECK(cl.closes == 0);  // the front session goes on
  cl.c.close();
  upstream.close();
  CHECK(pool.in_use() == 0);
}

}  // TEST_SUITE
