# toolchains/musl-armhf.mk: 32-bit ARM (hard float) with musl libc, built
# with zig's bundled clang, libc++ and musl (`zig c++ -target
# arm-linux-musleabihf`), statically linked, run under qemu-arm: what an
# OpenWrt router on a 32-bit ARM SoC runs. musl gives 32-bit ARM a 64-bit
# time_t, unlike the glibc armhf target, so structures holding times are laid
# out differently there. Everything else is toolchains/musl.mk's (zig from
# the same npm package, installed by `bash toolchains/install-deps.sh
# musl-armhf`).
#
# zig 0.11 crashes (SIGSEGV) when it compiles and links 32-bit ARM in one
# command above -O0; compiling to an object and linking it apart works at
# every level, which is how the Makefile builds every program.

# Before musl.mk, whose `?=` then leaves them alone.
ZIG_TARGET ?= arm-linux-musleabihf
EXEC ?= qemu-arm
include toolchains/musl.mk
