# toolchains/aarch64.mk: 64-bit ARM (ARMv8-A), with Debian's
# aarch64-linux-gnu cross toolchain, run under qemu-user. Copy this file into
# your own build if it helps: it only sets variables, and every one of them
# can be overridden from the command line or the environment.
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

CROSS_COMPILE ?= aarch64-linux-gnu-
CXX = $(CROSS_COMPILE)g++
# The toolchain's default, generic ARMv8-A.
ARCHFLAGS ?=
# -Wno-psabi: gcc notes ABI changes between compiler versions when some
# aggregates are passed by value; they are not ours to fix and -Werror would
# turn them into errors.
WARNFLAGS_TARGET ?= -Wno-psabi
# Static, so qemu-user needs no target sysroot to run the program.
LDFLAGS_TARGET ?= -static
LDLIBS_TARGET ?=
EXEC ?= qemu-aarch64
