// client.cpp: a client of the ADC service of examples/window (server.cpp; the
// protocol is in adc_api.hpp). It has 40 raw samples converted, with up to
// kWindow requests in flight: rather than wait a round trip for each
// answer, it sends kWindow requests, then one more each time an answer comes
// back. Each request has its own response handler, which checks its answer,
// whatever the order the answers come in. Exits 0 when every answer was
// right and the window was full at some point, 1 otherwise.
//
//   make examples                 builds every example into build/host/examples/
//   make examples TARGET=armhf    the same for ARM, into build/armhf/examples/
// Run it by hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/window/server & build/host/examples/window/client
#include "adc_api.hpp"

#include <cstdio>
#include <cstring>

constexpr std::uint32_t kSamples = 40;
// A Session waits on at most LEMSG_MAX_PENDING requests (one more is refused
// with PendingTableFull), so the window is 8 or that, whichever is smaller.
constexpr std::size_t kWindow = LEMSG_MAX_PENDING < 8 ? LEMSG_MAX_PENDING : 8;

// The samples: made up, all different.
std::uint32_t raw_sample(std::uint32_t i) { return (i * 997u + 123u) % 4096u; }

struct Batch {
  lemsg::Session& session;
  std::uint32_t sent = 0;
  std::uint32_t converted = 0;  // right answers
  std::uint32_t failed = 0;     // wrong answers, failed requests, or a request that could not go
  std::uint32_t highest = 0;    // the highest sample answered so far
  std::uint32_t reordered = 0;  // answers that came after a later sample's
  std::size_t most_in_flight = 0;

  bool done() const { return converted + failed >= kSamples; }

  // Sends samples until the window is full or none is left. Called once,
  // then from each response handler: a completed request has left its
  // pending slot before its handler runs, so the window has room again.
  void fill() {
    while (sent < kSamples && session.pending_count() < kWindow) {
      const Sample s{sent, raw_sample(sent)};
      lemsg::Message m;
      lemsg::Result r = session.create_message(m);
      if (r == lemsg::Result::Ok) r = m.assign(&s, sizeof s);
      // The handler runs exactly once, on the loop: with the answer, or with
      // Closed, Timeout (10 s, for the slowest emulator) or Unanswered. It
      // keeps a copy of its sample: that is how it knows its answer.
      if (r == lemsg::Result::Ok)
        r = session.request(
            std::move(m), [this, s](lemsg::Result why, lemsg::Message& answer) { check(s, why, answer); }, 10000);
      if (r != lemsg::Result::Ok) {
        std::printf("client: sample %u not sent: %s\n", s.index, lemsg::to_string(r));
        failed += kSamples - sent;  // nothing more goes
        sent = kSamples;
        return;
      }
      ++sent;
      if (session.pending_count() > most_in_flight) most_in_flight = session.pending_count();
    }
  }

  void check(const Sample& s, lemsg::Result why, lemsg::Message& answer) {
    Converted c{};
    const bool got = why == lemsg::Result::Ok && answer.size() == sizeof c;
    if (got) std::memcpy(&c, answer.payload(), sizeof c);
    if (!got || c.index != s.index || c.raw != s.raw || c.millivolts != millivolts_of(s.raw)) {
      std::printf("client: sample %u: %s\n", s.index, got ? "wrong answer" : lemsg::to_string(why));
      ++failed;
    } else {
      ++converted;
      if (s.index < highest) ++reordered;
      if (s.index > highest) highest = s.index;
    }
    fill();  // the window has room for one more
  }
};

int main() {
  lemsg::Loop loop;
  // Blocks for the window's requests (while the socket takes them they go at
  // once, but a full socket queues them), the answer being handled, and the
  // request its handler sends.
  lemsg::MessagePool<kAdcProtocol.max_payload, kWindow + 2> pool;
  lemsg::Session session(loop, kAdcProtocol, pool);
  Batch batch{session};
  if (session.open_sync(kAdcService, 10000) != lemsg::Result::Ok) return 1;

  batch.fill();
  // At most 20 s even under an emulator: each run_once() waits 50 ms at most.
  for (int i = 0; i < 400 && !batch.done(); ++i) (void)loop.run_once(50);
  // Requests still pending (none, unless something went wrong) complete with
  // Closed here, while `batch`, which their handlers use, still exists.
  session.close();

  std::printf("client: %u of %u samples converted, at most %u in flight (window %u), %u answered after a later one\n",
              batch.converted, kSamples, static_cast<unsigned>(batch.most_in_flight), static_cast<unsigned>(kWindow),
              batch.reordered);
  return batch.converted == kSamples && batch.failed == 0 && batch.most_in_flight == kWindow ? 0 : 1;
}
