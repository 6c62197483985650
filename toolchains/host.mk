# toolchains/host.mk: build for the machine you are on (x86_64 or whatever
# runs make). Copy this file into your own build if it helps: it only sets
# variables, and every one of them can be overridden from the command line
# or the environment.
#
#   CROSS_COMPILE     prefix of the toolchain's programs (g++, size, ...)
#   CXX               the C++ compiler
#   ARCHFLAGS         architecture flags, given when compiling and linking
#   WARNFLAGS_TARGET  warning flags this target needs on top of the usual ones
#   LDFLAGS_TARGET    link flags this target needs
#   LDLIBS_TARGET     libraries this target needs
#   EXEC              emulator prefix that runs a built program; empty here
#
# lemsg itself needs -std=c++17, and -pthread when a program uses threads.

CROSS_COMPILE ?=
# make predefines CXX, so "CXX ?= g++" would never apply: give g++ unless the
# user chose a compiler (make CXX=clang++, or CXX=clang++ in the environment).
ifneq ($(filter default undefined,$(origin CXX)),)
CXX = $(CROSS_COMPILE)g++
endif
ARCHFLAGS ?=
WARNFLAGS_TARGET ?=
LDFLAGS_TARGET ?=
LDLIBS_TARGET ?=
EXEC ?=
