// gauge_api.hpp: the interface of examples/reconnect, shared by server.cpp (a
// fuel gauge that pushes its level) and client.cpp (which keeps its session
// and its subscription across restarts of the server). See client.cpp for
// how to run it.
#pragma once

#include "lemsg.hpp"

struct Level {
  std::int32_t server_pid;  // which server process sent it: a restart shows
  std::uint32_t seq;        // levels that server sent, from 1
  std::uint8_t percent;
};

LEMSG_METHOD(GetLevel, lemsg::Void, Level);  // the current level
LEMSG_EVENT(LevelChanged, Level);            // each new level, every 200 ms

struct GaugeApi : lemsg::Interface<GetLevel, LevelChanged> {
  static constexpr const char* name = "acme.gauge";
};

constexpr const char* kGaugeService = "gauge";
