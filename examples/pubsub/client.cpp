// client.cpp: a client of the positioning service of examples/pubsub
// (server.cpp; the interface is in position_api.hpp). It subscribes to
// PositionFix, takes five fixes as the server publishes them, unsubscribes,
// and asks the server for its status, which must show no subscriber left.
// Exits 0 when the fixes came in order, none missing, each one step further
// on, and the unsubscription took; 1 otherwise.
//
//   make examples                 builds every example into build/host/examples/
//   make examples TARGET=armhf    the same for ARM, into build/armhf/examples/
// Run it by hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/pubsub/server & build/host/examples/pubsub/client
#include "position_api.hpp"

#include <cstdio>

constexpr int kWanted = 5;

// What the client makes of the fixes: a track, checked as it grows.
struct Track {
  int fixes = 0;  // fixes received
  int wrong = 0;  // of which not the one after the one before
  Fix last{};

  void add(const Fix& fix) {
    std::printf("client: fix %u at (%d, %d)\n", fix.seq, fix.latitude, fix.longitude);
    // The first fix may be any; each next one must follow it: events of one
    // session arrive in order and none is dropped (a subscriber too slow to
    // read would have its session closed, never miss one silently).
    if (fixes > 0 && (fix.seq != last.seq + 1 || fix.latitude != last.latitude + kStepNorth ||
                      fix.longitude != last.longitude + kStepEast))
      ++wrong;
    last = fix;
    ++fixes;
  }
};

int main() {
  Track track;  // before the client, whose handler refers to it
  lemsg::Loop loop;
  lemsg::TypedPool<PositionApi, 8> pool;
  lemsg::TypedClient<PositionApi> position(loop, pool);
  if (position.open_sync(kPositionService, 10000) != lemsg::Result::Ok) return 1;

  // Legato's le_pos_AddMovementHandler: the handler runs on this loop for
  // each fix. The subscription is kept by the client: were the server to
  // restart (with set_reconnect on), it would be sent again by itself.
  // After the fifth fix the handler unsubscribes (le_pos_RemoveMovementHandler),
  // which a handler may do to itself: fixes the server sent before it heard
  // of it are dropped here, unseen.
  lemsg::Result unsubscribed = lemsg::Result::Timeout;
  const lemsg::Result subscribed = position.subscribe<PositionFix>([&](Fix& fix) {
    track.add(fix);
    if (track.fixes == kWanted) unsubscribed = position.unsubscribe<PositionFix>();
  });
  // At most 20 s even under an emulator: each run_once() waits 50 ms at most.
  for (int i = 0; i < 400 && position.is_subscribed<PositionFix>(); ++i) (void)loop.run_once(50);

  // The server handles a session's frames in order, so by the time it
  // answers this call it has taken the unsubscription.
  PositionStatus status{};
  const lemsg::Result asked = position.call<GetStatus>({}, status, 10000);
  std::printf("client: %d fixes, %d out of step; the server computed %u and has %u subscriber(s)\n", track.fixes,
              track.wrong, status.fixes, static_cast<unsigned>(status.subscribers));
  position.close();

  const bool expected = subscribed == lemsg::Result::Ok && track.fixes == kWanted && track.wrong == 0 &&
                        unsubscribed == lemsg::Result::Ok && asked == lemsg::Result::Ok &&
                        status.subscribers == 0 && status.fixes >= track.last.seq;
  return expected ? 0 : 1;
}
