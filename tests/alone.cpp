// lemsg.hpp on its own: this file includes nothing else and is compiled (not
// linked) with every warning an error, to show the header is self-contained.
#include "lemsg.hpp"

int lemsg_alone_check();

int lemsg_alone_check() { return LEMSG_VERSION_MAJOR * 10000 + LEMSG_VERSION_MINOR * 100 + LEMSG_VERSION_PATCH; }
