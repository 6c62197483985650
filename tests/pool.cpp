// Section 3 (pool): block pools (PoolBase, Pool) and the in-place Callable.
//
// "A capture that is too large is a compile-time error" cannot be a run-time
// case: the static_assert fires inside Callable's constructor, so the type
// trait std::is_constructible still says yes. The negative compile test is
// tests/compile_fail/callable_too_large.cpp, which must FAIL to compile (and
// compiles with -DLEMSG_EXPECT_OK, which captures exactly LEMSG_CALLABLE_SIZE
// bytes, to show the failure is about the size and nothing else).
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"

#include <cstdint>
#include <cstring>

TEST_SUITE("pool") {

using lemsg::PoolBase;
using lemsg::Result;

namespace {
std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
}  // namespace

TEST_CASE("pool: a new pool has every block free and reports its geometry") {
  lemsg::Pool<24, 4> pool;
  CHECK(pool.capacity() == 4);
  CHECK(pool.block_size() >= 24);
  CHECK(pool.block_size() % PoolBase::alignment == 0);
  CHECK(pool.block_size() == PoolBase::round_block(24));
  CHECK(pool.in_use() == 0);
  CHECK(pool.available() == 4);
  CHECK(pool.high_water() == 0);
}

TEST_CASE("pool: round_block rounds up to the alignment") {
  CHECK(PoolBase::round_block(1) == PoolBase::alignment);
  CHECK(PoolBase::round_block(PoolBase::alignment) == PoolBase::alignment);
  CHECK(PoolBase::round_block(PoolBase::alignment + 1) == 2 * PoolBase::alignment);
  CHECK(PoolBase::meta_words(5) == 10);
  static_assert((PoolBase::alignment & (PoolBase::alignment - 1)) == 0, "alignment is a power of two");
}

TEST_CASE("pool: alloc until empty gives PoolEmpty and a null pointer, never an abort") {
  lemsg::Pool<16, 3> pool;
  void* b[3] = {};
  for (int i = 0; i < 3; ++i) {
    REQUIRE(pool.alloc(b[i]) == Result::Ok);
    CHECK(b[i] != nullptr);
    CHECK(pool.ref_count(b[i]) == 1);
    CHECK(pool.in_use() == static_cast<std::size_t>(i + 1));
  }
  CHECK(pool.available() == 0);
  int dummy = 0;
  void* out = &dummy;
  CHECK(pool.alloc(out) == Result::PoolEmpty);
  CHECK(out == nullptr);
  // Still empty on a second try, and nothing changed.
  out = &dummy;
  CHECK(pool.alloc(out) == Result::PoolEmpty);
  CHECK(out == nullptr);
  CHECK(pool.in_use() == 3);
  CHECK(pool.high_water() == 3);
}

TEST_CASE("pool: a released block can be allocated again") {
  lemsg::Pool<16, 2> pool;
  void* a = nullptr;
  void* b = nullptr;
  REQUIRE(pool.alloc(a) == Result::Ok);
  REQUIRE(pool.alloc(b) == Result::Ok);
  void* c = nullptr;
  REQUIRE(pool.alloc(c) == Result::PoolEmpty);
  CHECK(pool.release(a) == Result::Ok);
  CHECK(pool.ref_count(a) == 0);
  CHECK(pool.in_use() == 1);
  CHECK(pool.alloc(c) == Result::Ok);
  CHECK(c == a);  // the only free block
  CHECK(pool.ref_count(c) == 1);
  CHECK(pool.release(b) == Result::Ok);
  CHECK(pool.release(c) == Result::Ok);
  CHECK(pool.in_use() == 0);
  CHECK(pool.available() == 2);
}

TEST_CASE("pool: add_ref keeps the block in use until the last release") {
  lemsg::Pool<32, 2> pool;
  void* b = nullptr;
  REQUIRE(pool.alloc(b) == Result::Ok);
  CHECK(pool.add_ref(b) == Result::Ok);
  CHECK(pool.add_ref(b) == Result::Ok);
  CHECK(pool.ref_count(b) == 3);
  CHECK(pool.release(b) == Result::Ok);
  CHECK(pool.release(b) == Result::Ok);
  CHECK(pool.ref_count(b) == 1);
  CHECK(pool.in_use() == 1);
  // The block is not handed out again while referenced.
  void* other = nullptr;
  REQUIRE(pool.alloc(other) == Result::Ok);
  CHECK(other != b);
  CHECK(pool.release(b) == Result::Ok);
  CHECK(pool.ref_count(b) == 0);
  CHECK(pool.in_use() == 1);
  CHECK(pool.release(other) == Result::Ok);
  CHECK(pool.in_use() == 0);
}

TEST_CASE("pool: the high-water mark records the most blocks in use at once") {
  lemsg::Pool<8, 5> pool;
  void* b[5] = {};
  for (int i = 0; i < 3; ++i) REQUIRE(pool.alloc(b[i]) == Result::Ok);
  CHECK(pool.high_water() == 3);
  CHECK(pool.release(b[0]) == Result::Ok);
  CHECK(pool.release(b[1]) == Result::Ok);
  CHECK(pool.in_use() == 1);
  CHECK(pool.high_water() == 3);
  REQUIRE(pool.alloc(b[0]) == Result::Ok);
  CHECK(pool.high_water() == 3);
  REQUIRE(pool.alloc(b[1]) == Result::Ok);
  REQUIRE(pool.alloc(b[3]) == Result::Ok);
  CHECK(pool.in_use() == 4);
  CHECK(pool.high_water() == 4);
  for (int i : {0, 1, 2, 3}) CHECK(pool.release(b[i]) == Result::Ok);
  CHECK(pool.in_use() == 0);
  CHECK(pool.high_water() == 4);
}

TEST_CASE("pool: a pointer that is not one of its blocks is refused with NotPoolBlock") {
  lemsg::Pool<48, 3> pool;
  lemsg::Pool<48, 3> other;
  void* b = nullptr;
  REQUIRE(pool.alloc(b) == Result::Ok);
  void* ob = nullptr;
  REQUIRE(other.alloc(ob) == Result::Ok);

  int on_stack = 0;
  unsigned char* base = static_cast<unsigned char*>(b);
  void* inside = base + 1;                                  // inside a block, not at its start
  void* inside_aligned = base + PoolBase::alignment;        // aligned, still not a block start
  void* first = nullptr;
  {
    // The lowest block is the storage's start; one past the last block is
    // start + capacity * block_size.
    void* all[2] = {};
    REQUIRE(pool.alloc(all[0]) == Result::Ok);
    REQUIRE(pool.alloc(all[1]) == Result::Ok);
    first = b;
    for (void* p : all)
      if (addr(p) < addr(first)) first = p;
    CHECK(pool.release(all[0]) == Result::Ok);
    CHECK(pool.release(all[1]) == Result::Ok);
  }
  unsigned char* start = static_cast<unsigned char*>(first);
  void* past_end = start + pool.capacity() * pool.block_size();
  void* before = reinterpret_cast<void*>(addr(start) - pool.block_size());

  void* foreign[] = {&on_stack, inside, inside_aligned, past_end, before, ob, nullptr};
  for (void* p : foreign) {
    INFO("pointer offset from the pool start: " << static_cast<long long>(addr(p) - addr(start)));
    CHECK_FALSE(pool.owns(p));
    CHECK(pool.ref_count(p) == 0);
    CHECK(pool.add_ref(p) == Result::NotPoolBlock);
    CHECK(pool.release(p) == Result::NotPoolBlock);
  }
  // Nothing changed in either pool.
  CHECK(pool.ref_count(b) == 1);
  CHECK(pool.in_use() == 1);
  CHECK(other.ref_count(ob) == 1);
  CHECK(other.in_use() == 1);
  CHECK(pool.owns(b));
  CHECK(other.owns(ob));
  CHECK(pool.release(b) == Result::Ok);
  CHECK(other.release(ob) == Result::Ok);
}

TEST_CASE("pool: releasing a free block is a DoubleFree and changes nothing") {
  lemsg::Pool<16, 2> pool;
  void* b = nullptr;
  REQUIRE(pool.alloc(b) == Result::Ok);
  CHECK(pool.release(b) == Result::Ok);
  CHECK(pool.release(b) == Result::DoubleFree);
  CHECK(pool.add_ref(b) == Result::DoubleFree);
  CHECK(pool.in_use() == 0);
  // The free list is intact: both blocks come out once, then the pool is empty.
  void* x = nullptr;
  void* y = nullptr;
  void* z = nullptr;
  CHECK(pool.alloc(x) == Result::Ok);
  CHECK(pool.alloc(y) == Result::Ok);
  CHECK(x != y);
  CHECK(pool.alloc(z) == Result::PoolEmpty);
  CHECK(pool.release(x) == Result::Ok);
  CHECK(pool.release(y) == Result::Ok);
}

TEST_CASE("pool: blocks are aligned and do not overlap") {
  constexpr std::size_t size = 13;  // odd on purpose: the pool must round it
  constexpr std::size_t count = 9;
  lemsg::Pool<size, count> pool;
  unsigned char* b[count] = {};
  for (std::size_t i = 0; i < count; ++i) {
    void* p = nullptr;
    REQUIRE(pool.alloc(p) == Result::Ok);
    b[i] = static_cast<unsigned char*>(p);
    CHECK(addr(p) % PoolBase::alignment == 0);
    CHECK(pool.owns(p));
  }
  // Fill every byte of every block with its own pattern, then read them all
  // back: any overlap would overwrite a neighbour's bytes.
  for (std::size_t i = 0; i < count; ++i) std::memset(b[i], static_cast<int>(0xA0 + i), size);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < count; ++i)
    for (std::size_t k = 0; k < size; ++k)
      if (b[i][k] != static_cast<unsigned char>(0xA0 + i)) ++bad;
  CHECK(bad == 0);
  // Distinct starts at least a block apart.
  for (std::size_t i = 0; i < count; ++i)
    for (std::size_t j = i + 1; j < count; ++j) {
      const std::uintptr_t d = addr(b[i]) > addr(b[j]) ? addr(b[i]) - addr(b[j]) : addr(b[j]) - addr(b[i]);
      CHECK(d >= size);
    }
  for (auto* p : b) CHECK(pool.release(p) == Result::Ok);
}

TEST_CASE("pool: init with caller storage hands out blocks inside that storage") {
  constexpr std::size_t size = 20;
  constexpr std::size_t count = 5;
  alignas(PoolBase::alignment) unsigned char storage[PoolBase::round_block(size) * count];
  std::uint32_t meta[PoolBase::meta_words(count)];
  PoolBase pool;
  REQUIRE(pool.init(storage, size, count, meta) == Result::Ok);
  CHECK(pool.capacity() == count);
  CHECK(pool.block_size() == PoolBase::round_block(size));
  void* b[count] = {};
  for (auto& p : b) {
    REQUIRE(pool.alloc(p) == Result::Ok);
    CHECK(addr(p) >= addr(storage));
    CHECK(addr(p) + size <= addr(storage) + sizeof storage);
    std::memset(p, 0x5A, size);
  }
  void* none = nullptr;
  CHECK(pool.alloc(none) == Result::PoolEmpty);
  for (auto* p : b) CHECK(pool.release(p) == Result::Ok);
  CHECK(pool.in_use() == 0);
  CHECK(pool.high_water() == count);
}

TEST_CASE("pool: init refuses bad parameters with BadParameter") {
  alignas(PoolBase::alignment) unsigned char storage[PoolBase::round_block(8) * 4];
  std::uint32_t meta[PoolBase::meta_words(4)];

  SUBCASE("null storage") {
    PoolBase pool;
    CHECK(pool.init(nullptr, 8, 4, meta) == Result::BadParameter);
  }
  SUBCASE("null meta") {
    PoolBase pool;
    CHECK(pool.init(storage, 8, 4, nullptr) == Result::BadParameter);
  }
  SUBCASE("misaligned storage") {
    PoolBase pool;
    CHECK(pool.init(storage + 1, 8, 3, meta) == Result::BadParameter);
  }
  SUBCASE("zero block size") {
    PoolBase pool;
    CHECK(pool.init(storage, 0, 4, meta) == Result::BadParameter);
  }
  SUBCASE("zero count") {
    PoolBase pool;
    CHECK(pool.init(storage, 8, 0, meta) == Result::BadParameter);
  }
  SUBCASE("count over 2^31") {
    PoolBase pool;
    CHECK(pool.init(storage, 8, (std::size_t{1} << 31) + 1, meta) == Result::BadParameter);
  }
  SUBCASE("a second init") {
    PoolBase pool;
    REQUIRE(pool.init(storage, 8, 4, meta) == Result::Ok);
    void* b = nullptr;
    REQUIRE(pool.alloc(b) == Result::Ok);
    alignas(PoolBase::alignment) unsigned char storage2[PoolBase::round_block(8) * 4];
    std::uint32_t meta2[PoolBase::meta_words(4)];
    CHECK(pool.init(storage2, 8, 4, meta2) == Result::BadParameter);
    // The first storage is still in use, untouched.
    CHECK(pool.ref_count(b) == 1);
    CHECK(pool.in_use() == 1);
    CHECK(pool.capacity() == 4);
    CHECK(pool.release(b) == Result::Ok);
  }
  SUBCASE("init on a Pool<> that already has its own storage") {
    lemsg::Pool<8, 4> pool;
    CHECK(pool.init(storage, 8, 4, meta) == Result::BadParameter);
    CHECK(pool.capacity() == 4);
  }
}

TEST_CASE("pool: a pool without storage is empty and owns nothing") {
  PoolBase pool;
  void* b = &pool;
  CHECK(pool.alloc(b) == Result::PoolEmpty);
  CHECK(b == nullptr);
  int x = 0;
  CHECK(pool.release(&x) == Result::NotPoolBlock);
  CHECK(pool.add_ref(&x) == Result::NotPoolBlock);
  CHECK_FALSE(pool.owns(&x));
  CHECK(pool.capacity() == 0);
  CHECK(pool.in_use() == 0);
}

// ---------------------------------------------------------------------------
// Callable
// ---------------------------------------------------------------------------

namespace {

int add_one(int v) { return v + 1; }

// Counts its own lives, so copies and destructions of a capture can be
// checked exactly. Small enough for LEMSG_CALLABLE_SIZE on 32-bit targets.
struct Counted {
  static int constructed;  // every constructor, copy and move included
  static int destroyed;
  static int copies;
  int value;
  explicit Counted(int v) noexcept : value(v) { ++constructed; }
  Counted(const Counted& o) noexcept : value(o.value) {
    ++constructed;
    ++copies;
  }
  Counted(Counted&& o) noexcept : value(o.value) { ++constructed; }
  ~Counted() { ++destroyed; }
  Counted& operator=(const Counted&) = delete;
  static void reset() { constructed = destroyed = copies = 0; }
  static int alive() { return constructed - destroyed; }
};
int Counted::constructed = 0;
int Counted::destroyed = 0;
int Counted::copies = 0;

}  // namespace

TEST_CASE("pool: Callable holds a lambda with captures") {
  int base = 40;
  int hits = 0;
  lemsg::Callable<int(int)> f = [&hits, base](int v) {
    ++hits;
    return base + v;
  };
  REQUIRE(static_cast<bool>(f));
  CHECK(f(2) == 42);
  CHECK(f(-40) == 0);
  CHECK(hits == 2);
}

TEST_CASE("pool: Callable holds a function pointer") {
  lemsg::Callable<int(int)> f = &add_one;
  REQUIRE(static_cast<bool>(f));
  CHECK(f(41) == 42);
  lemsg::Callable<int(int)> g = add_one;  // function name decays
  CHECK(g(0) == 1);
}

TEST_CASE("pool: Callable holds a mutable lambda whose state persists between calls") {
  lemsg::Callable<int()> counter = [n = 0]() mutable { return ++n; };
  CHECK(counter() == 1);
  CHECK(counter() == 2);
  // A copy carries the state at the time of the copy and then diverges.
  lemsg::Callable<int()> copy = counter;
  CHECK(copy() == 3);
  CHECK(copy() == 4);
  CHECK(counter() == 3);
}

TEST_CASE("pool: copying and moving a Callable keeps its behaviour") {
  int sum = 0;
  lemsg::Callable<void(int)> f = [&sum](int v) { sum += v; };
  lemsg::Callable<void(int)> copy(f);
  copy(1);
  f(2);
  CHECK(sum == 3);

  lemsg::Callable<void(int)> moved(std::move(copy));
  CHECK(static_cast<bool>(moved));
  CHECK_FALSE(static_cast<bool>(copy));  // a moved-from Callable is empty
  moved(10);
  CHECK(sum == 13);

  lemsg::Callable<void(int)> assigned;
  CHECK_FALSE(static_cast<bool>(assigned));
  assigned = f;
  assigned(100);
  CHECK(sum == 113);

  lemsg::Callable<void(int)> move_assigned;
  move_assigned = std::move(assigned);
  CHECK_FALSE(static_cast<bool>(assigned));
  move_assigned(1000);
  CHECK(sum == 1113);

  // Self-assignment leaves it working.
  lemsg::Callable<void(int)>& self = move_assigned;
  move_assigned = self;
  move_assigned(5);
  CHECK(sum == 1118);
}

TEST_CASE("pool: a non-trivially-copyable capture is copied and destroyed exactly once per copy") {
  Counted::reset();
  int seen = 0;
  {
    Counted c(7);
    lemsg::Callable<void()> f = [c, &seen] { seen += c.value; };
    CHECK(Counted::alive() == 2);  // c and the one inside f
    f();
    CHECK(seen == 7);
    {
      lemsg::Callable<void()> g = f;  // one copy
      CHECK(Counted::alive() == 3);
      lemsg::Callable<void()> h = std::move(g);  // moved: g's copy is destroyed
      CHECK(Counted::alive() == 3);
      CHECK_FALSE(static_cast<bool>(g));
      h();
      CHECK(seen == 14);
      lemsg::Callable<void()> k;
      k = h;  // copy assignment into an empty one
      CHECK(Counted::alive() == 4);
      k = f;  // copy assignment over a full one destroys the old capture
      CHECK(Counted::alive() == 4);
      k = nullptr;
      CHECK(Counted::alive() == 3);
      CHECK_FALSE(static_cast<bool>(k));
    }
    CHECK(Counted::alive() == 2);
    f = nullptr;
    CHECK(Counted::alive() == 1);
  }
  CHECK(Counted::alive() == 0);
  CHECK(Counted::destroyed == Counted::constructed);
  // Copied into the lambda, into g, and by the two assignments into k;
  // every other transfer was a move.
  CHECK(Counted::copies == 4);
}

TEST_CASE("pool: an empty Callable is false, and null or nullptr make it empty") {
  lemsg::Callable<void()> empty;
  CHECK_FALSE(static_cast<bool>(empty));
  lemsg::Callable<void()> from_null(nullptr);
  CHECK_FALSE(static_cast<bool>(from_null));

  void (*null_fn)() = nullptr;
  lemsg::Callable<void()> from_null_ptr = null_fn;
  CHECK_FALSE(static_cast<bool>(from_null_ptr));
  int (*null_fn2)(int) = nullptr;
  lemsg::Callable<int(int)> from_null_ptr2(null_fn2);
  CHECK_FALSE(static_cast<bool>(from_null_ptr2));

  lemsg::Callable<int(int)> f = &add_one;
  CHECK(static_cast<bool>(f));
  f = nullptr;
  CHECK_FALSE(static_cast<bool>(f));
  // Copies of an empty Callable are empty too.
  lemsg::Callable<int(int)> g = f;
  CHECK_FALSE(static_cast<bool>(g));
}

TEST_CASE("pool: a Callable up to LEMSG_CALLABLE_SIZE bytes is accepted") {
  struct Fill {
    unsigned char bytes[LEMSG_CALLABLE_SIZE];
  };
  Fill fill;
  for (std::size_t i = 0; i < sizeof fill.bytes; ++i) fill.bytes[i] = static_cast<unsigned char>(i + 1);
  lemsg::Callable<std::size_t()> f = [fill] {
    std::size_t sum = 0;
    for (unsigned char b : fill.bytes) sum += b;
    return sum;
  };
  const std::size_t n = LEMSG_CALLABLE_SIZE;
  CHECK(f() == n * (n + 1) / 2);
  lemsg::Callable<std::size_t()> copy = f;
  CHECK(copy() == n * (n + 1) / 2);
}

// Built for every target: a capture that compiles on the PC compiles for the
// device too (with 4 pointers, 16 bytes on 32-bit ARM, these did not).
TEST_CASE("pool: the same captures fit on every target: three references and a 64-bit value, or four 64-bit values") {
  static_assert(LEMSG_CALLABLE_SIZE == 32, "the default capture size is 32 bytes on every target");
  int a = 1, b = 2, c = 3;
  std::uint64_t u = 0x100000000ull;
  lemsg::Callable<std::uint64_t()> refs = [&a, &b, &c, u] { return static_cast<std::uint64_t>(a + b + c) + u; };
  CHECK(refs() == 0x100000006ull);
  a = 10;
  CHECK(refs() == 0x10000000full);
  std::uint64_t w = 1, x = 2, y = 3, z = 4;  // not const: each is really captured
  lemsg::Callable<std::uint64_t(std::uint64_t)> values = [w, x, y, z](std::uint64_t k) { return k * (w + x + y + z); };
  CHECK(values(3) == 30);
  // A response handler (move-only) takes the same captures.
  lemsg::ResponseHandler done = [&a, &b, &c, u](lemsg::Result, lemsg::Message&) { a = b + c + static_cast<int>(u >> 32); };
  lemsg::Message none;
  done(lemsg::Result::Ok, none);
  CHECK(a == 6);
}

TEST_CASE("pool: Callable passes reference arguments through") {
  lemsg::Callable<void(int&)> inc = [](int& v) { ++v; };
  int v = 1;
  inc(v);
  inc(v);
  CHECK(v == 3);
}

}  // TEST_SUITE
