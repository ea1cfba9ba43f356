#!/usr/bin/env python3
"""Boot testbed guests through the embedded QEMU driver and check the console.

Usage: testbed/smoke.py [--root DIR] [--runs N] [--mode plain|shell]
                        [--method console|log] [--echoes N] [--keep]

Per run: render the XML (testbed/domain.sh), then
  console  run "virsh create XML --console" in a pty (testbed/virsh.sh),
           measure spawn -> "TESTBED-READY name=NAME", then send
           "echo hello-K\\n" --echoes times and time each reply ("\\nhello-K\\r"),
           detach with ^], destroy the guest;
  log      run "virsh create XML" with a <serial><log file=...>, measure
           spawn -> create returned -> banner in the log, destroy the guest.
Run 1 on a fresh root includes libvirt's one-off QEMU capability probe.
--keep leaves the last guest running (for testing testbed/cleanup.sh).
Uses only the standard library. Exits non-zero if a run fails.
"""

import argparse
import os
import pty
import select
import statistics
import subprocess
import sys
import time

TB_DIR = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"smoke: {msg}", file=sys.stderr, flush=True)


def die(msg):
    log(f"error: {msg}")
    sys.exit(1)


def script(name):
    return os.path.join(TB_DIR, name)


def virsh(root, *args, check=True):
    return subprocess.run([script("virsh.sh"), root, *args], check=check,
                          capture_output=True, text=True)


def render(root, name, mode, serial_log=None):
    env = dict(os.environ)
    if serial_log:
        env["TB_SERIAL_LOG"] = serial_log
    xml = subprocess.run([script("domain.sh"), name, mode], check=True,
                         capture_output=True, text=True, env=env).stdout
    path = os.path.join(root, f"{name}.xml")
    with open(path, "w") as f:
        f.write(xml)
    os.chmod(path, 0o644)
    return path


class Pty:
    """A child process on a pty, with a read buffer."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            try:
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        self.buf = b""

    def read_until(self, needle, deadline):
        while needle not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    return False
                if not data:
                    return False
                self.buf += data
        return True

    def close(self, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    os.read(self.fd, 65536)
                except OSError:
                    pass
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        return None


def run_console(args, root, name):
    xml = render(root, name, args.mode)
    t0 = time.monotonic()
    con = Pty([script("virsh.sh"), root, "create", xml, "--console"])
    banner = f"TESTBED-READY name={name}\r\n".encode()
    if not con.read_until(banner, t0 + args.timeout):
        con.close(1)
        die(f"{name}: no banner within {args.timeout} s; console said: {con.buf[-400:]!r}")
    boot = time.monotonic() - t0
    # Guest-side view: seconds since the guest kernel started, read back right
    # after the banner (separates guest boot from libvirt/QEMU start-up).
    con.buf = b""
    os.write(con.fd, b"echo up=$(cut -d' ' -f1 /proc/uptime)\n")
    if not con.read_until(b"\r\n", time.monotonic() + 10) or \
            not con.read_until(b"\nup=", time.monotonic() + 10) or \
            not con.read_until(b"\r\n", time.monotonic() + 10):
        con.close(1)
        die(f"{name}: no reply to the uptime query; got {con.buf!r}")
    uptime = float(con.buf.split(b"\nup=")[1].split(b"\r")[0])
    rtts = []
    for k in range(1, args.echoes + 1):
        con.buf = b""
        t = time.monotonic()
        os.write(con.fd, f"echo hello-{k}\n".encode())
        if not con.read_until(f"\nhello-{k}\r".encode(), t + 10):
            con.close(1)
            die(f"{name}: no reply to echo hello-{k}; got {con.buf!r}")
        rtts.append(time.monotonic() - t)
        if k == 1:
            con.read_until(f"\nhello-{k}\r\n".encode(), t + 1)
            first = con.buf
    os.write(con.fd, b"\x1d")  # ^] detaches virsh console
    code = con.close()
    if code != 0:
        log(f"{name}: virsh console exited with {code}")
    if args.echoes:
        log(f"{name}: first reply bytes {first!r}")
    return boot, None, rtts, uptime


def run_log(args, root, name):
    serial_log = os.path.join(root, f"{name}.serial.log")
    xml = render(root, name, args.mode, serial_log)
    banner = f"TESTBED-READY name={name}".encode()
    t0 = time.monotonic()
    res = virsh(root, "create", xml, check=False)
    created = time.monotonic() - t0
    if res.returncode != 0:
        die(f"{name}: virsh create failed: {res.stderr.strip()}")
    while True:
        try:
            with open(serial_log, "rb") as f:
                if banner in f.read():
                    break
        except FileNotFoundError:
            pass
        if time.monotonic() - t0 > args.timeout:
            die(f"{name}: no banner in {serial_log} within {args.timeout} s")
        time.sleep(0.01)
    return time.monotonic() - t0, created, [], None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/tbroot")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mode", choices=["plain", "shell"], default="plain")
    ap.add_argument("--method", choices=["console", "log"], default="console")
    ap.add_argument("--echoes", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--prefix", default="tb-smoke")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    subprocess.run([script("embed-root.sh"), args.root], check=True,
                   stdout=subprocess.DEVNULL)
    root = os.path.realpath(args.root)
    boots, creates, all_rtts, uptimes = [], [], [], []
    for i in range(1, args.runs + 1):
        name = f"{args.prefix}-{i}"
        runner = run_console if args.method == "console" else run_log
        boot, created, rtts, uptime = runner(args, root, name)
        boots.append(boot)
        if uptime is not None:
            uptimes.append(uptime)
        if created is not None:
            creates.append(created)
        msg = f"{name}: create->banner {boot:.2f} s"
        if created is not None:
            msg += f" (virsh create returned after {created:.2f} s)"
        if uptime is not None:
            msg += f" (guest uptime {uptime:.2f} s)"
        if rtts:
            msg += (f", echo rtt first {rtts[0] * 1000:.1f} ms,"
                    f" median {statistics.median(rtts) * 1000:.1f} ms,"
                    f" max {max(rtts) * 1000:.1f} ms over {len(rtts)}")
            all_rtts += rtts[1:]
        log(msg)
        if not (args.keep and i == args.runs):
            t = time.monotonic()
            res = virsh(root, "destroy", name, check=False)
            # A transient guest reattached by a new process (each virsh is
            # one) is destroyed but reported as "Domain not found".
            if res.returncode != 0 and "Domain not found" not in res.stderr:
                die(f"{name}: destroy failed: {res.stderr.strip()}")
            if name in virsh(root, "list", "--name").stdout.split():
                die(f"{name}: still running after destroy")
            log(f"{name}: destroyed in {time.monotonic() - t:.2f} s")
    print(f"runs={len(boots)} mode={args.mode} method={args.method}")
    print("create_to_banner_s=" + ",".join(f"{b:.2f}" for b in boots))
    print(f"create_to_banner_median_s={statistics.median(boots):.2f}")
    if len(boots) > 1:
        print(f"create_to_banner_median_warm_s={statistics.median(boots[1:]):.2f}")
    if uptimes:
        print("guest_uptime_at_banner_s=" + ",".join(f"{u:.2f}" for u in uptimes))
    if creates:
        print("virsh_create_s=" + ",".join(f"{c:.2f}" for c in creates))
    if all_rtts:
        print(f"echo_rtt_median_ms={statistics.median(all_rtts) * 1000:.2f}")


if __name__ == "__main__":
    main()
