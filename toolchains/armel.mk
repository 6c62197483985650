# toolchains/armel.mk: 32-bit ARM, soft float, ARMv5TE in ARM mode (old
# routers and gateways), with Debian's arm-linux-gnueabi cross toolchain, run
# under qemu-user. Copy this file into your own build if it helps: it only
# sets variables, and every one of them can be overridden from the command
# line or the environment.
#
#   CROSS_COMPILE     prefix of the toolchain's programs (g++, size, ...)
#   CXX               the C++ compiler
#   ARCHFLAGS         architecture flags, given when compiling and linking
#   WARNFLAGS_TARGET  warning flags this target needs on top of the usual ones
#   LDFLAGS_TARGET    link flags this target needs
#   LDLIBS_TARGET     libraries this target needs
#   EXEC              emulator prefix that runs a built program
#
# lemsg itself needs -std=c++17, and -pthread when a program uses threads.

CROSS_COMPILE ?= arm-linux-gnueabi-
CXX = $(CROSS_COMPILE)g++
ARCHFLAGS ?= -march=armv5te -marm
# -Wno-psabi: gcc notes ABI changes between compiler versions when a struct
# with a bit-field or an over-aligned member is passed by value; they are not
# ours to fix and -Werror would turn them into errors.
WARNFLAGS_TARGET ?= -Wno-psabi
# Static, so qemu-user needs no target sysroot to run the program.
LDFLAGS_TARGET ?= -static
# ARMv5 has no 64-bit atomic instructions: std::atomic<std::uint64_t> (and
# is_lock_free()) call into libatomic. 32-bit atomics, std::mutex and
# std::thread need nothing beyond -pthread. A static link takes from
# libatomic only what is used, so this costs nothing when nothing is.
LDLIBS_TARGET ?= -latomic
# ARM926EJ-S is an ARMv5TE core: an ARMv6+ instruction traps in tests
# instead of passing unnoticed on qemu's default "any" CPU.
EXEC ?= qemu-arm -cpu arm926
