// server.cpp: the modem service of examples/modem, with lemsg's typed layer
// (section 12 of lemsg.hpp). It answers GetSignal and SendSms (an SMS with
// no number is refused: BadParameter) and pushes RegistrationChanged to every
// subscribed client every 500 ms. The interface is in modem_api.hpp; the
// client is client.cpp. The server exits 0 once a client has come and gone,
// 1 if none did within 10 s.
//
//   make examples                 build both for the host and run them
//   make examples TARGET=armhf    the same, built for ARM and run under qemu-arm
// By hand (a private runtime directory instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/modem/server & build/host/examples/modem/client
#include "modem_api.hpp"

#include <cstdio>

namespace {

// The modem: its radio, the SMS it sent, and a network that keeps changing
// (searching, then the home network, then a roaming partner, and again).
struct Modem {
  Signal signal{-71, 3, RadioTech::Lte};
  std::uint32_t sms_sent = 0;
  unsigned changes = 0;

  Registration next_registration() {
    switch (changes++ % 3) {
      case 0: return {false, ""};
      case 1: return {true, "Acme"};
      default: return {true, "Roamer"};
    }
  }
};

}  // namespace

int main() {
  lemsg::Loop loop;
  lemsg::TypedPool<ModemApi, 8> pool;
  lemsg::TypedService<ModemApi> svc(loop, pool);
  Modem modem;
  int status = 1;

  svc.set_handler<GetSignal>([&](lemsg::Responder<GetSignal>& call, lemsg::Void&) {
    (void)call.reply(modem.signal);
  });
  svc.set_handler<SendSms>([&](lemsg::Responder<SendSms>& call, Sms& sms) {
    if (sms.to.empty()) {
      (void)call.fail(lemsg::Result::BadParameter);
      return;
    }
    std::printf("server: SMS %u to %s: \"%s\"\n", ++modem.sms_sent, sms.to.c_str(), sms.text.c_str());
    (void)call.reply({modem.sms_sent});
  });
  svc.service().set_close_handler([&](lemsg::SessionRef, lemsg::Result) {
    std::printf("server: the client left after %u SMS\n", modem.sms_sent);
    status = 0;
    loop.stop();
  });
  // Every 500 ms the network changes; after 20 changes (10 s) the modem gives up.
  lemsg::TimerId tick;
  auto on_tick = [&] {
    const Registration reg = modem.next_registration();
    (void)svc.emit<RegistrationChanged>(reg);
    if (modem.changes == 20) loop.stop();
  };
  if (loop.add_timer(on_tick, tick) != lemsg::Result::Ok || loop.arm_timer(tick, 500, 500) != lemsg::Result::Ok ||
      svc.advertise(kModemService) != lemsg::Result::Ok || loop.run() != lemsg::Result::Ok)
    return 2;
  return status;
}
