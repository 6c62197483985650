// server.cpp: the ADC service of examples/window (the protocol is in
// adc_api.hpp, the client in client.cpp), written with the plain Message
// API. Each request carries a raw ADC sample; the answer is its value in
// millivolts. To show that a client must not count on the order of answers,
// it keeps every other request back and answers it after the next one (or
// after 20 ms when no next one comes). It exits 0 once a client came, had
// its requests answered, and left; 1 if none did within 20 s.
//
//   make examples                 builds every example into build/host/examples/
//   make examples TARGET=armhf    the same for ARM, into build/armhf/examples/
// Run it by hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/window/server & build/host/examples/window/client
#include "adc_api.hpp"

#include <cstdio>
#include <cstring>

struct Adc {
  lemsg::Loop& loop;
  lemsg::Service& svc;
  lemsg::TimerId hold_timer;  // answers a request kept back too long
  lemsg::Message held;        // a request kept back, answered after the next one
  unsigned answered = 0;
  unsigned reordered = 0;  // answered after a request that came later

  // Answers a request (le_msg_Respond): the answer is written into the
  // request's own block, and respond() consumes it, so a request is
  // answered at most once. A request of the wrong size is released
  // unanswered: the client's request then completes with Unanswered.
  void answer(lemsg::Message& m) {
    Sample s;
    if (m.size() == sizeof s) {
      std::memcpy(&s, m.payload(), sizeof s);
      const Converted c{s.index, s.raw, millivolts_of(s.raw)};
      lemsg::Result r = m.assign(&c, sizeof c);
      if (r == lemsg::Result::Ok) r = svc.respond(std::move(m));
      if (r == lemsg::Result::Ok) ++answered;
      // Closed: the client left meanwhile, and nobody waits for the answer.
      if (r != lemsg::Result::Ok && r != lemsg::Result::Closed) std::printf("server: %s\n", lemsg::to_string(r));
    }
    m.release();
  }

  // The receive handler: a Message the handler may keep (move it away) to
  // answer later, as Legato's le_msg_Respond may come after the handler.
  void on_request(lemsg::Message& m) {
    if (!m.needs_response()) return;  // a one-way message: this protocol has none
    if (!held) {
      held = std::move(m);
      (void)loop.arm_timer(hold_timer, 20);
      return;
    }
    (void)loop.disarm_timer(hold_timer);
    answer(m);     // the newer one first,
    answer(held);  // then the one kept back
    ++reordered;
  }
};

int main() {
  lemsg::Loop loop;
  lemsg::MessagePool<kAdcProtocol.max_payload, 16> pool;
  lemsg::Service svc(loop, kAdcProtocol, pool);
  Adc adc{loop, svc, {}, {}};

  svc.set_receive_handler([&adc](lemsg::Message& m) { adc.on_request(m); });
  // The server's work is done when its client leaves.
  svc.set_close_handler([&](lemsg::SessionRef, lemsg::Result) { loop.stop(); });
  lemsg::TimerId give_up;
  if (loop.add_timer([&adc] { adc.answer(adc.held); }, adc.hold_timer) != lemsg::Result::Ok ||
      loop.add_timer([&loop] { loop.stop(); }, give_up) != lemsg::Result::Ok ||
      loop.arm_timer(give_up, 20000) != lemsg::Result::Ok || svc.advertise(kAdcService) != lemsg::Result::Ok ||
      loop.run() != lemsg::Result::Ok)
    return 1;
  std::printf("server: %u samples converted, %u of them answered after a later one\n", adc.answered, adc.reordered);
  return adc.answered > 0 && loop.is_armed(give_up) ? 0 : 1;
}
