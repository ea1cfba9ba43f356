#!/usr/bin/env bash
# Usage: testbed/domain.sh NAME [MODE]
#
# Print the transient domain XML of one testbed guest on stdout, rendered from
# testbed/domain.xml.in (see there for what each part is for).
#   NAME  domain name and tb.name= ([A-Za-z0-9][A-Za-z0-9_.-]*, max 64 chars)
#   MODE  plain (default) or shell: the guest's console server (testbed/init.sh)
#
# Environment:
#   TESTBED_DIR       cache dir with vmlinuz and initramfs.cpio.gz (testbed/build.sh)
#   TB_ACCEL          qemu|kvm; default: $TESTBED_DIR/accel (probe-accel.sh), else qemu
#   TB_MEMORY_MIB     guest RAM, default 96 (less makes boots fail at random)
#   TB_TB_CACHE_MIB   TCG translation cache, default 16
#   TB_SERIAL_LOG     if set, record the serial output into this file
#   TB_CMDLINE_EXTRA  appended to the kernel command line
#
# Example (a file, not <(...): virsh.sh may switch to another uid, which
# cannot reopen the caller's pipe):
#   testbed/embed-root.sh /tmp/tbroot
#   testbed/domain.sh tb-1 >/tmp/tbroot/tb-1.xml
#   testbed/virsh.sh /tmp/tbroot create /tmp/tbroot/tb-1.xml
set -euo pipefail

TB_PROG=domain
# shellcheck source=testbed/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    tb_die "usage: $0 NAME [plain|shell]"
fi
name=$1
mode=${2:-plain}

[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] ||
    tb_die "invalid NAME '$name' (use [A-Za-z0-9][A-Za-z0-9_.-]*, at most 64 characters)"
case $mode in
    plain | shell) ;;
    *) tb_die "invalid MODE '$mode' (expected plain or shell)" ;;
esac

accel=$(tb_accel)
memory=${TB_MEMORY_MIB:-96}
tb_cache=${TB_TB_CACHE_MIB:-16}
[[ $memory =~ ^[0-9]+$ ]] || tb_die "TB_MEMORY_MIB must be a number of MiB"
[[ $tb_cache =~ ^[0-9]+$ ]] || tb_die "TB_TB_CACHE_MIB must be a number of MiB"
if [ "$memory" -lt 96 ]; then
    tb_warn "TB_MEMORY_MIB=$memory: below 96 MiB the guest kernel OOM-panics in some boots"
fi

kernel=$TESTBED_DIR/vmlinuz
initrd=$TESTBED_DIR/initramfs.cpio.gz
for f in "$kernel" "$initrd"; do
    [ -s "$f" ] || tb_die "missing $f; run testbed/build.sh first"
done
kernel=$(tb_abspath "$kernel")
initrd=$(tb_abspath "$initrd")

cmdline="console=ttyS0,115200 quiet loglevel=0 panic=-1 tb.name=$name tb.mode=$mode"
if [ -n "${TB_CMDLINE_EXTRA:-}" ]; then
    cmdline="$cmdline $TB_CMDLINE_EXTRA"
fi

xml_escape() {
    local s=$1
    s=${s//&/&amp;}
    s=${s//</&lt;}
    s=${s//>/&gt;}
    s=${s//\'/&apos;}
    s=${s//\"/&quot;}
    printf '%s' "$s"
}

tcg=
if [ "$accel" = qemu ]; then
    tcg="<tcg><tb-cache unit='MiB'>$tb_cache</tb-cache></tcg>"
fi
serial_log=
if [ -n "${TB_SERIAL_LOG:-}" ]; then
    serial_log="<log file='$(xml_escape "$(tb_abspath "$TB_SERIAL_LOG")")' append='off'/>"
fi

template=$TB_DIR/domain.xml.in
[ -r "$template" ] || tb_die "missing $template"
xml=$(<"$template")
# Drop the leading documentation comment (everything up to the first "-->").
xml=${xml#*-->$'\n'}

# Bash 5.2 would expand an unquoted & in a ${var//pat/rep} replacement.
shopt -u patsub_replacement 2>/dev/null || true
subst() { xml=${xml//"$1"/"$2"}; }
subst @DOMAIN_TYPE@ "$accel"
subst @NAME@ "$name"
subst @MEMORY_MIB@ "$memory"
subst @KERNEL@ "$(xml_escape "$kernel")"
subst @INITRD@ "$(xml_escape "$initrd")"
subst @CMDLINE@ "$(xml_escape "$cmdline")"
subst @TCG@ "$tcg"
subst @SERIAL_LOG@ "$serial_log"

# Placeholders that rendered empty leave blank lines behind.
while IFS= read -r line; do
    [[ $line =~ ^[[:space:]]*$ ]] || printf '%s\n' "$line"
done <<<"$xml"
