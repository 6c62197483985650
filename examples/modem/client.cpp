// client.cpp: a client of the modem service of examples/modem (server.cpp;
// the interface is in modem_api.hpp), written with lemsg's typed layer. It
// reads the signal, sends one SMS, checks that an SMS with no number is
// refused, then shows the next three RegistrationChanged events the server
// pushes, reading the signal again after each with an asynchronous call.
// Exits 0 when all of that happened as expected, 1 otherwise.
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

// What the client shows: a phone's status bar, with the network and its signal.
struct StatusBar {
  int changes = 0;       // network changes seen
  int registered = 0;    // of which registrations on a named network
  int signal_reads = 0;  // signals read and shown

  // The signal as bars: "|||.." for three of five.
  void show(const Signal& signal) {
    char bars[] = ".....";
    for (unsigned i = 0; i < signal.bars && i < 5; ++i) bars[i] = '|';
    std::printf("client: signal %s %d dBm, %s\n", bars, signal.rssi, radio_name(signal.tech));
    ++signal_reads;
  }
  void show(const Registration& reg) {
    std::printf("client: %s%s\n", reg.registered ? "registered on " : "no network", reg.network.c_str());
    ++changes;
    registered += reg.registered && !reg.network.empty();
  }
};

int main() {
  StatusBar bar;  // before the client, which completes its pending calls into it as it goes
  lemsg::Loop loop;
  lemsg::TypedPool<ModemApi, 4> pool;
  lemsg::TypedClient<ModemApi> modem(loop, pool);
  if (modem.open_sync(kModemService, 5000) != lemsg::Result::Ok) return 1;

  Signal signal;
  const lemsg::Result got_signal = modem.call<GetSignal>({}, signal, 2000);
  bar.show(signal);

  SmsId sms;
  const lemsg::Result sent = modem.call<SendSms>({"+15550100", "Meet you at the gate at 8"}, sms, 2000);
  std::printf("client: SMS sent as number %u\n", sms.id);
  SmsId none;
  const lemsg::Result refused = modem.call<SendSms>({"", "to nobody"}, none, 2000);
  std::printf("client: an SMS without a number: %s\n", lemsg::to_string(refused));

  // The next three network changes, as the server pushes them; after each,
  // the signal is read again, with a call that answers later on the loop.
  (void)modem.subscribe<RegistrationChanged>([&](Registration& reg) {
    bar.show(reg);
    (void)modem.call_async<GetSignal>({}, [&bar](lemsg::Result r, Signal& now) {
      if (r == lemsg::Result::Ok) bar.show(now);
    });
  });
  for (int i = 0; i < 100 && bar.signal_reads < 4; ++i) (void)loop.run_once(50);

  // Three changes are: the network lost, a roaming partner, home again.
  const bool expected = got_signal == lemsg::Result::Ok && signal.rssi < 0 && signal.bars <= 5 && sent == lemsg::Result::Ok &&
                        sms.id == 1 && refused == lemsg::Result::BadParameter && bar.changes == 3 &&
                        bar.registered == 2 && bar.signal_reads == 4;
  return expected ? 0 : 1;
}
