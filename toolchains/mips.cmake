# toolchains/mips.cmake: 32-bit MIPS, big endian (MIPS32 release 2, o32 ABI,
# hard float: the toolchain's defaults), with Debian's mips-linux-gnu cross
# toolchain, programs run under qemu-user. The CMake twin of mips.mk; copy it
# into your own build if it helps.
#
#   cmake -S . -B build-mips --toolchain path/to/toolchains/mips.cmake
#   (before CMake 3.21: -DCMAKE_TOOLCHAIN_FILE=path/to/toolchains/mips.cmake)
#
#   CMAKE_CXX_COMPILER              the C++ compiler (CMAKE_C_COMPILER likewise)
#   CMAKE_CXX_FLAGS_INIT            architecture flags and this target's
#                                   warning flags, given when compiling and
#                                   when linking (CMake links through the
#                                   compiler with the same flags)
#   CMAKE_CROSSCOMPILING_EMULATOR   runs a built program: add_test() and
#                                   try_run() put it in front
#
# The language level is not set here: lemsg::lemsg asks for C++17 as a
# minimum (a compile feature), -pthread comes with Threads::Threads.
#
# Programs are linked dynamically, as on the device: the emulator is given
# the cross toolchain's libraries (-L /usr/<triple>, from Debian's
# libc6-mips-cross and libstdc++6-mips-cross) to run them. A static program
# runs the same way; link one with -DCMAKE_EXE_LINKER_FLAGS=-static.
#
# No CMAKE_FIND_ROOT_PATH: Debian's cross toolchains are not sysroot
# toolchains. Target libraries come as multiarch packages (libfoo-dev:mips)
# under /usr/lib/mips-linux-gnu, which CMake searches through
# CMAKE_LIBRARY_ARCHITECTURE, detected from the compiler; and packages
# installed into a staging prefix are found through CMAKE_PREFIX_PATH. With a
# vendor SDK's sysroot instead, set CMAKE_SYSROOT and the
# CMAKE_FIND_ROOT_PATH_MODE_* variables.

set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR mips)

set(LEMSG_CROSS_TRIPLE mips-linux-gnu)
set(CMAKE_C_COMPILER ${LEMSG_CROSS_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${LEMSG_CROSS_TRIPLE}-g++)

# The toolchain's default, MIPS32R2: no architecture flags.
set(LEMSG_ARCH_FLAGS "")
# -Wno-psabi: gcc notes ABI changes between compiler versions when some
# aggregates are passed by value; they are not ours to fix and -Werror would
# turn them into errors.
set(CMAKE_C_FLAGS_INIT "${LEMSG_ARCH_FLAGS}")
set(CMAKE_CXX_FLAGS_INIT "${LEMSG_ARCH_FLAGS} -Wno-psabi")

set(CMAKE_CROSSCOMPILING_EMULATOR qemu-mips -L /usr/${LEMSG_CROSS_TRIPLE})
