#!/usr/bin/env bash
# Usage: testbed/cleanup.sh [--force] DIR...
#
# Tear down embedded-driver roots (qemu:///embed?root=DIR) of the testbed:
#   1. destroy the guests the driver still knows (virsh list, then all
#      destroys in one virsh, as the identity recorded for the root; embedded
#      guests outlive the process that started them, and a reattached
#      transient guest's destroy reports "Domain not found" although it
#      worked: that counts as success),
#   2. kill orphaned QEMU processes whose command line names DIR,
#   3. remove stale /var/lock/LCK.._pts_* files whose owner pid is dead
#      (left by processes that exited with a console open; they make a later
#      non-root console open on the same pty fail with "File exists"),
#   4. rm -rf DIR.
# Refuses a DIR that does not look like an embed root (no etc/qemu.conf and no
# .testbed-embed-root marker) unless --force. A missing DIR is not an error.
# Exits non-zero if a QEMU process naming DIR survives.
set -euo pipefail

TB_PROG=cleanup
# shellcheck source=testbed/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

force=0
dirs=()
for arg in "$@"; do
    case $arg in
        --force) force=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
            exit 0
            ;;
        -*) tb_die "unknown option $arg" ;;
        *) dirs+=("$arg") ;;
    esac
done
[ "${#dirs[@]}" -gt 0 ] || tb_die "usage: $0 [--force] DIR..."

# PIDs of live (non-zombie) QEMU processes whose command line mentions $1.
qemu_pids_naming() {
    local needle=$1 p pid comm state
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        comm=$(cat "$p/comm" 2>/dev/null) || continue
        case $comm in qemu-system-* | qemu-kvm) ;; *) continue ;; esac
        state=$(awk '/^State:/ { print $2 }' "$p/status" 2>/dev/null) || continue
        [ "$state" != Z ] || continue
        if tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qF -- "$needle"; then
            printf '%s\n' "$pid"
        fi
    done
}

destroy_guests() {
    local root=$1 uri names out
    if ! command -v virsh >/dev/null; then
        tb_warn "virsh not found; skipping the libvirt-level destroy"
        return 0
    fi
    uri=$(tb_embed_uri "$root")
    # Only one process can hold an embed root, so everything happens in one
    # virsh per step, as the identity the root belongs to.
    if ! names=$(tb_run_in_root "$root" timeout 120 virsh -q -c "$uri" list --name 2>&1); then
        local holder
        holder=$(cat "$root/run/qemu/driver.pid" 2>/dev/null || true)
        if [ -n "$holder" ] && [ -d "/proc/$holder" ]; then
            tb_warn "$root is held by live process $holder ($(tr '\0' ' ' <"/proc/$holder/cmdline" | cut -c1-120)); its guests are killed below"
        else
            tb_warn "virsh list on $root failed: ${names//$'\n'/ }"
        fi
        return 0
    fi
    names=$(printf '%s\n' "$names" | sed '/^[[:space:]]*$/d')
    if [ -z "$names" ]; then
        tb_log "$root: no running guests"
        return 0
    fi
    tb_log "$root: destroying $(printf '%s\n' "$names" | wc -l) guest(s): ${names//$'\n'/ }"
    local cmds=() name
    while IFS= read -r name; do
        cmds+=("destroy --domain '$name';")
    done <<<"$names"
    # A reattached transient guest's destroy can report "Domain not found"
    # although QEMU was killed: not an error. kill_orphans checks the result.
    if ! out=$(tb_run_in_root "$root" timeout 300 virsh -q -c "$uri" "${cmds[*]}" 2>&1); then
        if printf '%s\n' "$out" | grep -q 'Domain not found'; then
            tb_log "$root: destroy said 'Domain not found' (usual for a reattached transient guest; QEMU is checked next)"
        else
            tb_warn "virsh destroy reported: ${out//$'\n'/ }"
        fi
    fi
}

kill_orphans() {
    local root=$1 pids i
    pids=$(qemu_pids_naming "$root/")
    [ -n "$pids" ] || return 0
    tb_log "$root: terminating orphaned QEMU: ${pids//$'\n'/ }"
    # shellcheck disable=SC2086 # one pid per word
    kill -TERM $pids 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        sleep 0.1
        pids=$(qemu_pids_naming "$root/")
        [ -n "$pids" ] || return 0
    done
    tb_warn "$root: QEMU still alive 5 s after SIGTERM, sending SIGKILL: ${pids//$'\n'/ }"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.5
}

remove_stale_locks() {
    local lock pid removed=0
    for lock in /var/lock/LCK.._pts_*; do
        [ -e "$lock" ] || continue
        pid=$(tr -cd '0-9' <"$lock" 2>/dev/null || true)
        if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then
            continue
        fi
        if rm -f -- "$lock" 2>/dev/null; then
            removed=$((removed + 1))
        else
            tb_warn "cannot remove stale $lock (pid ${pid:-none} is dead; owned by $(stat -c %U "$lock"))"
        fi
    done
    if [ "$removed" -gt 0 ]; then
        tb_log "removed $removed stale /var/lock/LCK.._pts_* file(s)"
    fi
}

status=0
for dir in "${dirs[@]}"; do
    [ -n "$dir" ] || tb_die "empty DIR"
    if [ ! -e "$dir" ]; then
        tb_log "$dir: does not exist, only checking for orphans"
        root=$(tb_abspath "$dir" 2>/dev/null || printf '%s' "$dir")
    else
        [ -d "$dir" ] || tb_die "$dir is not a directory"
        root=$(cd -- "$dir" && pwd -P)
        case $root in
            / | /root | /home | /tmp | /var | /var/tmp | /opt | /srv | /work | "$HOME" | "$TB_REPO" | \
                /usr | /usr/* | /etc | /etc/* | /boot | /boot/* | /bin* | /sbin* | /lib* | /proc* | /sys* | /dev* | /run | /var/lib*)
                tb_die "refusing to clean up $root" ;;
        esac
        if [ "$force" -eq 0 ] && [ ! -e "$root/.testbed-embed-root" ] && [ ! -e "$root/etc/qemu.conf" ]; then
            tb_die "$root does not look like an embed root (no etc/qemu.conf); use --force"
        fi
        tb_log "cleaning up $root"
        destroy_guests "$root"
    fi
    kill_orphans "$root"
    remove_stale_locks
    if [ -e "$root" ]; then
        rm -rf -- "$root" || tb_die "cannot remove $root"
    fi
    left=$(qemu_pids_naming "$root/")
    if [ -n "$left" ]; then
        tb_warn "$root: QEMU processes remain: ${left//$'\n'/ }"
        status=1
    else
        tb_log "$root: gone; no QEMU process names it"
    fi
done
exit "$status"
