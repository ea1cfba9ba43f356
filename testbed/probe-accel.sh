#!/usr/bin/env bash
# Usage: testbed/probe-accel.sh [--force]
#
# Decide once whether testbed guests use KVM or TCG and write the answer
# (kvm or qemu, the libvirt domain type) to $TESTBED_DIR/accel, and why to
# $TESTBED_DIR/accel.reason. An existing decision is kept unless --force.
#
# /dev/kvm existing, or libvirt's domcapabilities listing kvm, proves nothing:
# on PVM-style nested hosts a type='kvm' guest hangs forever during early boot.
# So the probe boots one real type='kvm' testbed guest and waits at most
# TB_PROBE_TIMEOUT (20) seconds for its banner. It uses a private embedded
# driver root (testbed/embed-root.sh; never the system daemon) that it removes
# afterwards. No usable /dev/kvm for the QEMU user, or no banner: qemu (TCG).
set -euo pipefail

TB_PROG=probe-accel
# shellcheck source=testbed/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

force=0
case ${1:-} in
    "") ;;
    --force) force=1 ;;
    *) tb_die "usage: $0 [--force]" ;;
esac
timeout_s=${TB_PROBE_TIMEOUT:-20}

if [ "$force" -eq 0 ] && [ -s "$TESTBED_DIR/accel" ]; then
    tb_log "already decided: $(head -n 1 "$TESTBED_DIR/accel") ($(cat "$TESTBED_DIR/accel.reason" 2>/dev/null || echo 'no reason recorded')); --force to probe again"
    head -n 1 "$TESTBED_DIR/accel"
    exit 0
fi
for f in vmlinuz initramfs.cpio.gz; do
    [ -s "$TESTBED_DIR/$f" ] || tb_die "missing $TESTBED_DIR/$f; run testbed/build.sh first"
done
tb_need virsh setpriv

decide() {
    local accel=$1 reason=$2
    printf '%s\n' "$accel" >"$TESTBED_DIR/accel.tmp"
    mv "$TESTBED_DIR/accel.tmp" "$TESTBED_DIR/accel"
    printf '%s\n' "$reason" >"$TESTBED_DIR/accel.reason"
    tb_log "decided: $accel ($reason)"
    printf '%s\n' "$accel"
}

root=
remove_root() {
    if [ -n "$root" ]; then
        "$TB_DIR/cleanup.sh" "$root" >/dev/null 2>&1 ||
            tb_warn "cleanup of $root failed; run testbed/cleanup.sh $root"
    fi
}
trap remove_root EXIT

root=$(mktemp -d "${TMPDIR:-/tmp}/tb-probe.XXXXXX")
chmod 755 "$root"
"$TB_DIR/embed-root.sh" "$root" >/dev/null
runas=$(tb_root_runas "$root")
qemu_user=${runas%%:*}

if [ ! -c /dev/kvm ]; then
    decide qemu "no /dev/kvm"
    exit 0
fi
if ! tb_run_in_root "$root" sh -c 'test -r /dev/kvm && test -w /dev/kvm'; then
    decide qemu "/dev/kvm ($(stat -c '%a %U:%G' /dev/kvm)) is not read/writable by the QEMU user $qemu_user"
    exit 0
fi
if ! tb_run_in_root "$root" test -r "$TESTBED_DIR/vmlinuz"; then
    tb_die "$TESTBED_DIR/vmlinuz is not readable by $qemu_user (make the path world-traversable)"
fi

name=tb-probe-kvm
log=$root/$name.serial.log
xml=$root/$name.xml
TB_ACCEL=kvm TB_SERIAL_LOG=$log "$TB_DIR/domain.sh" "$name" plain >"$xml"
chmod 644 "$xml"
tb_log "booting a type='kvm' guest in $root (at most ${timeout_s} s for the banner)"
start=$SECONDS
if ! out=$(tb_run_in_root "$root" virsh -q -c "$(tb_embed_uri "$root")" create "$xml" 2>&1); then
    decide qemu "creating a type='kvm' guest failed: ${out//$'\n'/ }"
    exit 0
fi
while [ $((SECONDS - start)) -lt "$timeout_s" ]; do
    if [ -r "$log" ] && grep -q "TESTBED-READY name=$name" "$log"; then
        decide kvm "a type='kvm' guest printed its banner after $((SECONDS - start)) s"
        exit 0
    fi
    sleep 0.2
done
decide qemu "a type='kvm' guest booted but printed no banner within ${timeout_s} s"
