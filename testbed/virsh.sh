#!/usr/bin/env bash
# Usage: testbed/virsh.sh DIR [VIRSH-ARGS...]
#
# Run virsh against the embedded QEMU driver rooted at DIR
# (qemu:///embed?root=DIR, prepared by testbed/embed-root.sh), as the identity
# recorded for that root (setpriv when we are root and it is not).
# Examples:
#   testbed/domain.sh tb-1 >/tmp/tbroot/tb-1.xml
#   testbed/virsh.sh /tmp/tbroot create /tmp/tbroot/tb-1.xml
#       (a file, not <(...): after setpriv the pipe cannot be reopened)
#   testbed/virsh.sh /tmp/tbroot console tb-1     # detach with ^]
#   testbed/virsh.sh /tmp/tbroot list --name
# Remember: only one process can hold a root at a time; a second virsh fails
# with "Failed to acquire pid file '<root>/run/qemu/driver.pid'".
set -euo pipefail

TB_PROG=virsh.sh
# shellcheck source=testbed/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$#" -ge 1 ] || tb_die "usage: $0 DIR [VIRSH-ARGS...]"
[ -d "$1" ] || tb_die "$1 is not a directory; run testbed/embed-root.sh $1 first"
root=$(cd -- "$1" && pwd -P)
shift
[ -e "$root/etc/qemu.conf" ] || tb_die "$root/etc/qemu.conf missing; run testbed/embed-root.sh $root first"
tb_need virsh setpriv
tb_run_in_root "$root" virsh -c "$(tb_embed_uri "$root")" "$@"
