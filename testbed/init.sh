#!/bin/busybox sh
# shellcheck shell=sh
# /init (PID 1) of the virt-reactor console testbed initramfs.
#
# Kernel command line knobs:
#   tb.name=NAME          name printed in the banner (and used as hostname)
#   tb.mode=plain|shell   console server, default plain
#
# Protocol on ttyS0 (the guest's first serial port = the libvirt console):
#   TESTBED-READY name=NAME            printed once, when the server is about
#                                      to read; input sent after it is served
#   TESTBED-RESTART name=NAME mode=M status=S
#                                      the server exited (status S) and is
#                                      being started again
#
# plain: a non-interactive read/eval loop on the cooked tty. No prompt, no
#        escape sequences; the kernel echoes the input line, so sending
#        "echo hello-1\n" returns "echo hello-1\r\nhello-1\r\n". ^D on an
#        empty line ends the loop (it is restarted). No controlling tty, so
#        ^C is plain data.
# shell: an interactive busybox sh (prompt "tb# ", job control, ^C works).
#        It emits ESC[6n after prompts and adds ~20 ms per command.
#
# Never exits: PID 1 exiting panics the kernel (panic=-1 reboots, and the
# domain's on_reboot=destroy removes the guest). Use "poweroff -f" for that.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /root
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root PS1='tb# ' TERM=vt100

mount -t proc proc /proc
mount -t sysfs sysfs /sys
if ! mount -t devtmpfs devtmpfs /dev 2>/dev/null; then
    mknod -m 600 /dev/ttyS0 c 4 64
    mknod -m 666 /dev/null c 1 3
fi
echo 0 >/proc/sys/kernel/printk

TTY=/dev/ttyS0
# Everything init prints (including errors) goes to the console.
exec </dev/null >"$TTY" 2>&1

# Protocol lines open the tty afresh: when a session leader that owns the
# serial tty as its controlling tty exits (shell mode), the kernel hangs the
# tty up, and every descriptor opened before, like init's stdout, then fails.
say() { echo "$*" >"$TTY"; }

NAME=unknown
MODE=plain
# shellcheck disable=SC2013 # word splitting of the command line is intended
for arg in $(cat /proc/cmdline); do
    case $arg in
        tb.name=*) NAME=${arg#tb.name=} ;;
        tb.mode=*) MODE=${arg#tb.mode=} ;;
    esac
done
case $MODE in
    plain | shell) ;;
    *)
        say "TESTBED-WARNING name=$NAME unknown tb.mode=$MODE, using plain"
        MODE=plain
        ;;
esac
hostname "$NAME"

serve() {
    # Cooked mode, echo on, ICRNL/ONLCR: what the plain protocol relies on.
    # Redone on every start: a killed interactive shell can leave raw mode.
    stty -F "$TTY" sane 115200
    if [ "$MODE" = shell ]; then
        # -c: the tty becomes the controlling tty of the new session.
        setsid -c sh -i <"$TTY" >"$TTY" 2>&1
    else
        # The tty is opened before setsid, so it is not a controlling tty.
        # shellcheck disable=SC2016 # expanded by the inner shell
        setsid sh -c 'while IFS= read -r line; do eval "$line"; done' \
            <"$TTY" >"$TTY" 2>&1
    fi
}

stty -F "$TTY" sane 115200
say "TESTBED-READY name=$NAME"
while :; do
    serve
    status=$?
    exec >"$TTY" 2>&1
    say "TESTBED-RESTART name=$NAME mode=$MODE status=$status"
    # Input typed meanwhile stays queued in the tty; this only stops a
    # broken server from spinning.
    sleep 0.2
done
