// client.cpp: an ordinary client of examples/ownloop's sensor (server.cpp,
// which runs lemsg inside its own poll() loop; nothing here knows that). It
// reads the sensor, subscribes to its samples and takes three, then reads it
// again. Exits 0 when the samples came in order and the second reading is at
// least as new as the last sample, 1 otherwise.
//
//   make examples     builds both into build/<target>/examples/ownloop/
// By hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/ownloop/server & build/host/examples/ownloop/client
#include "sensor_api.hpp"

#include <cstdio>

void show(const char* what, const Reading& r) {
  std::printf("client: %s #%u: %d.%02d C\n", what, r.sample, r.centi_celsius / 100, r.centi_celsius % 100);
}

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<SensorApi, 4> pool;
  lemsg::TypedClient<SensorApi> sensor(loop, pool);
  if (sensor.open_sync(kSensorService, 5000) != lemsg::Result::Ok) return 1;

  Reading first{0, 0};
  if (sensor.call<GetReading>({}, first, 2000) != lemsg::Result::Ok) return 1;
  show("reading", first);

  // The server samples every 100 ms on its own timerfd and emits each one.
  struct Samples {
    int count = 0;
    bool in_order = true;
    Reading last{0, 0};
  } samples;
  const lemsg::Result subscribed = sensor.subscribe<Sampled>([&samples](Reading& r) {
    samples.in_order = samples.in_order && r.sample > samples.last.sample;
    samples.last = r;
    ++samples.count;
    show("sample", r);
  });
  if (subscribed != lemsg::Result::Ok) return 1;
  for (int i = 0; i < 200 && samples.count < 3; ++i) (void)loop.run_once(50);

  Reading again{0, 0};
  const lemsg::Result got = sensor.call<GetReading>({}, again, 2000);
  show("reading", again);
  const bool expected = samples.count >= 3 && samples.in_order && samples.last.sample > first.sample &&
                        got == lemsg::Result::Ok && again.sample >= samples.last.sample;
  return expected ? 0 : 1;
}
