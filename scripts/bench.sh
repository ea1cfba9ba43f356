#!/usr/bin/env bash
# The benchmark: virt-reactor against libvirt's default event loop, every scenario
# of docs/benchmarks.md, in one invocation.
#
#   bash scripts/bench.sh                 # the full run (about 15-20 minutes)
#   bash scripts/bench.sh --quick --runs 1   # a smoke test of the harness (~1 minute)
#   bash scripts/bench.sh --only s2,s5 --runs 3
#   bash scripts/bench.sh --only s6 --service-guests 8,24,48   # console service vs conserver
#   bash scripts/bench.sh --only s7 --runs 5   # consoles on 3 hosts (network namespaces) vs 1, hosts 1 and 3 while host 2 restarts, reconnects
#   bash scripts/bench.sh --only s8 --runs 5   # consoles at scale: 1, 24, 48 guests, both loops, echo and the loop's own delay (probe)
#   bash scripts/bench.sh --only s9 --runs 5   # console floods: 1 and 24 guests print flat out through virt-consoled, a quiet console beside
#   bash scripts/bench.sh --only s10 --runs 5  # whole programs: vol, a C client, virsh, the library on both loops; N=1,16,64
#   # The async path against the mio path (docs/benchmarks.md, "Async path"): client
#   # CPU per GiB, and the counts that do not depend on the machine's load: syscalls,
#   # context switches and page faults of the measured part (perf stat, --perf-stat),
#   # instructions per GiB under callgrind (--instructions RUNS, interleaved).
#   bash scripts/bench.sh --only s1 --filter "N=1" --runs 9 --perf-stat --instructions 3
#
# Arguments go to `cargo bench --bench compare --` (see benches/compare/main.rs).
# It needs nothing set up by hand: it installs missing packages (setup-host.sh),
# builds the testbed guests (testbed/build.sh), gives the bench a scratch directory
# on /dev/shm for the storage pool, and the bench starts its own private,
# unprivileged libvirtd (as tests/support/daemon.rs does), boots the guests on it,
# and removes daemon, guests and pool when it ends (also on failure or Ctrl-C).
# Results: target/bench/results.md (tables and target checks), target/bench/raw.tsv
# (every run's figures), target/bench/benchmarks-s2.svg (the scenario 2 plot;
# copied to docs/ by a full run, i.e. one without arguments).
# With valgrind installed, scenario 2 also counts instructions per iteration.
# Scenario 6 runs the release build of virt-consoled (built here) against a private
# conserver (Debian's conserver-server, installed by setup-host.sh).
# COMPARE_PERF=DIR records a perf profile of every child; COMPARE_WRAP='CMD ARGS'
# runs every child behind CMD, `{}` in ARGS replaced by a file name of its own
# (e.g. COMPARE_WRAP='perf trace -s -o /tmp/trace/{}.txt').
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PATH="$PATH:/usr/sbin:/sbin"

bash scripts/setup-host.sh >/dev/null
# The counting options need their tools: perf (Debian's linux-perf) and valgrind.
need=()
for arg in "$@"; do
    case "$arg" in
    --perf-stat) command -v perf >/dev/null || need+=(linux-perf) ;;
    --instructions*) command -v valgrind >/dev/null || need+=(valgrind) ;;
    esac
done
if [ "${#need[@]}" -gt 0 ]; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "bench: installing ${need[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
bash testbed/build.sh >/dev/null

parent=/dev/shm
[ -d "$parent" ] && [ -w "$parent" ] || parent=${TMPDIR:-/tmp}
scratch=$(mktemp -d "$parent/virt-reactor-bench-XXXXXX")
chmod 0755 "$scratch"
trap 'rm -rf "$scratch"' EXIT

extra=()
if command -v valgrind >/dev/null; then
    extra+=(--callgrind)
fi

cargo build --release --quiet --features console-service --bin virt-consoled
# Scenario 10's programs: vol, and the C client it is set against.
cargo build --release --quiet --example vol
cc -O2 -Wall -o target/release/vol_c benches/c/vol_c.c $(pkg-config --cflags --libs libvirt)

out=${BENCH_OUT:-target/bench}
mkdir -p "$out"
echo "bench: load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs; results in $out"
cargo bench --quiet --bench compare -- \
    --out "$out" --svg "$out/benchmarks-s2.svg" --scratch "$scratch" "${extra[@]}" "$@"
# Only a full run (no arguments) replaces the plot in the docs.
if [ "$#" -eq 0 ] && [ -f "$out/benchmarks-s2.svg" ]; then
    cp "$out/benchmarks-s2.svg" docs/benchmarks-s2.svg
    echo "bench: updated docs/benchmarks-s2.svg"
fi
