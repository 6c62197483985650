// server.cpp: the fuel gauge of examples/reconnect. Every 200 ms the level
// drops a little and every subscribed client gets LevelChanged; GetLevel
// answers the current level. Each level carries this process's pid, so the
// client can tell one server run from the next. Kill it (kill -9 is fine)
// and start it again: its client carries on (client.cpp). It exits 0 once a
// client has come and gone, 1 if none did within 30 s.
//
// See client.cpp for how to run the pair.
#include "gauge_api.hpp"

#include <unistd.h>

#include <cstdio>

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<GaugeApi, 8> pool;
  lemsg::TypedService<GaugeApi> svc(loop, pool);
  Level level{static_cast<std::int32_t>(getpid()), 0, 100};
  svc.set_handler<GetLevel>([&level](lemsg::Responder<GetLevel>& call, lemsg::Void&) { (void)call.reply(level); });

  bool client_left = false;
  svc.service().set_close_handler([&](lemsg::SessionRef, lemsg::Result) {
    client_left = true;
    loop.stop();
  });
  lemsg::TimerId tick;
  auto drop = [&] {
    ++level.seq;
    level.percent = static_cast<std::uint8_t>(level.percent > 0 ? level.percent - 1 : 100);
    (void)svc.emit<LevelChanged>(level);
    if (level.seq == 150) loop.stop();  // 30 s: nobody came and left
  };
  if (loop.add_timer(drop, tick) != lemsg::Result::Ok || loop.arm_timer(tick, 200, 200) != lemsg::Result::Ok ||
      svc.advertise(kGaugeService) != lemsg::Result::Ok)
    return 1;
  std::printf("server %d: advertised \"%s\"\n", static_cast<int>(getpid()), kGaugeService);
  std::fflush(stdout);
  if (loop.run() != lemsg::Result::Ok) return 1;
  return client_left ? 0 : 1;
}
