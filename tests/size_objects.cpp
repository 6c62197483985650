// Static RAM of lemsg's objects with the default capacities: one array the
// size of each, which `make size` measures with nm (compiled, never run)
// and checks against the table in the README's "Memory" section.
#include "lemsg.hpp"

#define LEMSG_SIZE_OF(name, ...) extern unsigned char lemsg_size_of_##name[sizeof(__VA_ARGS__)]; \
  unsigned char lemsg_size_of_##name[sizeof(__VA_ARGS__)]

LEMSG_SIZE_OF(Loop, lemsg::Loop);
LEMSG_SIZE_OF(Service, lemsg::Service);
LEMSG_SIZE_OF(Session, lemsg::Session);
LEMSG_SIZE_OF(MessagePool_256x16, lemsg::MessagePool<256, 16>);
LEMSG_SIZE_OF(Directory, lemsg::Directory);
