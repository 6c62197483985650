#!/usr/bin/env bash
# tests/consumer.sh: builds and runs tests/consumer (a C++20 program using
# lemsg) the ways a user gets lemsg, in a fresh build/consumer/:
#
#   cmake add_subdirectory host|armhf|aarch64|armel|mips
#                                      the tree through add_subdirectory(),
#                                      a cross target with its
#                                      toolchains/<target>.cmake
#   cmake install                      `cmake --install` of the tree into a
#                                      scratch prefix (needed by the next two)
#   cmake find_package host|armhf      find_package(lemsg <major.minor> CONFIG REQUIRED)
#                                      from that prefix (CMAKE_PREFIX_PATH)
#   pkg-config host                    `make install DESTDIR=... PREFIX=/usr`
#                                      (which also builds lemsg-dir and lemsg
#                                      for the host), then $CXX -std=c++20 with
#                                      pkg-config's flags; the Cflags must
#                                      carry -pthread and no -std
#
# The cross programs run under their toolchain file's emulator (qemu-arm,
# qemu-aarch64 or qemu-mips with the cross toolchain's libraries), through
# ctest. Prints one line per case, "consumer <case>: ok (<seconds> s)" or
# "... FAILED" with the end of its log (each case logs to
# build/consumer/<case>.log), and exits non-zero if any failed.
#
# Needs cmake, pkg-config, make, g++, the g++ cross compilers of armhf,
# aarch64, armel and mips, and qemu-user (`make consumer` checks for them).
# Environment: CXX (host compiler, g++), MAKE (make), CONSUMER_TIMEOUT
# (seconds for each configure, build or run step, 300).
# shellcheck disable=SC2317  # the case functions are called through run_case
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
scratch=$root/build/consumer
src=$root/tests/consumer
cxx=${CXX:-g++}
make_cmd=${MAKE:-make}
step_timeout=${CONSUMER_TIMEOUT:-300}

rm -rf "$scratch"
mkdir -p "$scratch"

failed=0

# step <command...>: one step of a case, bounded in time.
step() {
    timeout -k 5 "$step_timeout" "$@"
}

# run_case <name> <function> [args...]: runs the function with its output in
# the case's log, then prints the case's line.
run_case() {
    local name=$1 log
    shift
    log=$scratch/$(printf '%s' "$name" | tr ' ' '-').log
    # Not in an `if`: errexit would be off inside the subshell there.
    local rc=0 start=$SECONDS
    set +e
    ( set -e; "$@" ) > "$log" 2>&1
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then
        echo "consumer $name: ok ($((SECONDS - start)) s)"
    else
        echo "consumer $name: FAILED after $((SECONDS - start)) s (log: ${log#"$root"/})"
        tail -n 25 "$log" | sed 's/^/    /'
        failed=1
    fi
}

# cmake_consumer <build dir> <toolchain file or ""> <cmake -D options...>:
# configures and builds tests/consumer, then runs it through ctest.
cmake_consumer() {
    local dir=$1 toolchain=$2
    shift 2
    # No build type, so no optimisation: the header's code generation is
    # the Makefile's tests' business, and -O0 compiles it in a third of the
    # time -O3 takes.
    local args=(-S "$src" -B "$dir" -DCMAKE_BUILD_TYPE= "$@")
    [ -n "$toolchain" ] && args+=(-DCMAKE_TOOLCHAIN_FILE="$root/toolchains/$toolchain.cmake")
    step cmake "${args[@]}"
    step cmake --build "$dir" --verbose
    (cd "$dir" && step ctest --verbose --timeout 60)
}

subdirectory_case() {
    local target=$1 toolchain=''
    [ "$target" = host ] || toolchain=$target
    cmake_consumer "$scratch/subdirectory-$target" "$toolchain" \
        -DLEMSG_CONSUMER_MODE=subdirectory -DLEMSG_SOURCE_DIR="$root"
}

# One install for both find_package cases: the package is header only and
# architecture independent, so the host's install serves the armhf build.
prefix=$scratch/prefix
install_case() {
    step cmake -S "$root" -B "$scratch/lemsg-build" -DCMAKE_INSTALL_PREFIX="$prefix"
    step cmake --install "$scratch/lemsg-build"
    local f
    for f in include/lemsg.hpp share/cmake/lemsg/lemsgConfig.cmake \
             share/cmake/lemsg/lemsgConfigVersion.cmake share/cmake/lemsg/lemsgTargets.cmake; do
        [ -f "$prefix/$f" ] || { echo "not installed: $prefix/$f"; return 1; }
    done
}

package_case() {
    local target=$1 toolchain='' dir=$scratch/package-$1
    [ "$target" = host ] || toolchain=$target
    [ -f "$scratch/lemsg-build/install_manifest.txt" ] || { echo "the cmake install failed"; return 1; }
    # The version asked for is the header's MAJOR.MINOR, as a user of this
    # release would write it.
    local want
    want=$(sed -n 's/^#define LEMSG_VERSION_\(MAJOR\|MINOR\) \([0-9]*\).*/\2/p' "$root/lemsg.hpp" | paste -sd.)
    cmake_consumer "$dir" "$toolchain" -DLEMSG_CONSUMER_MODE=package -DCMAKE_PREFIX_PATH="$prefix" \
        -DLEMSG_WANT_VERSION="$want"
    # The package found must be the one just installed, not one elsewhere
    # on this machine.
    local found
    found=$(sed -n 's/^lemsg_DIR:[A-Z]*=//p' "$dir/CMakeCache.txt")
    [ "$found" = "$prefix/share/cmake/lemsg" ] ||
        { echo "find_package found lemsg in '$found', not in $prefix/share/cmake/lemsg"; return 1; }
}

pkgconfig_case() {
    local dest=$scratch/destdir dir=$scratch/pkg-config pc
    mkdir -p "$dir"
    # TARGET=host: the installed programs are not used here, and the host's
    # are the cheapest to build (and usually built already).
    step "$make_cmd" -C "$root" --no-print-directory install TARGET=host \
        DESTDIR="$dest" PREFIX=/usr INSTALL_DEPS=:
    pc=$(find "$dest" -name lemsg.pc -print -quit)
    [ -n "$pc" ] || { echo "make install wrote no lemsg.pc under $dest"; return 1; }
    echo "--- $pc"
    cat "$pc"
    # Only the installed file: nothing from this machine's pkg-config dirs.
    local pkgconf=(env PKG_CONFIG_SYSROOT_DIR="$dest" PKG_CONFIG_LIBDIR="${pc%/*}" pkg-config)
    local cflags libs version
    cflags=$(step "${pkgconf[@]}" --cflags lemsg)
    libs=$(step "${pkgconf[@]}" --libs lemsg)
    version=$(step "${pkgconf[@]}" --modversion lemsg)
    echo "--- Cflags: $cflags"
    echo "--- Libs: $libs"
    echo "--- Version: $version"
    case " $cflags " in
        *" -std="*) echo "lemsg.pc's Cflags carry a -std flag: a C++20 user would be lowered to it"; return 1 ;;
    esac
    case " $cflags " in
        *" -pthread "*) ;;
        *) echo "lemsg.pc's Cflags lack -pthread"; return 1 ;;
    esac
    case " $libs " in
        *" -pthread "*) ;;
        *) echo "lemsg.pc's Libs lack -pthread"; return 1 ;;
    esac
    # -std=c++20 first: a -std in the package's flags would come after it,
    # win, and trip main.cpp's static_assert.
    # shellcheck disable=SC2086  # the flags are words
    step "$cxx" -std=c++20 -Wall -Wextra -Wpedantic -Werror \
        -DLEMSG_CONSUMER_EXPECT_VERSION="\"$version\"" \
        "$src/main.cpp" $cflags -o "$dir/lemsg_consumer" $libs
    step "$dir/lemsg_consumer"
}

run_case "cmake add_subdirectory host" subdirectory_case host
run_case "cmake add_subdirectory armhf" subdirectory_case armhf
run_case "cmake add_subdirectory aarch64" subdirectory_case aarch64
run_case "cmake add_subdirectory armel" subdirectory_case armel
run_case "cmake add_subdirectory mips" subdirectory_case mips
run_case "cmake install" install_case
run_case "cmake find_package host" package_case host
run_case "cmake find_package armhf" package_case armhf
run_case "pkg-config host" pkgconfig_case

exit "$failed"
