# toolchains/armhf.mk: 32-bit ARM, hard float, Cortex-A7 class (the modem
# target), with Debian's arm-linux-gnueabihf cross toolchain, run under
# qemu-user. Copy this file into your own build if it helps: it only sets
# variables, and every one of them can be overridden from the command line
# or the environment.
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

CROSS_COMPILE ?= arm-linux-gnueabihf-
CXX = $(CROSS_COMPILE)g++
# Cortex-A7 with Thumb-2, NEON and VFPv4, hard-float ABI.
ARCHFLAGS ?= -mcpu=cortex-a7 -mthumb -mfpu=neon-vfpv4 -mfloat-abi=hard
# -Wno-psabi: gcc notes ABI changes between compiler versions when a struct
# with a bit-field or an over-aligned member is passed by value; they are not
# ours to fix and -Werror would turn them into errors.
WARNFLAGS_TARGET ?= -Wno-psabi
# Static, so qemu-user needs no target sysroot to run the program.
LDFLAGS_TARGET ?= -static
LDLIBS_TARGET ?=
# The CPU is pinned so that an instruction a Cortex-A7 lacks traps in tests.
EXEC ?= qemu-arm -cpu cortex-a7
