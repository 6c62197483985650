// One example's programs, for tests/examples.cpp: included (with no guard,
// once per example) inside that example's namespace, after it defines
// LEMSG_EXAMPLE_API, LEMSG_EXAMPLE_SERVER and LEMSG_EXAMPLE_CLIENT as the
// paths of its interface header, server and client. The interface comes
// first, so its #pragma once keeps the programs' own #include of it out and
// both see the one declaration; each main() becomes server::run or
// client::run, and no name of one example can clash with another's or with
// another test file's in the unity build.
#include LEMSG_EXAMPLE_API
namespace server {
#define main run
#include LEMSG_EXAMPLE_SERVER
#undef main
}  // namespace server
namespace client {
#define main run
#include LEMSG_EXAMPLE_CLIENT
#undef main
}  // namespace client
#undef LEMSG_EXAMPLE_API
#undef LEMSG_EXAMPLE_SERVER
#undef LEMSG_EXAMPLE_CLIENT
