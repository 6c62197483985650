// Fuzz target: the wire decoder, wire::decode(), on any bytes.
//
// Input: u32 max_payload, then the datagram. Invariants: decode() reads only
// the bytes it is given (ASan), and when it says Ok the header is what the
// layout in lemsg.hpp section 5 promises: length is exactly what arrived,
// within the maximum for frames that carry a payload, txn non-zero exactly on
// Request and Response, only known flags and types, and encode() writes the
// same 16 bytes back.
#include "fuzz.hpp"

namespace wire = lemsg::wire;
using lemsg::Result;

LEMSG_FUZZ_TARGET(wire) {
  fuzz::Input in{data, size};
  const std::uint32_t max_payload = in.u32();
  // A copy of exactly the rest, so ASan sees a read past what arrived.
  const std::size_t n = size - in.i;
  unsigned char* buf = static_cast<unsigned char*>(std::malloc(n ? n : 1));
  FUZZ_CHECK(buf != nullptr);
  if (n) std::memcpy(buf, data + in.i, n);
  wire::Header h;
  h.length = 0xdeadbeef;
  const Result r = wire::decode(n ? buf : nullptr, n, max_payload, h);
  FUZZ_CHECK(r == Result::Ok || r == Result::BadFrame || r == Result::TooLarge);
  if (r == Result::Ok) {
    FUZZ_CHECK(n >= wire::header_size);
    FUZZ_CHECK(h.length == n - wire::header_size);
    const auto t = static_cast<std::uint8_t>(h.type);
    FUZZ_CHECK(t >= 1 && t <= 6);
    FUZZ_CHECK((h.flags & ~(wire::FlagFd | wire::FlagError)) == 0);
    const bool has_txn = h.type == wire::FrameType::Request || h.type == wire::FrameType::Response;
    FUZZ_CHECK(has_txn == (h.txn != 0));
    const bool payload = h.type == wire::FrameType::Message || has_txn;
    if (payload && !(h.flags & wire::FlagError)) FUZZ_CHECK(h.length <= max_payload);
    if (h.flags & wire::FlagError) FUZZ_CHECK(h.length == 4 && !(h.flags & wire::FlagFd));
    if (h.flags & wire::FlagFd) FUZZ_CHECK(payload);
    if (h.type == wire::FrameType::Welcome) FUZZ_CHECK(h.length == 0);
    if (h.type == wire::FrameType::Refuse) FUZZ_CHECK(h.flags == wire::FlagError);
    if (h.type == wire::FrameType::Hello) FUZZ_CHECK(h.length >= 8 && h.length <= 8 + LEMSG_MAX_PROTOCOL_ID);
    unsigned char again[wire::header_size];
    wire::encode(h, again);
    FUZZ_CHECK(std::memcmp(again, buf, wire::header_size) == 0);
  } else {
    FUZZ_CHECK(h.length == 0xdeadbeef);  // nothing half-written on failure
  }
  std::free(buf);
  return 0;
}
