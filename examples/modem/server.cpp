// server.cpp: the modem service of examples/modem, written with lemsg's typed
// layer (section 12 of lemsg.hpp); the interface is in modem_api.hpp, the
// client in client.cpp. The modem answers GetSignal and SendSms (an SMS to
// something that is not a phone number, an empty one included, is refused
// with BadParameter), and every 500 ms its network changes and every
// subscribed client gets RegistrationChanged. It exits 0 once a client has
// sent an SMS and left, 1 if none did within 10 s.
//
//   make examples                 build server and client for the host, run both
//   make examples TARGET=armhf    the same, built for ARM and run under qemu-arm
// By hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/modem/server & build/host/examples/modem/client
#include "modem_api.hpp"

#include <cstdio>
#include <cstring>

// The modem: a network that comes and goes (the home network, lost, a roaming
// partner, and around again), a signal that follows it, and the SMS it sent.
struct Modem {
  Registration registration{true, "Acme"};
  Signal signal{-71, bars_for(-71), RadioTech::Lte};
  std::uint32_t sms_sent = 0;
  unsigned changes = 0;

  // Bars as a phone shows them: one per 10 dB above -120 dBm, at most 5.
  static std::uint8_t bars_for(int rssi) {
    const int bars = (rssi + 120) / 10;
    return static_cast<std::uint8_t>(bars < 0 ? 0 : bars > 5 ? 5 : bars);
  }

  // A phone number: an optional '+', then 3 to 15 digits (E.164).
  static bool is_number(const lemsg::String<20>& to) {
    const char* digits = to.c_str() + (to.c_str()[0] == '+');
    const std::size_t n = std::strspn(digits, "0123456789");
    return digits[n] == '\0' && n >= 3 && n <= 15;
  }

  // The next step of the network's story.
  const Registration& change_network() {
    switch (++changes % 3) {
      case 0:
        registration = {true, "Acme"};
        signal = {-71, bars_for(-71), RadioTech::Lte};
        break;
      case 1:
        registration = {false, ""};
        signal = {-113, 0, RadioTech::None};
        break;
      default:
        registration = {true, "Roamer"};
        signal = {-94, bars_for(-94), RadioTech::Umts};
        break;
    }
    std::printf("server: network %s, signal %d dBm\n", registration.registered ? registration.network.c_str() : "lost",
                signal.rssi);
    return registration;
  }
};

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<ModemApi, 8> pool;
  lemsg::TypedService<ModemApi> svc(loop, pool);
  Modem modem;

  svc.set_handler<GetSignal>([&](lemsg::Responder<GetSignal>& call, lemsg::Void&) {
    (void)call.reply(modem.signal);
  });
  svc.set_handler<SendSms>([&](lemsg::Responder<SendSms>& call, Sms& sms) {
    if (!Modem::is_number(sms.to)) {
      std::printf("server: refused an SMS to \"%s\"\n", sms.to.c_str());
      (void)call.fail(lemsg::Result::BadParameter);
      return;
    }
    std::printf("server: SMS %u to %s: \"%s\"\n", ++modem.sms_sent, sms.to.c_str(), sms.text.c_str());
    (void)call.reply({modem.sms_sent});
  });
  // Every 500 ms the network changes, and every subscribed client hears of it.
  auto change_network = [&] {
    (void)svc.emit<RegistrationChanged>(modem.change_network());
    if (modem.changes == 20) loop.stop();  // no client came and went within 10 s
  };

  // The server's work is done when its client leaves.
  svc.service().set_close_handler([&](lemsg::SessionRef, lemsg::Result) { loop.stop(); });
  lemsg::TimerId tick;
  if (loop.add_timer(change_network, tick) != lemsg::Result::Ok || loop.arm_timer(tick, 500, 500) != lemsg::Result::Ok ||
      svc.advertise(kModemService) != lemsg::Result::Ok || loop.run() != lemsg::Result::Ok)
    return 1;
  return modem.sms_sent > 0 && modem.changes < 20 ? 0 : 1;
}
