// sensor_api.hpp: the interface of examples/ownloop, shared by server.cpp (a
// daemon that runs its own poll() loop and serves lemsg from it) and
// client.cpp (an ordinary lemsg client). See server.cpp for how to run it.
#pragma once

#include "lemsg.hpp"

struct Reading {
  std::uint32_t sample;        // samples taken since the server started
  std::int16_t centi_celsius;  // the last one, in 1/100 degrees
};

LEMSG_METHOD(GetReading, lemsg::Void, Reading);  // the last sample
LEMSG_EVENT(Sampled, Reading);                   // each new sample

struct SensorApi : lemsg::Interface<GetReading, Sampled> {
  static constexpr const char* name = "acme.sensor";
};

constexpr const char* kSensorService = "sensor";
