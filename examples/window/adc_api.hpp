// adc_api.hpp: the protocol of examples/window, shared by server.cpp and
// client.cpp, written with the plain Message API (section 8 of lemsg.hpp):
// a Protocol (an id and the largest payload) and the structs that travel.
// Both ends run on one device, built by one compiler, so a struct travels as
// its bytes. See server.cpp for how to run it.
#pragma once

#include "lemsg.hpp"

// A request: one raw sample of the 12-bit ADC, and its place in the batch.
struct Sample {
  std::uint32_t index;
  std::uint32_t raw;  // 0..4095
};
// Its response: the same sample, converted.
struct Converted {
  std::uint32_t index;
  std::uint32_t raw;
  std::uint32_t millivolts;
};

// The largest payload is the larger of the two; both ends must agree on it
// and on the id, or the open is refused (ProtocolMismatch, SizeMismatch).
constexpr lemsg::Protocol kAdcProtocol{"example.adc.v1", sizeof(Converted)};
// The name the server advertises and the client opens.
constexpr const char* kAdcService = "adc";

// The conversion the server makes (3.3 V reference, 12 bits); the client
// uses it only to check the answers.
inline std::uint32_t millivolts_of(std::uint32_t raw) { return raw * 3300u / 4095u; }
