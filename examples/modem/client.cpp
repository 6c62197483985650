// client.cpp: a client of the modem service of examples/modem (server.cpp),
// with lemsg's typed layer: it reads the signal, sends one SMS, checks that
// an SMS with no number is refused, then prints three RegistrationChanged
// events. Exits 0 when all of that happened as expected, 1 otherwise.
//
//   make examples                 build server and client for the host, run both
//   make examples TARGET=armhf    the same, built for ARM and run under qemu-arm
// By hand (a private runtime directory instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/modem/server & build/host/examples/modem/client
#include "modem_api.hpp"

#include <cstdio>

namespace {

const char* radio_name(RadioTech t) {
  switch (t) {
    case RadioTech::Gsm: return "2G";
    case RadioTech::Umts: return "3G";
    case RadioTech::Lte: return "4G";
    case RadioTech::Nr: return "5G";
    default: return "no radio";
  }
}

}  // namespace

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<ModemApi, 4> pool;
  lemsg::TypedClient<ModemApi> modem(loop, pool);
  if (modem.open_sync(kModemService, 5000) != lemsg::Result::Ok) return 1;

  Signal signal;
  const lemsg::Result got = modem.call<GetSignal>({}, signal, 2000);
  std::printf("client: signal %d dBm, %u/5 bars, %s\n", signal.rssi, signal.bars, radio_name(signal.tech));

  SmsId sms;
  const lemsg::Result sent = modem.call<SendSms>({"+15550100", "Meet at the gate at 8"}, sms, 2000);
  std::printf("client: SMS sent as number %u\n", sms.id);
  SmsId none;
  const lemsg::Result refused = modem.call<SendSms>({"", "to nobody"}, none, 2000);
  std::printf("client: an SMS without a number: %s\n", lemsg::to_string(refused));

  int changes = 0;
  (void)modem.subscribe<RegistrationChanged>([&](Registration& reg) {
    std::printf("client: %s %s\n", reg.registered ? "registered on" : "searching", reg.network.c_str());
    ++changes;
  });
  for (int i = 0; i < 100 && changes < 3; ++i) (void)loop.run_once(50);

  const bool expected = got == lemsg::Result::Ok && signal.bars <= 5 && sent == lemsg::Result::Ok &&
                        sms.id == 1 && refused == lemsg::Result::BadParameter && changes == 3;
  return expected ? 0 : 1;
}
