// server.cpp: lemsg inside an application's own poll() loop (examples/ownloop).
//
// Many daemons already have a main loop: a poll() over their own fds (here a
// timerfd that samples a sensor every 100 ms). They need not hand it over to
// lemsg::Loop::run(): the Loop can live inside theirs, as Legato's can
// through le_event_GetFd() and le_event_ServiceLoop(), except that lemsg
// hands over its fds themselves, to go into the same poll(). Each turn:
//   1. our own fds first in the pollfd array, then loop.fill_pollfds() writes
//      lemsg's (its watches: the listening socket, one per client...);
//   2. poll() with loop.next_timeout_ms() (lemsg's timers: handshake and
//      stall deadlines);
//   3. handle our fds, then loop.dispatch() with lemsg's part of the array:
//      it runs the service's handlers and its due timers.
// The service answers GetReading, and emits Sampled to its subscribers when
// our timerfd fires: any lemsg call is fine outside the Loop's handlers, on
// the thread that dispatches it. It exits 0 once a client has come and
// gone, 1 if none did within 20 s.
//
// Why a server and a client (two programs): the client (client.cpp) is an
// ordinary lemsg program and cannot tell that this server runs no Loop::run();
// that is the point, and it is how the two would be deployed.
//
//   make examples     builds both into build/<target>/examples/ownloop/
// By hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/ownloop/server & build/host/examples/ownloop/client
#include "sensor_api.hpp"

#include <poll.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

// The application's own work: a sensor it samples on its timerfd.
struct Sensor {
  Reading last{0, 0};
  // A made-up temperature between 20 and 25 degrees.
  const Reading& sample() {
    ++last.sample;
    last.centi_celsius = static_cast<std::int16_t>(2000 + (last.sample * 37) % 500);
    return last;
  }
};

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<SensorApi, 8> pool;
  lemsg::TypedService<SensorApi> svc(loop, pool);
  Sensor sensor;
  sensor.sample();  // a first reading before anyone asks
  bool client_left = false;
  svc.set_handler<GetReading>([&](lemsg::Responder<GetReading>& call, lemsg::Void&) { (void)call.reply(sensor.last); });
  svc.service().set_close_handler([&](lemsg::SessionRef, lemsg::Result) { client_left = true; });

  const int tick = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  const struct itimerspec every_100ms = {{0, 100000000}, {0, 100000000}};
  if (tick < 0 || timerfd_settime(tick, 0, &every_100ms, nullptr) != 0 ||
      svc.advertise(kSensorService) != lemsg::Result::Ok)
    return 1;

  // Room for our fd, and for every fd the Loop can have: LEMSG_MAX_WATCHES
  // watches and its wake-up eventfd (for Loop::post() from other threads).
  struct pollfd fds[1 + LEMSG_MAX_WATCHES + 1];
  const std::size_t room = sizeof fds / sizeof fds[0] - 1;
  int rc = 1;
  while (sensor.last.sample < 200) {  // 20 s
    fds[0] = {tick, POLLIN, 0};
    // lemsg's part, filled again each turn: a client that connects or
    // leaves adds or removes a watch.
    std::size_t n = 0;
    if (loop.fill_pollfds(fds + 1, room, n) != lemsg::Result::Ok) break;
    // Our timerfd needs no timeout of its own; with timeouts of your own,
    // wait for the earlier of yours and next_timeout_ms() (-1: none).
    if (poll(fds, 1 + n, loop.next_timeout_ms()) < 0) {
      if (errno != EINTR) break;
      for (std::size_t i = 0; i <= n; ++i) fds[i].revents = 0;
    }
    std::uint64_t ticks;
    if ((fds[0].revents & POLLIN) && read(tick, &ticks, sizeof ticks) == sizeof ticks) {
      const Reading& now = sensor.sample();
      (void)svc.emit<Sampled>(now);  // to every subscriber (none: nothing sent)
    }
    // Every turn, even when poll() timed out: that is when lemsg's timers run.
    const lemsg::Result r = loop.dispatch(fds + 1, n);
    if (r != lemsg::Result::Ok && r != lemsg::Result::Timeout) break;
    if (client_left) {
      std::printf("server: a client came and left; %u samples taken\n", sensor.last.sample);
      rc = 0;
      break;
    }
  }
  close(tick);
  return rc;
}
