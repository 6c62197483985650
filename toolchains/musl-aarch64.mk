# toolchains/musl-aarch64.mk: 64-bit ARM with musl libc, built with zig's
# bundled clang, libc++ and musl (`zig c++ -target aarch64-linux-musl`),
# statically linked, run under qemu-aarch64: what an OpenWrt aarch64 router
# runs. Everything else is toolchains/musl.mk's (zig from the same npm
# package, installed by `bash toolchains/install-deps.sh musl-aarch64`).

# Before musl.mk, whose `?=` then leaves them alone.
ZIG_TARGET ?= aarch64-linux-musl
EXEC ?= qemu-aarch64
include toolchains/musl.mk
