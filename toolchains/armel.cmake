# toolchains/armel.cmake: 32-bit ARM, soft float, ARMv5TE in ARM mode (old
# routers and gateways), with Debian's arm-linux-gnueabi cross toolchain,
# programs run under qemu-user. The CMake twin of armel.mk; copy it into your
# own build if it helps.
#
#   cmake -S . -B build-armel --toolchain path/to/toolchains/armel.cmake
#   (before CMake 3.21: -DCMAKE_TOOLCHAIN_FILE=path/to/toolchains/armel.cmake)
#
#   CMAKE_CXX_COMPILER              the C++ compiler (CMAKE_C_COMPILER likewise)
#   CMAKE_CXX_FLAGS_INIT            architecture flags and this target's
#                                   warning flags, given when compiling and
#                                   when linking (CMake links through the
#                                   compiler with the same flags)
#   CMAKE_CXX_STANDARD_LIBRARIES_INIT  libraries this target needs
#   CMAKE_CROSSCOMPILING_EMULATOR   runs a built program: add_test() and
#                                   try_run() put it in front
#
# The language level is not set here: lemsg::lemsg asks for C++17 as a
# minimum (a compile feature), -pthread comes with Threads::Threads.
#
# Unlike armel.mk, programs are linked dynamically, as on the device: the
# emulator is given the cross toolchain's libraries (-L /usr/<triple>, from
# Debian's libc6-armel-cross and libstdc++6-armel-cross) to run them. A
# static program runs the same way; link one with -DCMAKE_EXE_LINKER_FLAGS=-static.
#
# No CMAKE_FIND_ROOT_PATH: Debian's cross toolchains are not sysroot
# toolchains. Target libraries come as multiarch packages (libfoo-dev:armel)
# under /usr/lib/arm-linux-gnueabi, which CMake searches through
# CMAKE_LIBRARY_ARCHITECTURE, detected from the compiler; and packages
# installed into a staging prefix are found through CMAKE_PREFIX_PATH. With a
# vendor SDK's sysroot instead, set CMAKE_SYSROOT and the
# CMAKE_FIND_ROOT_PATH_MODE_* variables.

set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR arm)

set(LEMSG_CROSS_TRIPLE arm-linux-gnueabi)
set(CMAKE_C_COMPILER ${LEMSG_CROSS_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${LEMSG_CROSS_TRIPLE}-g++)

set(LEMSG_ARCH_FLAGS "-march=armv5te -marm")
# -Wno-psabi: gcc notes ABI changes between compiler versions when a struct
# with a bit-field or an over-aligned member is passed by value; they are not
# ours to fix and -Werror would turn them into errors.
set(CMAKE_C_FLAGS_INIT "${LEMSG_ARCH_FLAGS}")
set(CMAKE_CXX_FLAGS_INIT "${LEMSG_ARCH_FLAGS} -Wno-psabi")

# ARMv5 has no 64-bit atomic instructions: std::atomic<std::uint64_t> (and
# is_lock_free()) call into libatomic. 32-bit atomics, std::mutex and
# std::thread need nothing beyond -pthread. --as-needed: a program that uses
# no such atomic does not depend on libatomic.so at run time.
set(CMAKE_C_STANDARD_LIBRARIES_INIT "-Wl,--push-state,--as-needed -latomic -Wl,--pop-state")
set(CMAKE_CXX_STANDARD_LIBRARIES_INIT "-Wl,--push-state,--as-needed -latomic -Wl,--pop-state")

# ARM926EJ-S is an ARMv5TE core: an ARMv6+ instruction traps in tests
# instead of passing unnoticed on qemu's default "any" CPU.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-arm -cpu arm926 -L /usr/${LEMSG_CROSS_TRIPLE})
