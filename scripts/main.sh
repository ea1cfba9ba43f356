#!/usr/bin/env bash
# The main job: the console multiplexer on the local default testbed. It boots three
# tiny guests on libvirt's in-process QEMU driver (no daemon) and attaches to all
# their consoles; type lines for them, end input (Ctrl-D) or Ctrl-] to quit.
# Arguments are passed to the example (e.g. --uri URI --domain NAME).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup-host.sh
bash testbed/build.sh >/dev/null
echo "main: building console_mux (release)"
cargo build --quiet --release --example console_mux
mux=target/release/examples/console_mux

if [ "$(id -u)" -ne 0 ] || getent passwd libvirt-qemu >/dev/null; then
    exec "$mux" "$@"
fi
# libvirt 9.0's embedded driver refuses to run as root without the libvirt-qemu
# user (it looks that user up before reading qemu.conf), so as root, without
# that user, run it unprivileged: nobody, with a private home.
home=$(mktemp -d /tmp/console-mux-home.XXXXXX)
chown nobody "$home"
trap 'rm -rf "$home"' EXIT
setpriv --reuid=nobody --regid=nogroup --clear-groups \
    env HOME="$home" TESTBED_DIR="$PWD/.testbed" "$mux" "$@"
