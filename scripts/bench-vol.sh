#!/usr/bin/env bash
# Throughput of the `vol` example (one process, one reactor thread) against
# `virsh vol-download` (libvirt's default event loop), downloading a volume of
# random data from a private libvirtd:
#
#   vol-1     vol download, 1 volume
#   virsh-1   virsh vol-download, 1 volume
#   vol-16    vol download, 16 downloads in one process
#   virsh-16  16 virsh vol-download processes in parallel
#
# Each variant runs once to warm up (not counted: on a VM, first-touch page faults of
# fresh memory dominate the first round), then RUNS times, the variants alternating;
# prints every run and the median MiB/s (wall clock of the whole command, startup and
# connect included).
#
# Usage: bash scripts/bench-vol.sh
#   env: RUNS=3 WARMUP=1 SIZE_MIB=256 PARALLEL=16 VARIANTS="vol-1 virsh-1 vol-16 virsh-16"
#
# Needs nothing set up by hand: it builds the example, starts its own unprivileged
# libvirtd in a temp dir the way tests/support/daemon.rs does (session mode, as
# nobody when run as root, setpriv --pdeathsig), and removes everything on exit.
# Downloads go to /dev/shm when it has room (so neither side waits for a disk;
# note that vol fsyncs each finished file, virsh does not), else to the temp dir.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS=${RUNS:-3}
WARMUP=${WARMUP:-1}
SIZE_MIB=${SIZE_MIB:-256}
PARALLEL=${PARALLEL:-16}
PATH="$PATH:/usr/sbin:/sbin"

for tool in libvirtd setpriv virsh; do
    command -v "$tool" >/dev/null || {
        echo "bench-vol: $tool not found; run scripts/setup-host.sh" >&2
        exit 1
    }
done

echo "bench-vol: building the vol example (release)"
cargo build --quiet --release --example vol
VOL=$PWD/target/release/examples/vol
[ -n "${CARGO_TARGET_DIR:-}" ] && VOL=$CARGO_TARGET_DIR/release/examples/vol

root=$(mktemp -d /tmp/virt-reactor-bench-XXXXXX)
chmod 0700 "$root"
daemon_pid=
out=
cleanup() {
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    [ -n "$out" ] && rm -rf "$out"
    rm -rf "$root"
}
trap cleanup EXIT

# The daemon: session mode under a non-root uid, all state in $root.
mkdir -p "$root"/{run,config/libvirt,cache,data,tmp}
echo "log_outputs = \"3:file:$root/libvirtd.log\"" >"$root/config/libvirt/libvirtd.conf"
echo 'stdio_handler = "file"' >"$root/config/libvirt/qemu.conf"
as_user=()
if [ "$(id -u)" -eq 0 ]; then
    chown -R 65534:65534 "$root"
    as_user=(--reuid=65534 --regid=65534 --clear-groups)
fi
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C \
    HOME="$root" XDG_RUNTIME_DIR="$root/run" XDG_CONFIG_HOME="$root/config" \
    XDG_CACHE_HOME="$root/cache" XDG_DATA_HOME="$root/data" TMPDIR="$root/tmp" \
    setpriv "${as_user[@]}" --pdeathsig KILL -- libvirtd --timeout 600 \
    >"$root/libvirtd.stderr" 2>&1 &
daemon_pid=$!
uri="qemu+unix:///session?socket=$root/run/libvirt/libvirt-sock"
for _ in $(seq 150); do
    virsh -q -c "$uri" version >/dev/null 2>&1 && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$root/libvirtd.stderr" >&2; exit 1; }
    sleep 0.1
done
virsh -q -c "$uri" version >/dev/null

virsh -q -c "$uri" pool-define-as bench dir --target "$root/pool" >/dev/null
virsh -q -c "$uri" pool-build bench >/dev/null
virsh -q -c "$uri" pool-start bench >/dev/null
virsh -q -c "$uri" vol-create-as bench src "${SIZE_MIB}M" --format raw >/dev/null
# Random data, written into the daemon's file (keeps its owner).
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom |
    dd of="$root/pool/src" conv=notrunc bs=1M status=none iflag=fullblock
cat "$root/pool/src" >/dev/null # page cache: every run reads from memory

need=$((PARALLEL * SIZE_MIB + 256))
shm_free=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')
if [ -n "$shm_free" ] && [ "$shm_free" -gt "$need" ]; then
    out=$(mktemp -d /dev/shm/virt-reactor-bench-XXXXXX)
else
    out=$root/out
    mkdir -p "$out"
fi
echo "bench-vol: $SIZE_MIB MiB volume, $RUNS runs, downloads into $out, $(nproc) CPUs"

run_variant() { # name -> prints MiB/s
    local name=$1 n args i start end
    rm -f "$out"/*
    case $name in
    vol-1 | virsh-1) n=1 ;;
    *) n=$PARALLEL ;;
    esac
    start=$(date +%s.%N)
    case $name in
    vol-*)
        args=()
        for i in $(seq "$n"); do args+=(src "$out/f$i"); done
        "$VOL" download --uri "$uri" --pool bench "${args[@]}" >/dev/null 2>&1
        ;;
    virsh-*)
        for i in $(seq "$n"); do
            virsh -q -c "$uri" vol-download --pool bench src "$out/f$i" &
        done
        wait
        ;;
    esac
    end=$(date +%s.%N)
    for i in $(seq "$n"); do
        [ "$(stat -c %s "$out/f$i")" -eq $((SIZE_MIB * 1024 * 1024)) ] || {
            echo "bench-vol: $name: f$i incomplete" >&2
            exit 1
        }
    done
    rm -f "$out"/*
    awk -v n="$n" -v s="$SIZE_MIB" -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", n * s / (b - a) }'
}

read -r -a variants <<<"${VARIANTS:-vol-1 virsh-1 vol-$PARALLEL virsh-$PARALLEL}"
declare -A results
if [ "$WARMUP" -gt 0 ]; then
    for v in "${variants[@]}"; do
        echo "warm-up: $v: $(run_variant "$v") MiB/s"
    done
fi
for run in $(seq "$RUNS"); do
    for v in "${variants[@]}"; do
        r=$(run_variant "$v")
        results[$v]+="$r "
        echo "run $run: $v: $r MiB/s"
    done
done
echo "medians (MiB/s, total over all concurrent downloads):"
for v in "${variants[@]}"; do
    # shellcheck disable=SC2086
    median=$(printf '%s\n' ${results[$v]} | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
    printf '  %-10s %6s   (runs: %s)\n' "$v" "$median" "${results[$v]% }"
done
