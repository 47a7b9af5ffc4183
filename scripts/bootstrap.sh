#!/usr/bin/env bash
# Make a bare Debian machine of the project's kind ready to build and test vmlb.
# The recipe is the measured one in ../shared/TOOLCHAIN.md: Debian's rustc (with its library
# source) linked as the rustup toolchain "bpf-debian" for the BPF target, and bpf-linker built
# against the LLVM major that rustc uses. Idempotent: a second run only checks and exits quickly.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
# Packages the build needs, then the ones the tests and benchmarks run for real.
BUILD_PKGS=(rustc-web rust-web-src bpftool iproute2)
# haproxy and nftables are contenders of `cargo xtask bench e2e` only.
TEST_PKGS=(apache2 curl procps ethtool wrk iputils-ping haproxy nftables)

log() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get and rustup toolchain link need it)"

missing=()
for p in "${BUILD_PKGS[@]}" "${TEST_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

# Debian's rustc decides which LLVM bpf-linker must be built against.
if [ -x /usr/bin/rustc ]; then
    llvm_major=$(/usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
else
    llvm_major=""
fi
if [ -n "$llvm_major" ]; then
    dpkg-query -W -f='${Status}' "llvm-${llvm_major}-dev" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("llvm-${llvm_major}-dev")
fi

if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # apache2's package starts a server in the root namespace; the tests start their own.
    if command -v apache2ctl >/dev/null 2>&1; then
        apache2ctl stop >/dev/null 2>&1 || true
    fi
    # Likewise haproxy's package may start one on its default config; the bench runs its own.
    if command -v service >/dev/null 2>&1; then
        service haproxy stop >/dev/null 2>&1 || true
    fi
fi

llvm_major=$(/usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$llvm_major" ] || die "cannot read the LLVM version from /usr/bin/rustc -vV"
if ! dpkg-query -W -f='${Status}' "llvm-${llvm_major}-dev" 2>/dev/null | grep -q 'install ok installed'; then
    apt-get install -y -qq --no-install-recommends "llvm-${llvm_major}-dev" >/dev/null \
        || die "Debian's rustc uses LLVM ${llvm_major} but llvm-${llvm_major}-dev is not installable"
fi
[ -d /usr/lib/rustlib/src/rust/library/core ] || die "rust-web-src did not provide /usr/lib/rustlib/src/rust/library"

if ! rustup toolchain list | grep -q '^bpf-debian'; then
    log "linking Debian's rustc as rustup toolchain bpf-debian"
    rustup toolchain link bpf-debian /usr
fi

# bpf-linker: built once against the matching LLVM; rebuilt when the LLVM major changes.
stamp="$HOME/.cargo/bpf-linker.llvm"
if ! command -v bpf-linker >/dev/null 2>&1 || [ "$(cat "$stamp" 2>/dev/null)" != "$BPF_LINKER_VERSION/llvm-$llvm_major" ]; then
    log "building bpf-linker $BPF_LINKER_VERSION against LLVM $llvm_major (about a minute)"
    LLVM_PREFIX="/usr/lib/llvm-${llvm_major}" cargo install "bpf-linker@${BPF_LINKER_VERSION}" --locked --force \
        --no-default-features --features "llvm-${llvm_major}" \
        || die "bpf-linker $BPF_LINKER_VERSION has no llvm-${llvm_major} feature or failed to build; see ../shared/TOOLCHAIN.md"
    mkdir -p "$(dirname "$stamp")"
    echo "$BPF_LINKER_VERSION/llvm-$llvm_major" > "$stamp"
fi

log "ready (rustc $(/usr/bin/rustc -V | cut -d' ' -f2) / LLVM $llvm_major, $(bpf-linker --version 2>/dev/null | head -1))"
