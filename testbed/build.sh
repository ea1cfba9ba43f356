#!/usr/bin/env bash
# Build the guest artefacts of the console testbed into $TESTBED_DIR
# (default: <repo>/.testbed). Idempotent; a second run rebuilds nothing.
#
#   vmlinuz              Debian cloud kernel (the one linux-image-cloud-amd64
#                        depends on), unpacked from its .deb, never installed
#   kernel.version       package name and version of that kernel
#   initramfs.cpio.gz    static busybox + testbed/init.sh as /init
#   initramfs.stamp      hash of the inputs the initramfs was built from
#
# Environment: TESTBED_DIR, TESTBED_BUSYBOX (default /bin/busybox; must be
# static, i.e. from busybox-static).
# Prints the paths of the two artefacts on stdout.
set -euo pipefail

TB_PROG=build
# shellcheck source=testbed/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUSYBOX=${TESTBED_BUSYBOX:-/bin/busybox}
INIT_SRC=$TB_DIR/init.sh
# Bump when the layout of the archive below changes.
INITRAMFS_RECIPE=1

mkdir -p "$TESTBED_DIR"
TESTBED_DIR=$(cd "$TESTBED_DIR" && pwd -P)

work=
cleanup_work() { if [ -n "$work" ]; then rm -rf "$work"; fi; }
trap cleanup_work EXIT

is_root() { [ "$(id -u)" -eq 0 ]; }

install_packages() {
    is_root || tb_die "missing packages: $* (install them: apt-get install -y --no-install-recommends $*)"
    tb_log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 ||
        tb_die "apt-get install $* failed"
}

apt_update() {
    is_root || tb_die "apt lists are missing or stale and we are not root: run apt-get update"
    tb_log "running apt-get update"
    apt-get update -qq >&2 || tb_die "apt-get update failed"
}

kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

# (a) Guest kernel.
build_kernel() {
    if [ -s "$TESTBED_DIR/vmlinuz" ]; then
        tb_log "kernel: $TESTBED_DIR/vmlinuz exists ($(cat "$TESTBED_DIR/kernel.version" 2>/dev/null || echo 'version unknown')), skipping"
        return
    fi
    tb_need apt-cache apt-get dpkg-deb tar
    local pkg
    pkg=$(kernel_package)
    if [ -z "$pkg" ]; then
        apt_update
        pkg=$(kernel_package)
        [ -n "$pkg" ] || tb_die "cannot resolve the kernel package of linux-image-cloud-amd64 (apt-cache depends)"
    fi
    tb_log "kernel: downloading $pkg"
    work=$(mktemp -d "$TESTBED_DIR/.kernel.XXXXXX")
    # apt downloads as user _apt; let it write into the work dir (otherwise
    # it falls back to an unsandboxed download with a warning).
    chmod 755 "$work"
    if is_root && id _apt >/dev/null 2>&1; then chown _apt "$work"; fi
    if ! (cd "$work" && apt-get download -qq "$pkg" >&2); then
        tb_warn "apt-get download failed, refreshing the package lists and retrying"
        apt_update
        (cd "$work" && apt-get download -qq "$pkg" >&2) || tb_die "apt-get download $pkg failed"
    fi
    local deb
    deb=$(find "$work" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)
    [ -n "$deb" ] || tb_die "apt-get download produced no ${pkg}_*.deb"
    tb_log "kernel: unpacking $(basename "$deb") (not installing it)"
    mkdir "$work/root"
    # Equivalent to dpkg-deb -x, but extracts only /boot, not ~100 MB of modules.
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/root" --wildcards './boot/vmlinuz-*' ||
        tb_die "could not extract boot/vmlinuz-* from $deb"
    local vmlinuz
    vmlinuz=$(find "$work/root/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
    [ -n "$vmlinuz" ] || tb_die "$deb contains no boot/vmlinuz-*"
    cp "$vmlinuz" "$TESTBED_DIR/vmlinuz.tmp"
    chmod 644 "$TESTBED_DIR/vmlinuz.tmp"
    printf '%s %s\n' "$(dpkg-deb -f "$deb" Package)" "$(dpkg-deb -f "$deb" Version)" \
        >"$TESTBED_DIR/kernel.version"
    mv "$TESTBED_DIR/vmlinuz.tmp" "$TESTBED_DIR/vmlinuz"
    rm -rf "$work"
    work=
    tb_log "kernel: $TESTBED_DIR/vmlinuz ($(basename "$vmlinuz"))"
}

# (b) initramfs: static busybox + init.sh as /init.
build_initramfs() {
    [ -f "$INIT_SRC" ] || tb_die "missing $INIT_SRC"
    if [ ! -x "$BUSYBOX" ]; then
        [ "$BUSYBOX" = /bin/busybox ] || tb_die "TESTBED_BUSYBOX=$BUSYBOX is not executable"
        install_packages busybox-static
    fi
    # A dynamic busybox cannot run in an initramfs without its libraries.
    if ldd "$BUSYBOX" >/dev/null 2>&1; then
        tb_die "$BUSYBOX is dynamically linked; install busybox-static"
    fi
    command -v cpio >/dev/null || install_packages cpio
    tb_need cpio gzip sha256sum find sort

    local stamp
    stamp=$(
        printf 'recipe %s\n' "$INITRAMFS_RECIPE"
        sha256sum <"$INIT_SRC" | sed 's/ .*/  init.sh/'
        sha256sum <"$BUSYBOX" | sed 's/ .*/  busybox/'
    )
    if [ -s "$TESTBED_DIR/initramfs.cpio.gz" ] && [ -f "$TESTBED_DIR/initramfs.stamp" ] &&
        [ "$(cat "$TESTBED_DIR/initramfs.stamp")" = "$stamp" ]; then
        tb_log "initramfs: up to date (init.sh and busybox unchanged), skipping"
        return
    fi

    tb_log "initramfs: building from $BUSYBOX and $INIT_SRC"
    work=$(mktemp -d "$TESTBED_DIR/.initramfs.XXXXXX")
    local stage=$work/stage
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
    cp "$BUSYBOX" "$stage/bin/busybox"
    cp "$INIT_SRC" "$stage/init"
    chmod 755 "$stage/bin/busybox" "$stage/init"
    chmod 1777 "$stage/tmp"
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet) |
        gzip -9n >"$TESTBED_DIR/initramfs.cpio.gz.tmp" ||
        tb_die "packing the initramfs failed"
    chmod 644 "$TESTBED_DIR/initramfs.cpio.gz.tmp"
    mv "$TESTBED_DIR/initramfs.cpio.gz.tmp" "$TESTBED_DIR/initramfs.cpio.gz"
    printf '%s\n' "$stamp" >"$TESTBED_DIR/initramfs.stamp"
    rm -rf "$work"
    work=
    tb_log "initramfs: $TESTBED_DIR/initramfs.cpio.gz ($(stat -c %s "$TESTBED_DIR/initramfs.cpio.gz") bytes)"
}

build_kernel
build_initramfs

# (c) Results.
printf 'kernel=%s\n' "$TESTBED_DIR/vmlinuz"
printf 'initrd=%s\n' "$TESTBED_DIR/initramfs.cpio.gz"
if [ -r "$TESTBED_DIR/accel" ]; then
    printf 'accel=%s\n' "$(head -n 1 "$TESTBED_DIR/accel")"
else
    tb_log "no accelerator decided yet (testbed/probe-accel.sh); domains default to TCG"
fi
