// server.cpp: the positioning service of examples/pubsub (the interface is in
// position_api.hpp, the client in client.cpp). Every 100 ms its receiver
// computes a fix, and the service publishes it to every subscribed client.
// It exits 0 once a client has subscribed and left, 1 if none did within 20 s.
//
// Publish/subscribe is done with the typed layer's events (section 12 of
// lemsg.hpp), the idiomatic way: the Service keeps each session's
// subscriptions itself (no list of clients to maintain, nothing to remove
// when a client dies), emit() encodes the event once and sends it only to
// the sessions subscribed to it, and a TypedClient sends its subscriptions
// again by itself after a reconnect. The plain Message API has no
// subscriptions of its own: there a server would keep its SessionRefs and
// Service::send() to each.
//
//   make examples                 builds every example into build/host/examples/
//   make examples TARGET=armhf    the same for ARM, into build/armhf/examples/
// Run it by hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/pubsub/server & build/host/examples/pubsub/client
#include "position_api.hpp"

#include <cstdio>

// The GNSS receiver: a vehicle driving north-west, one fix per period.
struct Receiver {
  Fix fix{0, 48856600, 2352200};
  std::size_t most_subscribers = 0;  // the most sessions a fix went to

  const Fix& next_fix() {
    ++fix.seq;
    fix.latitude += kStepNorth;
    fix.longitude += kStepEast;
    return fix;
  }
};

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<PositionApi, 8> pool;
  lemsg::TypedService<PositionApi> svc(loop, pool);
  Receiver receiver;

  svc.set_handler<GetStatus>([&](lemsg::Responder<GetStatus>& call, lemsg::Void&) {
    const std::size_t n = svc.subscriber_count<PositionFix>();
    std::printf("server: status asked: %u fixes, %u subscriber(s)\n", receiver.fix.seq, static_cast<unsigned>(n));
    (void)call.reply({receiver.fix.seq, static_cast<std::uint8_t>(n)});
  });

  // Each period: a new fix, published to whoever subscribed (emit() costs
  // nothing when nobody did). A subscriber that stops reading is closed
  // with Overflow once its queue is full; the others still get theirs.
  auto publish = [&] {
    const Fix& fix = receiver.next_fix();
    const std::size_t n = svc.subscriber_count<PositionFix>();
    if (n > 0) {
      std::printf("server: fix %u (%d, %d) to %u subscriber(s)\n", fix.seq, fix.latitude, fix.longitude,
                  static_cast<unsigned>(n));
      const lemsg::Result r = svc.emit<PositionFix>(fix);
      if (r != lemsg::Result::Ok) std::printf("server: emit: %s\n", lemsg::to_string(r));
      if (n > receiver.most_subscribers) receiver.most_subscribers = n;
    }
    if (fix.seq == 20000 / kFixPeriodMs) loop.stop();  // no client came and went within 20 s
  };

  // The server's work is done when its client leaves. Its subscription goes
  // with its session: nothing to clean up here.
  svc.service().set_close_handler([&](lemsg::SessionRef, lemsg::Result) { loop.stop(); });
  lemsg::TimerId tick;
  if (loop.add_timer(publish, tick) != lemsg::Result::Ok ||
      loop.arm_timer(tick, kFixPeriodMs, kFixPeriodMs) != lemsg::Result::Ok ||
      svc.advertise(kPositionService) != lemsg::Result::Ok || loop.run() != lemsg::Result::Ok)
    return 1;
  return receiver.most_subscribers > 0 && receiver.fix.seq < 20000 / kFixPeriodMs ? 0 : 1;
}
