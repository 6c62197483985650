#!/usr/bin/env bash
# toolchains/install-deps.sh: install what lemsg's build and tests need on
# Debian (12 or later): the host compilers, the three ARM cross toolchains,
# qemu-user to run their tests, and doctest.
#
#   toolchains/install-deps.sh           install whatever is missing
#   toolchains/install-deps.sh --check   exit 0 if all is installed, 1 if not
#
# Idempotent: when everything is there it prints one line and does nothing
# else. Uses sudo when not run as root. Where there is no dpkg/apt-get it
# prints the package list (Debian names) and exits non-zero.
set -euo pipefail

packages=(
    make
    g++
    clang
    libclang-rt-14-dev
    doctest-dev
    g++-arm-linux-gnueabihf
    g++-aarch64-linux-gnu
    g++-arm-linux-gnueabi
    qemu-user
)

check=0
case "${1:-}" in
    --check) check=1 ;;
    -h|--help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "install-deps: unknown option '$1' (try --help)" >&2; exit 2 ;;
    # Target names (host, armhf, ...): for now everything is installed.
    *) ;;
esac

if ! command -v dpkg-query >/dev/null 2>&1; then
    if [ "$check" = 1 ]; then
        echo "install-deps: no dpkg-query to check with; needs: ${packages[*]}"
    else
        echo "${packages[*]}"
    fi
    exit 1
fi

missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    case "$status" in
        ii*) ;;
        *) missing+=("$p") ;;
    esac
done

if [ "${#missing[@]}" = 0 ]; then
    echo "install-deps: everything is installed"
    exit 0
fi
if [ "$check" = 1 ]; then
    echo "install-deps: missing: ${missing[*]}"
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "${missing[*]}"
    exit 1
fi

echo "install-deps: installing ${missing[*]}"
as_root=()
if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-deps: not root and no sudo; as root, run: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    # Without a terminal sudo cannot ask for a password: fail rather than hang.
    if [ -t 0 ]; then as_root=(sudo); else as_root=(sudo -n); fi
fi
# A failed update (offline, one bad mirror) may still leave usable lists:
# let the install decide.
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update ||
    echo "install-deps: apt-get update failed; trying the install anyway" >&2
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"
