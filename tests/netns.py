"""A client network namespace behind a shaped link (loss, delay ± jitter, blackouts), made by the test itself.

    root namespace                                   namespace ivnf-<pid>-<n>
    gateway bound to 10.203.A.B+1 ── TUN nfr<pid><n> ══ link_shaper.py ══ TUN nfc0 ── client 10.203.A.B+2

The two ends are TUN devices joined by tests/link_shaper.py (a userspace netem: this kernel has no
sch_netem), so every packet between the client and the gateway is a real packet that both kernels' TCP
stacks see lost, delayed or blacked out. The /30 is private and exists only on these two devices: nothing
can leave the machine. Everything is removed by `close()`; leftovers of a killed run (its pid gone) are
removed by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PREFIX = "ivnf-"
ROOT_TUN_PREFIX = "nfr"
NS_TUN = "nfc0"
SHAPER = Path(__file__).resolve().parent / "link_shaper.py"
CLONE_NEWNET = 0x40000000
_counter = 0


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=10)


def unavailable_reason() -> str | None:
    """Why shaped namespaces cannot be made here (None: they can). Probes with a throwaway namespace."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "ip netns / TUN devices need root (CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed (make test installs it with apt)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (no TUN support)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("tuntap", "add", "dev", NS_TUN, "mode", "tun", netns=probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace with a TUN device: {getattr(exc, 'stderr', exc)}".strip()
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def netem_available() -> bool:
    """Whether the kernel has sch_netem (reported by the bench; the shaper does not need it)."""
    if shutil.which("tc") is None or os.geteuid() != 0:
        return False
    probe = f"{PREFIX}netem-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        done = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                               "delay", "1ms"], capture_output=True, timeout=10)
        return done.returncode == 0
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return False
    finally:
        _ip("netns", "del", probe, check=False)


def remove_leftovers() -> None:
    """Delete namespaces and TUN devices of earlier runs whose process is gone."""
    listing = _ip("netns", "list", check=False).stdout.split()
    for name in listing:
        if name.startswith(PREFIX) and name.count("-") >= 2:
            pid = name.split("-")[1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        digits = name[len(ROOT_TUN_PREFIX):-1]
        if name.startswith(ROOT_TUN_PREFIX) and digits.isdigit() and not Path(f"/proc/{digits}").exists():
            _ip("link", "del", name, check=False)


def _free_subnet() -> tuple[str, str]:
    """A /30 in 10.203.0.0/16 used by no interface of this machine: (root end, namespace end)."""
    used = _ip("-o", "-4", "addr", "show", check=False).stdout
    for _ in range(100):
        third, block = random.randrange(256), random.randrange(64) * 4
        root, client = f"10.203.{third}.{block + 1}", f"10.203.{third}.{block + 2}"
        if f" {root}/" not in used and f" {client}/" not in used and f"peer {root}/" not in used:
            return root, client
    raise RuntimeError("no free /30 in 10.203.0.0/16")


class ShapedLink:
    """One client namespace and its shaped link to the root namespace."""

    def __init__(self, seed: int | None = None) -> None:
        global _counter
        _counter += 1
        pid = os.getpid()
        self.netns = f"{PREFIX}{pid}-{_counter}"
        self.root_tun = f"{ROOT_TUN_PREFIX}{pid}{_counter % 10}"
        self.seed = seed
        self.root_addr = ""
        self.client_addr = ""
        self._shaper: subprocess.Popen | None = None

    def open(self) -> ShapedLink:
        """Create the namespace, both TUN ends, their addresses, and start the shaper (no shaping yet)."""
        remove_leftovers()
        self.root_addr, self.client_addr = _free_subnet()
        try:
            _ip("netns", "add", self.netns)
            _ip("link", "set", "lo", "up", netns=self.netns)
            _ip("tuntap", "add", "dev", NS_TUN, "mode", "tun", netns=self.netns)
            _ip("addr", "add", self.client_addr, "peer", self.root_addr, "dev", NS_TUN, netns=self.netns)
            _ip("link", "set", NS_TUN, "up", netns=self.netns)
            _ip("tuntap", "add", "dev", self.root_tun, "mode", "tun")
            _ip("addr", "add", self.root_addr, "peer", self.client_addr, "dev", self.root_tun)
            _ip("link", "set", self.root_tun, "up")
            args = [sys.executable, str(SHAPER), self.netns, NS_TUN, self.root_tun]
            if self.seed is not None:
                args.append(str(self.seed))
            self._shaper = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            line = self._shaper.stdout.readline()
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError("link shaper did not start")
        except BaseException:
            self.close()
            raise
        return self

    def _command(self, **cmd: Any) -> dict[str, Any]:
        assert self._shaper is not None and self._shaper.stdin is not None and self._shaper.stdout is not None
        self._shaper.stdin.write(json.dumps(cmd) + "\n")
        self._shaper.stdin.flush()
        return json.loads(self._shaper.stdout.readline())

    def shape(self, *, loss: float = 0.0, delay_ms: float = 0.0, jitter_ms: float = 0.0) -> None:
        """Set both directions: drop `loss` of the packets, delay the rest delay_ms ± jitter_ms (uniform)."""
        self._command(loss=loss, delay_ms=delay_ms, jitter_ms=jitter_ms)

    def blackout(self, seconds: float) -> dict[str, Any]:
        """Drop every packet, both ways, for `seconds` from now (returns the shaper's counters)."""
        return self._command(blackout_s=seconds)

    def route_to(self, address: str) -> None:
        """Reach another local address of the root namespace (e.g. another link's end) over this link."""
        _ip("route", "replace", address, "dev", NS_TUN, "src", self.client_addr, netns=self.netns)

    def set_client_link(self, up: bool) -> None:
        """Take the client's interface down (no route: connects fail at once, like a phone between
        networks) or back up."""
        _ip("link", "set", NS_TUN, "up" if up else "down", netns=self.netns)
        if up:  # the peer route goes with the link; put it back if the kernel did not
            _ip("route", "replace", self.root_addr, "dev", NS_TUN, "src", self.client_addr, netns=self.netns)

    def stats(self) -> dict[str, Any]:
        """Packets forwarded, lost to the loss rate, and dropped by blackouts so far."""
        return self._command(stats=True)

    def close(self) -> None:
        """Stop the shaper and delete both TUN devices and the namespace (safe to call twice)."""
        if self._shaper is not None:
            with contextlib.suppress(Exception):
                self._shaper.stdin.close()
            with contextlib.suppress(Exception):
                self._shaper.wait(3)
            if self._shaper.poll() is None:
                self._shaper.kill()
                self._shaper.wait()
            self._shaper = None
        _ip("link", "del", self.root_tun, check=False)
        _ip("netns", "del", self.netns, check=False)

    def __enter__(self) -> ShapedLink:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def socket(self) -> socket.socket:
        """A TCP socket that lives in the client namespace (its traffic crosses the shaped link)."""
        return socket_in_netns(self.netns)


def socket_in_netns(netns: str) -> socket.socket:
    """Create a TCP socket inside `netns` from this thread (setns is per thread), then come back."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open(f"/proc/{os.getpid()}/task/{ctypes.CDLL(None).gettid()}/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)
    sock.setblocking(False)
    return sock
