"""A userspace netem between two TUN devices: loss, delay ± jitter and blackouts, per direction.

Run by tests/netns.py as its own process (`python tests/link_shaper.py <netns> <ns_tun> <root_tun>`): it
attaches to the TUN device inside the client's network namespace and to its peer in the root namespace,
and forwards every IP packet between them after deciding its fate like `tc qdisc ... netem delay D J
loss L` would on both ends of a veth pair. It exists because sch_netem is an optional kernel module
(absent from this machine's kernel, CONFIG_NET_SCH_NETEM unset) while TUN is everywhere; the packets
are real (the kernels' TCP stacks see the loss and retransmit), only the queue discipline is ours.

Packets are kept in order within a direction (a radio link delivers in order; netem's jitter would
reorder them). Commands arrive as JSON lines on stdin and are acknowledged on stdout:
  {"loss": 0.02, "delay_ms": 150, "jitter_ms": 50}   shape both directions
  {"blackout_s": 5}                                    drop everything for that long (loss 100 %)
  {"stats": true}                                      counters so far
Nothing is ever sent anywhere but between the two TUN devices.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import json
import os
import random
import selectors
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65535


def setns(path: str) -> None:
    """Move this (single-threaded) process into the network namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tun(name: str) -> int:
    """Attach to the existing (persistent) TUN device `name` of the current namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Shaper:
    """Both directions of the link: what to drop, when to deliver the rest."""

    def __init__(self, client_fd: int, root_fd: int, seed: int | None = None) -> None:
        self.peer = {client_fd: root_fd, root_fd: client_fd}
        self.loss, self.delay, self.jitter = 0.0, 0.0, 0.0
        self.blackout_until = 0.0
        self.rng = random.Random(seed)
        self.queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, out_fd, packet)
        self.last_due = {client_fd: 0.0, root_fd: 0.0}
        self.seq = 0
        self.stats = {"forwarded": 0, "lost": 0, "blacked_out": 0}

    def on_packet(self, in_fd: int, packet: bytes, now: float) -> None:
        """Called for each packet read from either device: drop it or schedule its delivery."""
        if now < self.blackout_until:
            self.stats["blacked_out"] += 1
            return
        if self.loss and self.rng.random() < self.loss:
            self.stats["lost"] += 1
            return
        out_fd = self.peer[in_fd]
        delay = max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
        due = max(now + delay, self.last_due[out_fd])  # in order within a direction
        self.last_due[out_fd] = due
        self.seq += 1
        heapq.heappush(self.queue, (due, self.seq, out_fd, packet))

    def deliver_due(self, now: float) -> float | None:
        """Called by the loop: write what is due; returns seconds until the next packet is (None: idle)."""
        while self.queue and self.queue[0][0] <= now:
            _, _, out_fd, packet = heapq.heappop(self.queue)
            try:
                os.write(out_fd, packet)
                self.stats["forwarded"] += 1
            except BlockingIOError:
                self.stats["lost"] += 1  # the device's queue is full: a real link drops too
            except OSError:
                self.stats["blacked_out"] += 1  # EIO: that end's interface is down
        return self.queue[0][0] - now if self.queue else None

    def command(self, cmd: dict, now: float) -> dict:
        """Called for each JSON line on stdin."""
        if "loss" in cmd:
            self.loss = float(cmd["loss"])
        if "delay_ms" in cmd:
            self.delay = float(cmd["delay_ms"]) / 1000
        if "jitter_ms" in cmd:
            self.jitter = float(cmd["jitter_ms"]) / 1000
        if "blackout_s" in cmd:
            self.blackout_until = now + float(cmd["blackout_s"])
            self.queue = [entry for entry in self.queue if entry[0] <= now]  # in flight: lost with the link
            heapq.heapify(self.queue)
        return {"ok": True, **self.stats, "at": now}


def main(argv: list[str]) -> int:
    netns, ns_tun, root_tun = argv[:3]
    seed = int(argv[3]) if len(argv) > 3 else None
    root_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    setns(f"/run/netns/{netns}")
    client_fd = open_tun(ns_tun)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(root_ns, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns back to the root namespace")
    root_fd = open_tun(root_tun)
    shaper = Shaper(client_fd, root_fd, seed)
    selector = selectors.DefaultSelector()
    selector.register(client_fd, selectors.EVENT_READ)
    selector.register(root_fd, selectors.EVENT_READ)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    stdin_buffer = b""
    print(json.dumps({"ready": True}), flush=True)
    timeout: float | None = None
    while True:
        for key, _ in selector.select(timeout):
            fd = key.fd
            if fd == sys.stdin.fileno():
                chunk = os.read(fd, 4096)
                if not chunk:
                    return 0  # the test is gone: stop forwarding
                stdin_buffer += chunk
                while b"\n" in stdin_buffer:
                    line, stdin_buffer = stdin_buffer.split(b"\n", 1)
                    if line.strip():
                        reply = shaper.command(json.loads(line), time.monotonic())
                        print(json.dumps(reply), flush=True)
                continue
            while True:
                try:
                    packet = os.read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                shaper.on_packet(fd, packet, time.monotonic())
        timeout = shaper.deliver_due(time.monotonic())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
