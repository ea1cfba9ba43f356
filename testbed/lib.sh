# shellcheck shell=bash
# Shared helpers for the testbed scripts. Source it; do not run it.
#
# Sets TB_DIR (this directory), TB_REPO (the repository root) and
# TESTBED_DIR (the cache directory, default $TB_REPO/.testbed).
# Callers set TB_PROG (used as the message prefix) before sourcing.

TB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TB_REPO=$(cd "$TB_DIR/.." && pwd)
TESTBED_DIR=${TESTBED_DIR:-$TB_REPO/.testbed}
TB_PROG=${TB_PROG:-testbed}

# Progress and errors go to stderr, so stdout stays usable for results.
tb_log() { printf '%s: %s\n' "$TB_PROG" "$*" >&2; }
tb_warn() { printf '%s: warning: %s\n' "$TB_PROG" "$*" >&2; }
tb_die() {
    printf '%s: error: %s\n' "$TB_PROG" "$*" >&2
    exit 1
}

tb_need() {
    local tool
    for tool in "$@"; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null ||
            tb_die "required tool '$tool' not found"
    done
}

# Absolute, symlink-free form of a path whose parent exists.
tb_abspath() {
    local dir base
    dir=$(dirname -- "$1")
    base=$(basename -- "$1")
    dir=$(cd -- "$dir" && pwd -P) || tb_die "no such directory: $(dirname -- "$1")"
    if [ "$dir" = / ]; then
        printf '/%s\n' "$base"
    else
        printf '%s/%s\n' "$dir" "$base"
    fi
}

# The libvirt URI of the embedded QEMU driver rooted at $1 (absolute path).
tb_embed_uri() { printf 'qemu:///embed?root=%s\n' "$1"; }

# Accelerator to use: $TB_ACCEL, else $TESTBED_DIR/accel, else qemu (TCG).
tb_accel() {
    local accel=${TB_ACCEL:-}
    if [ -z "$accel" ] && [ -r "$TESTBED_DIR/accel" ]; then
        accel=$(head -n 1 "$TESTBED_DIR/accel")
    fi
    case ${accel:-qemu} in
        qemu | kvm) printf '%s\n' "${accel:-qemu}" ;;
        *) tb_die "invalid accelerator '$accel' (expected qemu or kvm)" ;;
    esac
}

# The identity ("user:group") that embed-root.sh chose for an embed root:
# the driver (the virsh or test process) and QEMU run as it. Empty output
# means "whoever runs the command" (no switch).
tb_root_runas() {
    local marker=$1/.testbed-embed-root line
    [ -r "$marker" ] || return 0
    while IFS= read -r line; do
        case $line in runas=*) printf '%s\n' "${line#runas=}" ;; esac
    done <"$marker"
}

# Run a command against embed root $1 as the identity recorded for it, with
# HOME and the XDG dirs inside the root (libvirt must not touch the caller's).
tb_run_in_root() {
    local root=$1 runas
    shift
    runas=$(tb_root_runas "$root")
    local envs=(HOME="$root/home" XDG_CONFIG_HOME="$root/home/.config"
        XDG_CACHE_HOME="$root/home/.cache" XDG_RUNTIME_DIR="$root/home/.run")
    if [ -n "$runas" ] && [ "$runas" != "$(id -un):$(id -gn)" ]; then
        [ "$(id -u)" -eq 0 ] || tb_die "$root must be used as $runas, and only root can switch to it"
        local uid gid
        uid=$(id -u "${runas%%:*}") || tb_die "unknown user ${runas%%:*}"
        gid=$(getent group "${runas#*:}" | cut -d: -f3)
        [ -n "$gid" ] || tb_die "unknown group ${runas#*:}"
        setpriv --reuid="$uid" --regid="$gid" --clear-groups -- env "${envs[@]}" "$@"
    else
        env "${envs[@]}" "$@"
    fi
}
