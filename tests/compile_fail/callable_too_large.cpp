// Negative compile test: a handler that captures more than
// LEMSG_CALLABLE_SIZE bytes must NOT compile. The build expects this file to
// fail, with the diagnostic naming LEMSG_CALLABLE_SIZE.
//
// Built with -DLEMSG_EXPECT_OK it captures exactly LEMSG_CALLABLE_SIZE bytes
// and must compile: that control shows the failure above comes from the size
// and from nothing else in this file.
#include "lemsg.hpp"

#ifdef LEMSG_EXPECT_OK
#define LEMSG_CAPTURE_BYTES (LEMSG_CALLABLE_SIZE)
#else
#define LEMSG_CAPTURE_BYTES (2 * LEMSG_CALLABLE_SIZE)
#endif

struct Big {
  unsigned char bytes[LEMSG_CAPTURE_BYTES];
};

int main() {
  Big big{};
  big.bytes[0] = 1;
  lemsg::Callable<int()> f = [big] { return static_cast<int>(big.bytes[0]); };
  return f() == 1 ? 0 : 1;
}
