# toolchains/clang.mk: the host again, built with clang++ instead of g++, so
# every test also passes a second compiler's warnings and code generation.
# The variables are those of host.mk; each can be overridden from the command
# line or the environment (CLANG_CXX=clang++-16, say).
#
#   CROSS_COMPILE     prefix of the toolchain's programs (size, nm, ...)
#   CXX               the C++ compiler: $(CLANG_CXX), clang++ by default
#   ARCHFLAGS         architecture flags, given when compiling and linking
#   WARNFLAGS_TARGET  warning flags this target needs on top of the usual ones
#   LDFLAGS_TARGET    link flags this target needs
#   LDLIBS_TARGET     libraries this target needs
#   EXEC              emulator prefix that runs a built program; empty here
#
# lemsg itself needs -std=c++17, and -pthread when a program uses threads.

CROSS_COMPILE ?=
CLANG_CXX ?= clang++
CXX = $(CLANG_CXX)
ARCHFLAGS ?=
WARNFLAGS_TARGET ?=
LDFLAGS_TARGET ?=
LDLIBS_TARGET ?=
EXEC ?=
