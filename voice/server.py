"""The production ASGI server: uvicorn, with a graceful voice drain before its own shutdown.

Uvicorn's own shutdown closes every WebSocket with 1012 at once. Before that, `VoiceServer` stops
accepting, tells each live session to resume elsewhere (`gateway.session.draining`, close 4012) and
persists its metrics; then uvicorn finishes as usual.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from django.conf import settings

from voice.gc_policy import full_collection_policy_start, watch_gc_pauses
from voice.handshake_pacing import PacedH11Protocol
from voice.observability.stall_sampler import StallSampler

logger = logging.getLogger(__name__)
LOOP_LAG_WARNING_SECONDS = 0.02


class VoiceServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains voice sessions first."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Called once by uvicorn before serving."""
        try:
            await first_request_warm_up(self.config.loaded_app, token=settings.METRICS_TOKEN)
        except Exception:  # a warm-up that fails leaves the first real request slow, nothing worse
            logger.warning("first-request warm-up failed", exc_info=True)
        await super().startup(sockets)
        for server in self.servers:
            for listener in server.sockets:
                cap_retransmission_backoff(listener, settings.VOICE_TCP_RTO_MAX_MS)
        # Django and the app leave ~100k long-lived objects: a full collection of them stalls the loop
        # (and every session's audio) for ~70 ms. Freeze them out of the collector once at start-up.
        gc.collect()
        gc.freeze()
        self._gc_watch = watch_gc_pauses()
        self._gc_policy = full_collection_policy_start()
        self._stall_sampler = stall_sampler_start()
        self._lag_probe = asyncio.get_running_loop().create_task(probe_loop_lag(sampler=self._stall_sampler))
        self._heap_trimmer = asyncio.get_running_loop().create_task(trim_heap_when_idle())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Called by uvicorn after SIGTERM/SIGINT (or should_exit)."""
        from voice.consumer_supervision import supervisor_close
        from voice.realtime.control import control_channel_close
        from voice.realtime.registry import drain_all

        if getattr(self, "_lag_probe", None) is not None:
            self._lag_probe.cancel()
            self._heap_trimmer.cancel()
            if self._stall_sampler is not None:
                self._stall_sampler.stop()
            gc.callbacks.remove(self._gc_watch)  # one per server: several servers may share a process (tests)
            self._gc_policy.stop()
        for server in self.servers:
            server.close()  # stop accepting before telling clients to reconnect elsewhere
        if not self.force_exit:  # a second SIGINT (or a test simulating a crash): no drain
            try:
                drained = await asyncio.wait_for(drain_all(), settings.VOICE_DRAIN_GRACE_SECONDS + 5)
                if drained:
                    logger.warning("drained %d voice sessions", drained)
            except TimeoutError:
                logger.error("voice drain exceeded its grace period")
        control_channel_close()
        supervisor_close()
        await super().shutdown(sockets)


VOICE_WS_PROTOCOL = "voice.server_ws:VoiceWebSocketProtocol"
TCP_RTO_MAX_MS = getattr(socket, "TCP_RTO_MAX_MS", 44)  # Linux >= 6.15; Python names it from 3.14


def cap_retransmission_backoff(listener: Any, rto_max_ms: int) -> bool:
    """Called at start-up on each listening socket: cap TCP's retransmission timeout (inherited by every
    accepted connection), so that after a client's link blackout the gateway's unacknowledged audio goes
    out again within `rto_max_ms` of the link's return instead of at the next step of the exponential
    backoff (measured by bench/netfaults.py: 6.4 s of extra silence after a 5 s blackout with the kernel's
    120 s cap). 0 keeps the kernel's default; kernels without the option keep it too (False)."""
    if rto_max_ms <= 0 or listener.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        listener.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, int(rto_max_ms))
    except OSError as exc:
        logger.info("TCP_RTO_MAX_MS not applied (kernel older than 6.15?): %s", exc)
        return False
    return True


async def first_request_warm_up(app: Any, *, token: str = "") -> int:
    """Called at start-up, before the socket is served: one GET /metrics through the whole ASGI stack; returns
    its status.

    The first HTTP request of a process does one-off work on the event loop: Django populates its URL
    resolver, and Sentry's Django integration scans every installed distribution's metadata and imports DRF
    and django.contrib.postgres to patch them (~250 ms on the 2026-12-04 VM, found by the stall sampler). On a
    fresh instance that request is a health check or a scrape arriving while the sessions of a drained
    instance reconnect to it: every live session's audio waited for it. Done here, it also lands before the
    start-up gc.freeze()."""
    headers = [(b"host", b"127.0.0.1")]
    if token:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/metrics", "raw_path": b"/metrics", "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    status = 0
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Future()  # no disconnect: the handler stops listening once it has responded
        return {}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def stall_sampler_start() -> StallSampler | None:
    """Called at server start-up: the watchdog that samples the loop thread's stack during a stall
    (VOICE_STALL_SAMPLER_MS; 0 turns it off)."""
    threshold_ms = settings.VOICE_STALL_SAMPLER_MS
    return StallSampler(threshold_ms / 1000).start() if threshold_ms > 0 else None


async def probe_loop_lag(interval: float = 0.01, sampler: StallSampler | None = None) -> None:
    """Measure how late the event loop runs a timer (voice_event_loop_lag_seconds); log stalls that an
    audio frame would feel (> LOOP_LAG_WARNING_SECONDS); keep the stall sampler's heartbeat."""
    from voice import metrics

    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + interval
        await asyncio.sleep(interval)
        if sampler is not None:
            sampler.beat()
        lag = max(0.0, loop.time() - expected)
        metrics.LOOP_LAG.observe(lag)
        if lag > LOOP_LAG_WARNING_SECONDS:
            logger.warning("event loop stalled %.0f ms", lag * 1000)


def _malloc_trim() -> Callable[[int], Any] | None:
    """glibc's malloc_trim, or None (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


async def trim_heap_when_idle() -> None:
    """Every VOICE_MALLOC_TRIM_SECONDS, if no session is live and some ran since the last trim, hand glibc's
    free heap pages back to the OS.

    Audio frames, deltas and JSON documents are mostly a few KB: glibc serves them from its heap, not from
    Python's allocator, and only ever returns the top of the heap, so the free space left between live
    objects after a peak stays in the process. malloc_trim(0) releases free pages anywhere in the heap, but
    it holds each arena's lock while it walks it: 12-50 ms for a 150 MB heap, during which the event loop's
    own allocations wait, i.e. every live session's audio. Hence only when nobody is listening. (Run every
    60 s under 200 live sessions it took the soak's RSS growth from +3.8 % to +3.7 % and put a 12-50 ms
    stall into every session once a minute.) It runs in a thread: ctypes releases the GIL.
    """
    from voice.realtime.registry import live_sessions, sessions_admitted

    interval = settings.VOICE_MALLOC_TRIM_SECONDS
    trim = _malloc_trim()
    if interval <= 0 or trim is None:
        return
    loop = asyncio.get_running_loop()
    trimmed_after = -1  # sessions_admitted() at the last trim; -1: trim once at the first idle tick
    while True:
        await asyncio.sleep(interval)
        if live_sessions() or sessions_admitted() == trimmed_after:
            continue
        trimmed_after = sessions_admitted()
        started = time.perf_counter()
        await loop.run_in_executor(None, trim, 0)
        logger.info("idle: free heap pages returned to the OS (malloc_trim, %.0f ms)",
                    (time.perf_counter() - started) * 1000)


def server_config(*, host: str, port: int, uds: str | None = None, fd: int | None = None,
                  access_log: bool = True, loop: str = "auto", ws: str = "voice") -> uvicorn.Config:
    """The uvicorn settings chosen by measurement (docs/BENCHMARKS.md). `ws="voice"` is the voice socket's
    fast-path protocol; uvicorn's own names ("websockets-sansio", ...) serve the same app without it."""
    return uvicorn.Config(
        "intelia_voice.asgi:application",
        host=host,
        port=port,
        uds=uds,
        fd=fd,
        loop=loop,
        http=PacedH11Protocol,  # h11, its connections read a few per loop turn (voice/handshake_pacing.py)
        ws=VOICE_WS_PROTOCOL if ws == "voice" else ws,
        ws_max_size=settings.VOICE_MAX_FRAME_BYTES,  # larger frames: close 1009 by the server itself
        ws_per_message_deflate=False,  # base64 audio barely compresses; deflate costs CPU per frame
        ws_ping_interval=settings.VOICE_WS_PING_INTERVAL_SECONDS,
        ws_ping_timeout=settings.VOICE_WS_PING_TIMEOUT_SECONDS,
        lifespan="off",
        access_log=access_log,
        log_config=None,  # Django's LOGGING (with secret redaction) owns the loggers
        timeout_graceful_shutdown=settings.VOICE_DRAIN_GRACE_SECONDS + 10,
        proxy_headers=True,
        server_header=False,
    )
