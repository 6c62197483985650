// location_api.hpp: the interface of examples/directory, shared by server.cpp
// (the GNSS app, which registers the service "location") and client.cpp (the
// UI app, which asks for the interface it calls "position"). Which service a
// client's "position" reaches is not in either program: the directory's
// bindings file says it, per user. See server.cpp for how to run it.
#pragma once

#include "lemsg.hpp"

struct Fix {
  std::int32_t lat_e7;  // degrees * 10^7
  std::int32_t lon_e7;
  std::uint8_t satellites;
  lemsg::String<16> source;
};

LEMSG_METHOD(GetFix, lemsg::Void, Fix);

struct LocationApi : lemsg::Interface<GetFix> {
  static constexpr const char* name = "demo.location";
};
