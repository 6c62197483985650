// position_api.hpp: the interface of examples/pubsub, shared by server.cpp
// and client.cpp: a positioning service that publishes a fix to every
// client subscribed to it (Legato: le_pos_AddMovementHandler). See
// server.cpp for how to run it.
#pragma once

#include "lemsg.hpp"

// One position fix, in millionths of a degree.
struct Fix {
  std::uint32_t seq;  // 1, 2, 3...: one per fix the receiver computed
  std::int32_t latitude;
  std::int32_t longitude;
};
struct PositionStatus {
  std::uint32_t fixes;       // fixes computed so far
  std::uint8_t subscribers;  // sessions subscribed to PositionFix now
};

// An event is the server -> client half of Legato's "ADD_HANDLER": the
// client subscribes, and the server's emit() reaches every subscribed session.
LEMSG_EVENT(PositionFix, Fix);
LEMSG_METHOD(GetStatus, lemsg::Void, PositionStatus);

struct PositionApi : lemsg::Interface<PositionFix, GetStatus> {
  static constexpr const char* name = "acme.position";
};

// The name the server advertises and the client opens.
constexpr const char* kPositionService = "position";
// A fix every kFixPeriodMs; between two fixes the vehicle moves this far
// north and east (in millionths of a degree).
constexpr std::uint32_t kFixPeriodMs = 100;
constexpr std::int32_t kStepNorth = 12;
constexpr std::int32_t kStepEast = -30;
