# toolchains/mips.mk: 32-bit MIPS, big-endian, MIPS32 release 2, o32 ABI,
# hard float (routers and set-top boxes; the big-endian target, so byte
# order mistakes show), with Debian's mips-linux-gnu cross toolchain, run
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

CROSS_COMPILE ?= mips-linux-gnu-
CXX = $(CROSS_COMPILE)g++
# The toolchain's default (Debian's mips baseline), spelled out: MIPS32R2,
# o32, hard float, big-endian.
ARCHFLAGS ?= -march=mips32r2 -mabi=32 -mhard-float -EB
# -Wno-psabi: gcc notes ABI changes between compiler versions when some
# aggregates are passed by value; they are not ours to fix and -Werror would
# turn them into errors.
WARNFLAGS_TARGET ?= -Wno-psabi
# Static, so qemu-user needs no target sysroot to run the program.
LDFLAGS_TARGET ?= -static
# MIPS32 has no 64-bit atomic instructions (LL/SC work on 32 bits):
# std::atomic<std::uint64_t> calls into libatomic. A static link takes from
# libatomic only what is used, so this costs nothing when nothing is.
LDLIBS_TARGET ?= -latomic
# 24Kf: a MIPS32R2 core with an FPU, as the hard-float code needs. The CPU is
# pinned so that an instruction it lacks (MIPS32R6, DSP) traps in tests.
EXEC ?= qemu-mips -cpu 24Kf
