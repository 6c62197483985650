// Section 4 (refmap): RefMapBase and RefMap, generation-checked references.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"

#include <algorithm>
#include <cstdint>
#include <vector>

TEST_SUITE("refmap") {

using lemsg::Result;

namespace {

// Fixed-seed xorshift32: the same "random" values on every run and target.
struct XorShift32 {
  std::uint32_t s;
  std::uint32_t next() {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    return s;
  }
};

// Lookup through the capacity-independent base class.
void* lookup_via_base(const lemsg::RefMapBase& m, std::uint32_t ref) { return m.lookup_ptr(ref); }

}  // namespace

TEST_CASE("refmap: an added entry gets a non-zero reference that looks up to the stored pointer") {
  lemsg::RefMap<int, 8> m;
  int values[8] = {};
  std::uint32_t refs[8] = {};
  for (int i = 0; i < 8; ++i) {
    REQUIRE(m.add(&values[i], refs[i]) == Result::Ok);
    CHECK(refs[i] != 0);
  }
  for (int i = 0; i < 8; ++i) {
    CHECK(m.lookup(refs[i]) == &values[i]);
    CHECK(lookup_via_base(m, refs[i]) == &values[i]);
    for (int j = i + 1; j < 8; ++j) CHECK(refs[i] != refs[j]);
  }
  CHECK(m.size() == 8);
  CHECK(m.capacity() == 8);
}

TEST_CASE("refmap: adding nullptr is BadParameter and the reference is 0") {
  lemsg::RefMap<int, 2> m;
  std::uint32_t ref = 1234;
  CHECK(m.add(nullptr, ref) == Result::BadParameter);
  CHECK(ref == 0);
  CHECK(m.size() == 0);
}

TEST_CASE("refmap: a removed reference looks up as null and a second remove is NotFound") {
  lemsg::RefMap<int, 4> m;
  int a = 1, b = 2;
  std::uint32_t ra = 0, rb = 0;
  REQUIRE(m.add(&a, ra) == Result::Ok);
  REQUIRE(m.add(&b, rb) == Result::Ok);
  CHECK(m.remove(ra) == Result::Ok);
  CHECK(m.lookup(ra) == nullptr);
  CHECK(m.owner_of(ra) == 0);
  CHECK(m.remove(ra) == Result::NotFound);
  CHECK(m.lookup(rb) == &b);  // the neighbour is untouched
  CHECK(m.size() == 1);
  CHECK(m.remove(0) == Result::NotFound);
}

TEST_CASE("refmap: a stale reference looks up as null after its slot is reused") {
  lemsg::RefMap<int, 1> m;  // one slot, so the second add must reuse it
  int a = 1, b = 2;
  std::uint32_t ra = 0, rb = 0;
  REQUIRE(m.add(&a, ra) == Result::Ok);
  REQUIRE(m.remove(ra) == Result::Ok);
  REQUIRE(m.add(&b, rb) == Result::Ok);
  CHECK(rb != ra);
  CHECK(m.lookup(ra) == nullptr);
  CHECK(m.lookup(rb) == &b);
  CHECK(m.remove(ra) == Result::NotFound);
  CHECK(m.lookup(rb) == &b);  // the failed remove did not touch the new entry
  CHECK(m.remove(rb) == Result::Ok);
}

TEST_CASE("refmap: a stale reference stays dead in a larger map as slots cycle") {
  lemsg::RefMap<int, 4> m;
  int v[4] = {};
  std::uint32_t live[4] = {};
  for (int i = 0; i < 4; ++i) REQUIRE(m.add(&v[i], live[i]) == Result::Ok);
  std::vector<std::uint32_t> stale;
  std::size_t bad = 0;
  for (int round = 0; round < 200; ++round) {
    const int k = round % 4;
    stale.push_back(live[k]);
    REQUIRE(m.remove(live[k]) == Result::Ok);
    REQUIRE(m.add(&v[k], live[k]) == Result::Ok);
    for (std::uint32_t s : stale)
      if (m.lookup(s) != nullptr) ++bad;
  }
  CHECK(bad == 0);
  for (int i = 0; i < 4; ++i) CHECK(m.lookup(live[i]) == &v[i]);
}

TEST_CASE("refmap: forged references look up as null") {
  lemsg::RefMap<int, 64> m;
  int v[64] = {};
  std::vector<std::uint32_t> live;
  std::vector<std::uint32_t> removed;
  for (int i = 0; i < 48; ++i) {
    std::uint32_t r = 0;
    REQUIRE(m.add(&v[i], r, static_cast<std::uint32_t>(i % 3)) == Result::Ok);
    live.push_back(r);
  }
  // Remove every third entry, so the map has free slots with used generations.
  for (std::size_t i = 0; i < live.size(); i += 3) {
    REQUIRE(m.remove(live[i]) == Result::Ok);
    removed.push_back(live[i]);
    live[i] = 0;
  }
  live.erase(std::remove(live.begin(), live.end(), 0u), live.end());
  std::vector<std::uint32_t> sorted_live = live;
  std::sort(sorted_live.begin(), sorted_live.end());

  std::size_t checked = 0, wrong = 0;
  auto probe = [&](std::uint32_t forged) {
    ++checked;
    const bool is_live = std::binary_search(sorted_live.begin(), sorted_live.end(), forged);
    int* got = m.lookup(forged);
    if (is_live ? got == nullptr : got != nullptr) ++wrong;
    if (!is_live && m.owner_of(forged) != 0) ++wrong;
    if (!is_live && m.remove(forged) != Result::NotFound) ++wrong;
  };
  probe(0);
  probe(0xFFFFFFFFu);
  probe(0x80000000u);
  probe(1);
  for (std::uint32_t r : removed) probe(r);
  // Every live reference with one bit flipped: the closest forgeries.
  for (std::uint32_t r : live)
    for (int bit = 0; bit < 32; ++bit) probe(r ^ (1u << bit));
  XorShift32 rng{0x2545F491u};
  for (int i = 0; i < 200000; ++i) probe(rng.next());
  CHECK(checked > 200000);
  CHECK(wrong == 0);
  // The map is as it was: every live reference still resolves.
  CHECK(m.size() == live.size());
  for (std::uint32_t r : live) CHECK(m.lookup(r) != nullptr);
}

TEST_CASE("refmap: a reference from another map looks up as null") {
  // Maps of the same type and capacity given the same operations hand out
  // the same slots and generations; only the per-map key tells them apart.
  constexpr int maps = 6;
  lemsg::RefMap<int, 8> m[maps];
  int v[5] = {};
  std::uint32_t refs[maps][5] = {};
  for (int k = 0; k < maps; ++k) {
    for (int i = 0; i < 4; ++i) REQUIRE(m[k].add(&v[i], refs[k][i]) == Result::Ok);
    REQUIRE(m[k].remove(refs[k][1]) == Result::Ok);
    REQUIRE(m[k].add(&v[4], refs[k][4]) == Result::Ok);
  }
  std::size_t wrong = 0;
  for (int k = 0; k < maps; ++k)
    for (int other = 0; other < maps; ++other) {
      if (other == k) continue;
      for (int i = 0; i < 5; ++i) {
        if (refs[k][i] == refs[other][i]) ++wrong;  // same value: no way to tell them apart
        if (m[other].lookup(refs[k][i]) != nullptr) ++wrong;
        if (m[other].remove(refs[k][i]) != Result::NotFound) ++wrong;
      }
    }
  CHECK(wrong == 0);
  // Each map still knows its own references.
  for (int k = 0; k < maps; ++k) {
    CHECK(m[k].lookup(refs[k][0]) == &v[0]);
    CHECK(m[k].lookup(refs[k][1]) == nullptr);
    CHECK(m[k].lookup(refs[k][4]) == &v[4]);
    CHECK(m[k].size() == 4);
  }
}

TEST_CASE("refmap: a full table returns NoMemory and accepts again after a remove") {
  constexpr std::size_t n = 5;
  lemsg::RefMap<int, n> m;
  int v[n + 1] = {};
  std::uint32_t refs[n + 1] = {};
  for (std::size_t i = 0; i < n; ++i) REQUIRE(m.add(&v[i], refs[i]) == Result::Ok);
  CHECK(m.size() == n);
  refs[n] = 77;
  CHECK(m.add(&v[n], refs[n]) == Result::NoMemory);
  CHECK(refs[n] == 0);
  CHECK(m.size() == n);
  for (std::size_t i = 0; i < n; ++i) CHECK(m.lookup(refs[i]) == &v[i]);
  REQUIRE(m.remove(refs[2]) == Result::Ok);
  CHECK(m.add(&v[n], refs[n]) == Result::Ok);
  CHECK(m.lookup(refs[n]) == &v[n]);
  CHECK(m.lookup(refs[2]) == nullptr);
  CHECK(m.retired() == 0);  // full is not retired
}

TEST_CASE("refmap: size and high_water track live entries") {
  lemsg::RefMap<int, 6> m;
  int v[6] = {};
  std::uint32_t r[6] = {};
  CHECK(m.size() == 0);
  CHECK(m.high_water() == 0);
  for (int i = 0; i < 4; ++i) REQUIRE(m.add(&v[i], r[i]) == Result::Ok);
  CHECK(m.size() == 4);
  CHECK(m.high_water() == 4);
  REQUIRE(m.remove(r[0]) == Result::Ok);
  REQUIRE(m.remove(r[1]) == Result::Ok);
  CHECK(m.size() == 2);
  CHECK(m.high_water() == 4);
  REQUIRE(m.add(&v[0], r[0]) == Result::Ok);
  CHECK(m.size() == 3);
  CHECK(m.high_water() == 4);
  REQUIRE(m.add(&v[1], r[1]) == Result::Ok);
  REQUIRE(m.add(&v[4], r[4]) == Result::Ok);
  CHECK(m.size() == 5);
  CHECK(m.high_water() == 5);
  CHECK(m.remove(r[4]) == Result::Ok);
  CHECK(m.remove(r[4]) == Result::NotFound);
  CHECK(m.size() == 4);  // a failed remove does not count
  CHECK(m.high_water() == 5);
}

TEST_CASE("refmap: for_each visits every live entry once with its reference") {
  lemsg::RefMap<int, 8> m;
  int v[6] = {0, 1, 2, 3, 4, 5};
  std::uint32_t r[6] = {};
  for (int i = 0; i < 6; ++i) REQUIRE(m.add(&v[i], r[i]) == Result::Ok);
  REQUIRE(m.remove(r[2]) == Result::Ok);
  int seen[6] = {};
  std::size_t wrong = 0;
  m.for_each([&](int* p, std::uint32_t ref) {
    ++seen[*p];
    if (ref != r[*p] || m.lookup(ref) != p) ++wrong;
  });
  CHECK(wrong == 0);
  for (int i = 0; i < 6; ++i) CHECK(seen[i] == (i == 2 ? 0 : 1));
}

TEST_CASE("refmap: release_owner removes exactly one owner's entries") {
  lemsg::RefMap<int, 16> m;
  constexpr std::uint32_t A = 0xA11CE, B = 0xB0B;
  int va[4] = {10, 11, 12, 13}, vb[3] = {20, 21, 22}, vn[2] = {30, 31};
  std::uint32_t ra[4] = {}, rb[3] = {}, rn[2] = {};
  // Interleave owners so they are spread over the slots.
  for (int i = 0; i < 4; ++i) {
    REQUIRE(m.add(&va[i], ra[i], A) == Result::Ok);
    if (i < 3) REQUIRE(m.add(&vb[i], rb[i], B) == Result::Ok);
    if (i < 2) REQUIRE(m.add(&vn[i], rn[i]) == Result::Ok);
  }
  for (int i = 0; i < 4; ++i) CHECK(m.owner_of(ra[i]) == A);
  for (int i = 0; i < 3; ++i) CHECK(m.owner_of(rb[i]) == B);
  for (int i = 0; i < 2; ++i) CHECK(m.owner_of(rn[i]) == 0);
  CHECK(m.size() == 9);

  int calls[4] = {};
  std::size_t wrong = 0;
  const std::size_t n = m.release_owner(A, [&](int* p, std::uint32_t ref) {
    bool matched = false;
    for (int i = 0; i < 4; ++i)
      if (p == &va[i] && ref == ra[i]) {
        ++calls[i];
        matched = true;
      }
    if (!matched) ++wrong;
    // The entry is already gone when the callback runs.
    if (m.lookup(ref) != nullptr) ++wrong;
  });
  CHECK(n == 4);
  CHECK(wrong == 0);
  for (int i = 0; i < 4; ++i) {
    CHECK(calls[i] == 1);
    CHECK(m.lookup(ra[i]) == nullptr);
    CHECK(m.owner_of(ra[i]) == 0);
    CHECK(m.remove(ra[i]) == Result::NotFound);
  }
  for (int i = 0; i < 3; ++i) {
    CHECK(m.lookup(rb[i]) == &vb[i]);
    CHECK(m.owner_of(rb[i]) == B);
  }
  for (int i = 0; i < 2; ++i) CHECK(m.lookup(rn[i]) == &vn[i]);
  CHECK(m.size() == 5);

  // A second release of A finds nothing.
  int again = 0;
  CHECK(m.release_owner(A, [&](int*, std::uint32_t) { ++again; }) == 0);
  CHECK(again == 0);
  // Without a callback.
  CHECK(m.release_owner(B) == 3);
  for (int i = 0; i < 3; ++i) CHECK(m.lookup(rb[i]) == nullptr);
  CHECK(m.size() == 2);
}

TEST_CASE("refmap: release_owner(0) removes nothing") {
  lemsg::RefMap<int, 4> m;
  int a = 1, b = 2;
  std::uint32_t ra = 0, rb = 0;
  REQUIRE(m.add(&a, ra) == Result::Ok);  // no owner: key 0
  REQUIRE(m.add(&b, rb, 5) == Result::Ok);
  int calls = 0;
  CHECK(m.release_owner(0, [&](int*, std::uint32_t) { ++calls; }) == 0);
  CHECK(m.release_owner(0) == 0);
  CHECK(calls == 0);
  CHECK(m.lookup(ra) == &a);
  CHECK(m.lookup(rb) == &b);
  CHECK(m.size() == 2);
}

TEST_CASE("refmap: a release_owner callback may add entries") {
  lemsg::RefMap<int, 4> m;
  constexpr std::uint32_t A = 1;
  int owned[3] = {1, 2, 3};
  int fresh[3] = {7, 8, 9};
  std::uint32_t ro[3] = {}, rf[3] = {};
  for (int i = 0; i < 3; ++i) REQUIRE(m.add(&owned[i], ro[i], A) == Result::Ok);
  int added = 0;
  std::size_t failures = 0;
  // A const callable works too.
  const auto cb = [&](int*, std::uint32_t) {
    // Adds an unowned entry each time, reusing freed slots while the sweep
    // is still going.
    if (m.add(&fresh[added], rf[added]) != Result::Ok) ++failures;
    ++added;
  };
  CHECK(m.release_owner(A, cb) == 3);
  CHECK(failures == 0);
  CHECK(added == 3);
  CHECK(m.size() == 3);
  for (int i = 0; i < 3; ++i) {
    CHECK(m.lookup(ro[i]) == nullptr);
    CHECK(m.lookup(rf[i]) == &fresh[i]);
    CHECK(m.owner_of(rf[i]) == 0);
  }
}

TEST_CASE("refmap: a million create/remove cycles on one slot never repeat or revive a reference") {
  constexpr std::size_t cycles = 1000000;
  lemsg::RefMap<int, 1> m;
  int x = 0;
  std::vector<std::uint32_t> refs;
  refs.reserve(cycles + 1);
  std::size_t add_failed = 0, zero = 0, same_as_previous = 0, previous_alive = 0, new_dead = 0,
              remove_failed = 0, dead_after_remove = 0;
  std::uint32_t prev = 0;
  // Counted rather than CHECKed per cycle, so the loop stays fast under qemu.
  for (std::size_t i = 0; i < cycles; ++i) {
    std::uint32_t r = 0;
    if (m.add(&x, r) != Result::Ok) {
      ++add_failed;
      break;
    }
    if (r == 0) ++zero;
    if (r == prev) ++same_as_previous;
    if (prev != 0 && m.lookup(prev) != nullptr) ++previous_alive;  // slot is live again here
    if (m.lookup(r) != &x) ++new_dead;
    if (m.remove(r) != Result::Ok) ++remove_failed;
    if (m.lookup(r) != nullptr) ++dead_after_remove;
    refs.push_back(r);
    prev = r;
  }
  CHECK(add_failed == 0);
  CHECK(zero == 0);
  CHECK(same_as_previous == 0);
  CHECK(previous_alive == 0);
  CHECK(new_dead == 0);
  CHECK(remove_failed == 0);
  CHECK(dead_after_remove == 0);
  CHECK(refs.size() == cycles);
  CHECK(m.retired() == 0);

  // Occupy the slot again, then check old references against the live slot.
  std::uint32_t last = 0;
  REQUIRE(m.add(&x, last) == Result::Ok);
  std::size_t old_alive = 0;
  for (std::size_t i = 0; i < refs.size(); i += 997)
    if (m.lookup(refs[i]) != nullptr) ++old_alive;
  for (std::size_t i = refs.size() - 1000; i < refs.size(); ++i)
    if (m.lookup(refs[i]) != nullptr) ++old_alive;
  CHECK(old_alive == 0);
  CHECK(m.lookup(last) == &x);

  refs.push_back(last);
  std::sort(refs.begin(), refs.end());
  CHECK(std::adjacent_find(refs.begin(), refs.end()) == refs.end());
}

TEST_CASE("refmap: a slot that used its last generation retires instead of wrapping") {
  constexpr std::uint32_t max_gen = 50;
  lemsg::RefMap<int, 2, max_gen> m;
  CHECK(m.max_generation() == max_gen);
  int keep = 1, x = 2;
  std::vector<std::uint32_t> old;

  // The first entry takes one slot and stays; the other slot cycles.
  std::uint32_t keep_ref = 0;
  REQUIRE(m.add(&keep, keep_ref) == Result::Ok);
  std::size_t cycled = 0, revived = 0;
  Result last_add = Result::Ok;
  for (int i = 0; i < 1000; ++i) {
    std::uint32_t r = 0;
    last_add = m.add(&x, r);
    if (last_add != Result::Ok) break;
    ++cycled;
    for (std::uint32_t o : old)
      if (m.lookup(o) != nullptr) ++revived;
    REQUIRE(m.remove(r) == Result::Ok);
    old.push_back(r);
  }
  // Generations 1..50; one may be skipped when its encoding would be 0.
  CHECK(cycled >= max_gen - 1);
  CHECK(cycled <= max_gen);
  CHECK(last_add == Result::NoMemory);
  CHECK(m.retired() == 1);
  CHECK(revived == 0);
  // The kept slot still works.
  CHECK(m.lookup(keep_ref) == &keep);
  CHECK(m.owner_of(keep_ref) == 0);
  std::uint32_t r = 0;
  CHECK(m.add(&x, r) == Result::NoMemory);  // one slot live, the other retired
  CHECK(m.retired() == 1);

  // Free the kept slot: it takes new entries, and cycles until it retires too.
  REQUIRE(m.remove(keep_ref) == Result::Ok);
  old.push_back(keep_ref);
  std::size_t cycled2 = 0;
  for (int i = 0; i < 1000; ++i) {
    std::uint32_t r2 = 0;
    last_add = m.add(&x, r2);
    if (last_add != Result::Ok) break;
    ++cycled2;
    for (std::uint32_t o : old)
      if (m.lookup(o) != nullptr) ++revived;
    if (m.lookup(r2) != &x) ++revived;  // counted as a failure too: the new one must live
    REQUIRE(m.remove(r2) == Result::Ok);
    old.push_back(r2);
  }
  CHECK(cycled2 >= max_gen - 2);  // it had used generation 1 already
  CHECK(cycled2 <= max_gen - 1);
  CHECK(last_add == Result::NoMemory);
  CHECK(m.retired() == 2);
  CHECK(revived == 0);
  CHECK(m.size() == 0);

  // Every slot retired: the map refuses for good, and nothing old resolves.
  for (int i = 0; i < 3; ++i) CHECK(m.add(&x, r) == Result::NoMemory);
  CHECK(m.retired() == 2);
  std::size_t alive = 0;
  for (std::uint32_t o : old)
    if (m.lookup(o) != nullptr) ++alive;
  CHECK(alive == 0);
  std::sort(old.begin(), old.end());
  CHECK(std::adjacent_find(old.begin(), old.end()) == old.end());
}

TEST_CASE("refmap: a one-slot map with few generations retires after them") {
  lemsg::RefMap<int, 1, 3> m;
  int x = 0;
  std::uint32_t refs[3] = {};
  int ok = 0;
  for (auto& r : refs) {
    if (m.add(&x, r) != Result::Ok) break;
    ++ok;
    REQUIRE(m.remove(r) == Result::Ok);
  }
  CHECK(ok >= 2);
  std::uint32_t r = 0;
  if (ok == 3) CHECK(m.add(&x, r) == Result::NoMemory);
  CHECK(m.add(&x, r) == Result::NoMemory);
  CHECK(r == 0);
  CHECK(m.retired() == 1);
  CHECK(m.size() == 0);
}

// The library's own handle tables must never run out (a service that
// opens and closes sessions for years): with Wrap a slot that used its last
// generation starts again, and only a reference held stale across all of
// them could resolve again.
TEST_CASE("refmap: a wrapping map's slots never retire, and the last generations' references stay dead") {
  constexpr std::uint32_t max_gen = 5;
  lemsg::RefMap<int, 2, max_gen, true> m;
  int keep = 1, x = 2;
  std::uint32_t keep_ref = 0;
  REQUIRE(m.add(&keep, keep_ref) == Result::Ok);
  std::uint32_t recent[max_gen - 2] = {};  // the references of the last few cycles
  int failed = 0, revived = 0, zero = 0;
  for (int i = 0; i < 100000; ++i) {
    std::uint32_t r = 0;
    if (m.add(&x, r) != Result::Ok) {
      ++failed;
      break;
    }
    if (r == 0) ++zero;
    for (std::uint32_t o : recent)
      if (o && m.lookup(o) != nullptr) ++revived;
    if (m.lookup(r) != &x) ++revived;  // counted as a failure too: the new one must live
    REQUIRE(m.remove(r) == Result::Ok);
    for (std::uint32_t k = max_gen - 3; k > 0; --k) recent[k] = recent[k - 1];
    recent[0] = r;
  }
  CHECK(failed == 0);
  CHECK(zero == 0);
  CHECK(revived == 0);
  CHECK(m.retired() == 0);
  CHECK(m.lookup(keep_ref) == &keep);
  // The default still retires (a user's map asks for Wrap).
  lemsg::RefMap<int, 1, max_gen> retiring;
  std::uint32_t r = 0;
  int added = 0;
  while (retiring.add(&x, r) == Result::Ok && added < 100) {
    ++added;
    REQUIRE(retiring.remove(r) == Result::Ok);
  }
  CHECK(added <= static_cast<int>(max_gen));
  CHECK(retiring.retired() == 1);
}

}  // TEST_SUITE
