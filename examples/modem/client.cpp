// client.cpp: a client of the modem service of examples/modem (server.cpp;
// the interface is in modem_api.hpp), written with lemsg's typed layer. It
// reads the signal, sends one SMS, checks that an SMS with no number is
// refused, then prints the next three RegistrationChanged events the server
// pushes. Exits 0 when all of that happened as expected, 1 otherwise.
//
//   make examples                 build server and client for the host, run both
//   make examples TARGET=armhf    the same, built for ARM and run under qemu-arm
// By hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/modem/server & build/host/examples/modem/client
#include "modem_api.hpp"

#include <cstdio>

const char* radio_name(RadioTech tech) {
  switch (tech) {
    case RadioTech::Gsm: return "2G";
    case RadioTech::Umts: return "3G";
    case RadioTech::Lte: return "4G";
    case RadioTech::Nr: return "5G";
    default: return "no radio";
  }
}

// The signal as a status bar draws it: "|||.." for three bars of five.
void print_signal(const Signal& signal) {
  char bars[] = ".....";
  for (unsigned i = 0; i < signal.bars && i < 5; ++i) bars[i] = '|';
  std::printf("client: signal %s %d dBm, %s\n", bars, signal.rssi, radio_name(signal.tech));
}

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<ModemApi, 4> pool;
  lemsg::TypedClient<ModemApi> modem(loop, pool);
  if (modem.open_sync(kModemService, 5000) != lemsg::Result::Ok) return 1;

  Signal signal;
  const lemsg::Result got_signal = modem.call<GetSignal>({}, signal, 2000);
  print_signal(signal);

  SmsId sms;
  const lemsg::Result sent = modem.call<SendSms>({"+15550100", "Meet you at the gate at 8"}, sms, 2000);
  std::printf("client: SMS sent as number %u\n", sms.id);
  SmsId none;
  const lemsg::Result refused = modem.call<SendSms>({"", "to nobody"}, none, 2000);
  std::printf("client: an SMS without a number: %s\n", lemsg::to_string(refused));

  // The next three network changes, as the server pushes them.
  int changes = 0, registered = 0;
  (void)modem.subscribe<RegistrationChanged>([&](Registration& reg) {
    std::printf("client: %s%s\n", reg.registered ? "registered on " : "no network", reg.network.c_str());
    ++changes;
    registered += reg.registered && !reg.network.empty();
  });
  for (int i = 0; i < 100 && changes < 3; ++i) (void)loop.run_once(50);

  // Three changes include the lost network and two registrations.
  const bool expected = got_signal == lemsg::Result::Ok && signal.bars > 0 && sent == lemsg::Result::Ok &&
                        sms.id == 1 && refused == lemsg::Result::BadParameter && changes == 3 && registered == 2;
  return expected ? 0 : 1;
}
