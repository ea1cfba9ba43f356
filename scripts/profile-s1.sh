#!/usr/bin/env bash
# Where a scenario 1 client spends its CPU, for each loop: one run per loop of one
# case under `perf record`, then the samples grouped by who spends them.
#
#   bash scripts/profile-s1.sh                    # download N=16
#   bash scripts/profile-s1.sh "upload N=64"
#
# Groups (self time, --no-children):
#   loop       virt-reactor's engine and mio, or GLib's main loop and libvirt's
#              vireventglib.c, plus the kernel's epoll/poll code
#   reactor    virt-reactor's stream code (slab, inbox, handlers): the same on both
#   libvirt    libvirt.so and the XDR/TLS/compression libraries it calls
#   copies     memmove/memcpy/memset (libc), called by libvirt to move the bytes
#   check      the benchmark's byte check (the same code on both loops)
#   kernel     everything else in the kernel: socket reads, scheduling, page faults
#   other      the rest (allocator, std, dynamic loader)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case=${1:-download N=16}
command -v perf >/dev/null || { echo "profile-s1: needs perf (linux-perf)" >&2; exit 1; }

dir=$(mktemp -d /tmp/virt-reactor-profile-XXXXXX)
trap 'rm -rf "$dir"' EXIT
COMPARE_PERF=$dir BENCH_OUT=$dir/out \
    bash scripts/bench.sh --only s1 --runs 1 --filter "$case" >&2

classify() {
    awk '
    /^#/ || NF < 4 { next }
    {
        share = $1; sub(/%/, "", share); dso = $2; sym = ""
        for (i = 4; i <= NF; i++) sym = sym " " $i
        if (sym ~ /virt_reactor::(engine|event_loop|ffi::(closure|callback|event_impl))|mio::|Driver::run_once/ \
            || dso ~ /libglib/ || sym ~ /virEventGLib|virEventRunDefaultImpl/ \
            || (dso ~ /kernel/ && sym ~ /ep_|epoll|do_poll|do_sys_poll|poll_freewait|__pollwait/))
            group = "loop"
        else if (sym ~ /data::check|data::fill/) group = "check"
        else if (sym ~ /virt_reactor::/) group = "reactor"
        else if (dso ~ /libvirt|libtirpc|libgnutls|libxml/) group = "libvirt"
        else if (sym ~ /mem(move|cpy|set)/) group = "copies"
        else if (dso ~ /kernel/) group = "kernel"
        else group = "other"
        total[group] += share
    }
    END {
        n = split("loop reactor libvirt copies check kernel other", order, " ")
        for (i = 1; i <= n; i++) printf "%s %.1f\n", order[i], total[order[i]]
    }'
}

printf '| share of client CPU (%s) | ours | default |\n|---|---|---|\n' "$case"
declare -A share
for loop in ours default; do
    file=$(ls "$dir"/transfer-"$loop"-*.perf | head -1)
    while read -r group value; do
        share[$loop,$group]=$value
    done < <(perf report -i "$file" --no-children --sort dso,sym --stdio -g none \
        --percent-limit 0 2>/dev/null | classify)
done
for group in loop reactor libvirt copies check kernel other; do
    printf '| %s | %s %% | %s %% |\n' "$group" "${share[ours,$group]}" "${share[default,$group]}"
done
