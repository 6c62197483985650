// modem_api.hpp: the modem service's interface, declared once and shared by
// examples/modem/server.cpp and examples/modem/client.cpp. It shows lemsg's
// typed layer: plain structs for what travels, one line per method or event,
// and an Interface that lists them. Nothing is generated: the protocol id,
// its version hash and the largest payload are computed from these types at
// compile time, so a client built against a different declaration is
// refused at open (ProtocolMismatch). See server.cpp for how to run it.
#pragma once

#include "lemsg.hpp"

enum class RadioTech : std::uint8_t { None, Gsm, Umts, Lte, Nr };

struct Signal {
  std::int16_t rssi;  // dBm
  std::uint8_t bars;  // 0..5
  RadioTech tech;
};
struct Sms {
  lemsg::String<20> to;
  lemsg::String<160> text;
};
struct SmsId {
  std::uint32_t id;
};
struct Registration {
  bool registered;
  lemsg::String<16> network;
};

LEMSG_METHOD(GetSignal, lemsg::Void, Signal);
LEMSG_METHOD(SendSms, Sms, SmsId);  // `to` not a phone number (or empty): BadParameter
LEMSG_EVENT(RegistrationChanged, Registration);

struct ModemApi : lemsg::Interface<GetSignal, SendSms, RegistrationChanged> {
  static constexpr const char* name = "acme.modem";
};

// The name the server advertises and the client opens.
constexpr const char* kModemService = "modem";
