#!/usr/bin/env bash
# Prepare a Debian 12 host for building and testing virt-reactor.
#
# Idempotent, and it changes no system configuration: it only installs missing
# packages, the Rust toolchain of Cargo.toml's rust-version (with rustup) and
# cargo-nextest. No /etc edits, no users, no system libvirtd: the tests start their
# own private, unprivileged libvirtd (tests/support/daemon.rs); the multi-host
# tests put such daemons in network namespaces they make and remove
# (tests/support/hosts.rs, needs root). conserver (for
# scenario 6 of the benchmark) runs the same way, a private instance per run with
# its own configuration and a loopback port; if installing it starts Debian's
# system service, this script stops and disables that service again.
set -euo pipefail

PACKAGES=(
    libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    pkg-config qemu-system-x86 busybox-static cpio gzip gcc procps
    util-linux # setpriv
    iproute2 # ip netns: the multi-host test bed (tests/support/hosts.rs)
    chromium chromium-driver # the console service's browser test (tests/support/browser.rs)
    tmux # tests/console_mux_terminal.rs
    conserver-server conserver-client # benchmark scenario 6
)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing+=("$pkg")
    fi
done

# apt's own output goes to a log, shown only when something fails.
log=$(mktemp /tmp/setup-host.XXXXXX.log)
trap 'rm -f "$log"' EXIT
quietly() {
    if ! "$@" >>"$log" 2>&1; then
        echo "setup-host: error: $* failed; its output:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
}

if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup-host: packages: all ${#PACKAGES[@]} present"
else
    echo "setup-host: packages: installing ${missing[*]}"
    quietly "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    quietly "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Installing conserver-server starts its system service where services start (not
# in containers, whose policy-rc.d refuses): stop and disable that instance, which
# would listen on every interface (port 3109 of /etc/conserver/server.conf). Only
# when this run installed it: a conserver set up before is left alone.
if [[ " ${missing[*]} " == *" conserver-server "* ]]; then
    if command -v systemctl >/dev/null && systemctl is-active --quiet conserver-server 2>/dev/null; then
        echo "setup-host: conserver-server: stopping and disabling the system service the package started"
        quietly "${SUDO[@]}" systemctl disable --now conserver-server
    elif [ -x /etc/init.d/conserver-server ] && /etc/init.d/conserver-server status >/dev/null 2>&1; then
        echo "setup-host: conserver-server: stopping and disabling the system service the package started"
        quietly "${SUDO[@]}" /etc/init.d/conserver-server stop
        quietly "${SUDO[@]}" update-rc.d conserver-server disable
    fi
fi

for tool in libvirtd setpriv ip virsh chromium chromedriver tmux conserver console; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null; then
        echo "setup-host: error: $tool not found after installing packages" >&2
        exit 1
    fi
done

if ! command -v cargo >/dev/null; then
    echo "setup-host: error: cargo not found (install a Rust toolchain, e.g. via rustup)" >&2
    exit 1
fi

# The toolchain of Cargo.toml's rust-version, for the msrv step of scripts/test.sh.
msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' "$(dirname "${BASH_SOURCE[0]}")/../Cargo.toml")
if ! command -v rustup >/dev/null; then
    echo "setup-host: rust $msrv (MSRV): rustup not found; the msrv test step will fail" >&2
elif rustup toolchain list | grep -q "^$msrv-"; then
    echo "setup-host: rust $msrv (MSRV): present"
else
    echo "setup-host: rust $msrv (MSRV): installing"
    quietly rustup toolchain install "$msrv" --profile minimal
fi

if nextest_version=$(cargo nextest --version 2>/dev/null); then
    echo "setup-host: cargo-nextest: ${nextest_version%%$'\n'*}"
else
    echo "setup-host: cargo-nextest: installing"
    quietly cargo install --locked cargo-nextest
fi
