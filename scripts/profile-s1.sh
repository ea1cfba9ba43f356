#!/usr/bin/env bash
# Where a scenario 1 client spends its CPU, for each loop: one run per loop of one
# case under `perf record`, then the samples grouped by who spends them.
#
#   bash scripts/profile-s1.sh                    # download N=16
#   bash scripts/profile-s1.sh "upload N=64"
#   PROFILE_DIR=/tmp/p bash scripts/profile-s1.sh   # keep the perf data
#
# Groups (self time, --no-children), averaged over RUNS runs per loop (default 3):
#   loop        virt-reactor's engine and mio, or GLib's main loop and libvirt's
#               vireventglib.c, plus the kernel's epoll/poll code
#   reactor     virt-reactor's stream code (slab, inbox, handlers): the same on both
#   libvirt     libvirt.so and the XDR/TLS libraries it calls
#   copies      memmove/memcpy/memset (libc), called by libvirt to move the bytes
#   check       the benchmark's byte check (the same code on both loops)
#   socket      the kernel copying the bytes between libvirt and the socket
#   switches    the kernel switching to and from the client while it waits
#   memory      page faults and page allocation for libvirt's message buffers
#   kernel      the rest of the kernel
#   other       the rest (allocator, std, dynamic loader)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case=${1:-download N=16}
command -v perf >/dev/null || { echo "profile-s1: needs perf (linux-perf)" >&2; exit 1; }

# PROFILE_DIR=DIR keeps the perf data there for a closer look (perf report -i).
if [ -n "${PROFILE_DIR:-}" ]; then
    dir=$PROFILE_DIR
    mkdir -p "$dir"
else
    dir=$(mktemp -d /tmp/virt-reactor-profile-XXXXXX)
    trap 'rm -rf "$dir"' EXIT
fi
COMPARE_PERF=$dir BENCH_OUT=$dir/out \
    bash scripts/bench.sh --only s1 --runs "${RUNS:-3}" --filter "$case" >&2

groups="loop reactor libvirt copies check socket switches memory kernel other"

classify() {
    awk -v groups="$groups" '
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
        else if (dso ~ /kernel/ && sym ~ /copy_(to|from)_iter|unix_stream|skb|sock_|(recv|send)msg|recvfrom|sendto/)
            group = "socket"
        else if (dso ~ /kernel/ && sym ~ /finish_task_switch|__schedule|schedule_hrtimeout|pick_next|switch_to|try_to_wake_up/)
            group = "switches"
        else if (dso ~ /kernel/ && sym ~ /page_fault|clear_page|anonymous_page|handle_mm_fault|memcg|page_counter|folio|lruvec|get_page_from_freelist|unmap_page|charge/)
            group = "memory"
        else if (dso ~ /kernel/) group = "kernel"
        else group = "other"
        total[group] += share
    }
    END {
        n = split(groups, order, " ")
        for (i = 1; i <= n; i++) printf "%s %.1f\n", order[i], total[order[i]]
    }'
}

printf '| share of client CPU (%s) | ours | default |\n|---|---|---|\n' "$case"
declare -A share
for loop in ours default; do
    files=("$dir"/transfer-"$loop"-*.perf)
    for file in "${files[@]}"; do
        while read -r group value; do
            share[$loop,$group]=$(awk -v a="${share[$loop,$group]:-0}" -v b="$value" \
                -v n="${#files[@]}" 'BEGIN { printf "%.2f", a + b / n }')
        done < <(perf report -i "$file" --no-children --sort dso,sym --stdio -g none \
            --percent-limit 0 2>/dev/null | classify)
    done
done
for group in $groups; do
    printf '| %s | %.1f %% | %.1f %% |\n' "$group" "${share[ours,$group]}" "${share[default,$group]}"
done
