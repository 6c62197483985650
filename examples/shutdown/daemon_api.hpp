// daemon_api.hpp: the interface of examples/shutdown, shared by server.cpp
// (a daemon that shuts down cleanly on SIGTERM) and client.cpp (which sees
// it go). See server.cpp for how to run it.
#pragma once

#include "lemsg.hpp"

struct Version {
  lemsg::String<16> text;
};

LEMSG_METHOD(GetVersion, lemsg::Void, Version);

struct DaemonApi : lemsg::Interface<GetVersion> {
  static constexpr const char* name = "acme.daemon";
};

constexpr const char* kDaemonService = "daemon";
