#!/usr/bin/env bash
# Usage: testbed/embed-root.sh DIR
#
# Prepare DIR as the root of libvirt's embedded QEMU driver,
# qemu:///embed?root=DIR: no libvirtd, the driver runs inside the client
# process, which must run libvirt's event loop in a thread (virsh does).
# Only one process at a time can open a root (DIR/run/qemu/driver.pid lock).
#
# Writes DIR/etc/qemu.conf. The embedded driver reads <root>/etc/qemu.conf;
# a file at <root>/etc/qemu/qemu.conf is silently ignored.
#   user/group: the identity the driver and QEMU run as (see below).
#   stdio_handler = "file": QEMU's log and <serial><log/> files are written
#       directly, no system virtlogd and no auto-spawned session virtlogd.
#
# Identity (recorded as runas= in DIR/.testbed-embed-root; testbed/virsh.sh
# and the other scripts switch to it with setpriv):
#   * not root: yourself.
#   * root, and user libvirt-qemu exists: root:root.
#   * root, no libvirt-qemu user (this host): nobody:nogroup. A root process
#     is a *privileged* driver, and libvirt 9.0 resolves its compiled-in
#     default user 'libvirt-qemu' before it reads qemu.conf, so opening the
#     root fails ("Failed to parse user 'libvirt-qemu'") whatever qemu.conf
#     says. An unprivileged driver has no such step. DIR is chowned to it.
#   * TB_EMBED_RUNAS=USER:GROUP or TB_EMBED_RUNAS=self overrides the choice.
# Idempotent. Prints the connection URI on stdout.
set -euo pipefail

TB_PROG=embed-root
# shellcheck source=testbed/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$#" -eq 1 ] || tb_die "usage: $0 DIR"
[ -n "$1" ] || tb_die "DIR must not be empty"
mkdir -p -- "$1" || tb_die "cannot create $1"
root=$(cd -- "$1" && pwd -P)
[ "$root" != / ] || tb_die "refusing to use / as an embed root"
case $root in
    *[[:space:]\'\"\&\;\?\<\>\#%]*) tb_die "embed root path must not contain spaces or URI/XML metacharacters: $root" ;;
esac

self="$(id -un):$(id -gn)"
runas=${TB_EMBED_RUNAS:-}
if [ "$runas" = self ]; then
    runas=$self
elif [ -z "$runas" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        runas=$self
    elif getent passwd libvirt-qemu >/dev/null; then
        runas=root:root
    else
        runas="nobody:$(id -gn nobody 2>/dev/null || echo nogroup)"
    fi
fi
case $runas in
    ?*:?*) ;;
    *) tb_die "TB_EMBED_RUNAS must be USER:GROUP or self, got '$runas'" ;;
esac
user=${runas%%:*}
group=${runas#*:}
id -u "$user" >/dev/null 2>&1 || tb_die "unknown user $user"
getent group "$group" >/dev/null || tb_die "unknown group $group"
if [ "$runas" != "$self" ] && [ "$(id -u)" -ne 0 ]; then
    tb_die "only root can prepare a root for another identity ($runas)"
fi

mkdir -p "$root/etc" "$root/home"
cat >"$root/etc/qemu.conf.tmp" <<CONF
# Written by testbed/embed-root.sh for qemu:///embed?root=$root
user = "$user"
group = "$group"
stdio_handler = "file"
CONF
mv "$root/etc/qemu.conf.tmp" "$root/etc/qemu.conf"
# Marker for testbed/cleanup.sh, and the identity for testbed/virsh.sh.
printf 'runas=%s\n' "$runas" >"$root/.testbed-embed-root"
if [ "$runas" != "$self" ]; then
    chown -R "$user:$group" "$root"
fi

tb_log "prepared $root (driver and QEMU run as $runas, stdio_handler=file)"
tb_embed_uri "$root"
