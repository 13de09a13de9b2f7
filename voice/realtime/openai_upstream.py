"""The OpenAI Realtime upstream (GA protocol over a WebSocket), with connect retries.

The client is picows: its frame parser and masking are compiled and it calls back per frame instead of
waking a reader task, so a server event can be relayed to the browser inside the socket callback that
parsed it (the Inbox bypass, voice/realtime/inbox.py). Measured against aiohttp's client and
`websockets` in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from picows import WSCloseCode, WSError, WSFrame, WSHandshakeError, WSListener, WSMsgType, WSTransport, ws_connect
from picows.url import WSParsedURL

from voice.realtime.inbox import MAX_QUEUED, BypassHandler, Inbox
from voice.realtime.upstream import Upstream, UpstreamClosed, UpstreamConnectError

logger = logging.getLogger(__name__)
logging.getLogger("picows").setLevel(logging.WARNING)  # it logs every connection at INFO

_FATAL_HTTP_STATUSES = frozenset({400, 401, 403, 404})
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_KEEPALIVE_SECONDS = 20.0
# picows doubles a connection's read buffer whenever one read fills 90 % of it, and never shrinks it: a
# ratchet that each burst of audio (or a moment of backpressure) moves up a notch, so memory crept up over
# minutes. The buffer starts at 64 KB and each read is offered at most 16 KB of it (_ChunkedReads): it then
# grows only for a single event larger than ~40 KB (a 200 ms delta is ~13 KB of JSON).
_READ_BUFFER_BYTES = 64 * 1024
_READ_CHUNK_BYTES = 16 * 1024
# The kernel's receive queue is bounded too: while a session pauses reading (backpressure) the audio waits
# there; autotuned, it could reach several MB.
_SOCKET_RCVBUF_BYTES = 128 * 1024  # the kernel doubles it: 256 KB, ~4 s of assistant audio
_TEXT = WSMsgType.TEXT


def upstream_url(model: str | None = None) -> str:
    """OPENAI_REALTIME_URL?model=… (the session's model, default OPENAI_REALTIME_MODEL). GA fixes the model
    at the handshake: `session.update` may not change it."""
    base = settings.OPENAI_REALTIME_URL
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}{urlencode({'model': model or settings.OPENAI_REALTIME_MODEL})}"


async def _connect_socket(url: WSParsedURL) -> socket.socket:
    """Called by picows to open the TCP connection: ours, so the receive queue is bounded before the
    handshake (set later, the kernel would already have autotuned it while OpenAI was sending)."""
    loop = asyncio.get_running_loop()
    error: OSError = OSError(f"no address for {url.host}")
    for family, kind, proto, _, address in await _addresses(url.host, url.port):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_RCVBUF_BYTES)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:  # the connect timeout cancelled us: no socket left behind
            sock.close()
            raise
        return sock
    raise error


async def _addresses(host: str, port: int) -> list[tuple[Any, ...]]:
    """getaddrinfo, except for an IP address: the loop resolves names on a thread (a hop per connection)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    address = (str(ip), port) if ip.version == 4 else (str(ip), port, 0, 0)
    return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)]


class _ChunkedReads(asyncio.BufferedProtocol):
    """Stands between the socket and picows' protocol: offers picows at most _READ_CHUNK_BYTES per read, so
    its read buffer keeps its initial size. Everything else is picows' own bound methods (no extra call)."""

    def __init__(self, protocol: asyncio.BufferedProtocol) -> None:
        self._get_buffer = protocol.get_buffer
        self.buffer_updated = protocol.buffer_updated  # type: ignore[method-assign]
        self.eof_received = protocol.eof_received  # type: ignore[method-assign]
        self.connection_lost = protocol.connection_lost  # type: ignore[method-assign]
        self.pause_writing = protocol.pause_writing  # type: ignore[method-assign]
        self.resume_writing = protocol.resume_writing  # type: ignore[method-assign]

    def get_buffer(self, sizehint: int) -> memoryview:
        """Called by the event loop before each read of the socket."""
        buffer = self._get_buffer(sizehint)
        return buffer if len(buffer) <= _READ_CHUNK_BYTES else buffer[:_READ_CHUNK_BYTES]


class _Listener(WSListener):
    """picows callbacks of one upstream connection, turned into Inbox items."""

    def __init__(self, upstream: OpenAIUpstream) -> None:
        super().__init__()
        self.upstream = upstream
        self.inbox = upstream.inbox
        self._fragments: list[bytes] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Called by picows right after the handshake, before any later read: chunk the reads from now on."""
        raw = transport.underlying_transport
        raw.set_protocol(_ChunkedReads(raw.get_protocol()))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Called by picows for every frame received."""
        msg_type = frame.msg_type
        if msg_type is _TEXT and frame.fin:
            payload = frame.get_payload_as_bytes()
            if not self.inbox.try_bypass(payload):
                self.inbox.put_nowait(payload.decode("utf-8", errors="replace"))
                self.upstream.apply_backpressure(transport)
        elif msg_type is WSMsgType.CLOSE:
            payload = frame.get_payload_as_bytes()  # read raw: codes like 4000 are not in picows' enum
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.upstream.mark_closed(code, payload[2:].decode("utf-8", errors="replace"))
            transport.send(WSMsgType.CLOSE, payload[:2])  # echo the code: the closing handshake
            transport.disconnect()
        elif msg_type in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            self._fragments.append(frame.get_payload_as_bytes())
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), []
                self.inbox.put_nowait(data.decode("utf-8", errors="replace"))
                self.upstream.apply_backpressure(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """Called by picows once the socket is gone (after a close handshake or not)."""
        self.upstream.mark_closed(1006, "connection lost")

    def pause_writing(self) -> None:
        """Called when the socket's send buffer is full: senders wait."""
        self.upstream.writable.clear()

    def resume_writing(self) -> None:
        """Called when the send buffer drained."""
        self.upstream.writable.set()


class OpenAIUpstream(Upstream):
    """A GA realtime session at OpenAI (or anything speaking the protocol at OPENAI_REALTIME_URL)."""

    kind = "openai"

    def __init__(self, *, url: str | None = None, api_key: str | None = None) -> None:
        self.url = url or upstream_url()
        self.api_key = api_key if api_key is not None else settings.OPENAI_API_KEY
        self.inbox = Inbox()
        self.writable = asyncio.Event()
        self.writable.set()
        self._transport: WSTransport | None = None
        self._closed: UpstreamClosed | None = None
        self._reading_paused = False

    async def connect(self) -> None:
        """Called once per session: open the socket, retrying with exponential backoff."""
        attempts = max(1, settings.RETRY_MAX_ATTEMPTS)
        delay = settings.RETRY_BASE_DELAY
        timeout = settings.VOICE_UPSTREAM_CONNECT_TIMEOUT
        for attempt in range(1, attempts + 1):
            try:
                self._transport, _ = await asyncio.wait_for(
                    ws_connect(
                        lambda: _Listener(self), self.url,
                        extra_headers={"Authorization": f"Bearer {self.api_key or 'local'}"},
                        websocket_handshake_timeout=timeout,
                        max_frame_size=_MAX_MESSAGE_BYTES,
                        max_redirects=0,
                        read_buffer_init_size=_READ_BUFFER_BYTES,
                        socket_factory=_connect_socket,
                        enable_auto_ping=True,
                        auto_ping_idle_timeout=_KEEPALIVE_SECONDS,
                        auto_ping_reply_timeout=_KEEPALIVE_SECONDS,
                    ),
                    timeout,
                )
                return
            except WSHandshakeError as exc:
                status = exc.response.status if exc.response is not None else 0
                if status in _FATAL_HTTP_STATUSES:
                    raise UpstreamConnectError(f"upstream refused the handshake (HTTP {status})", fatal=True) from None
                reason = f"HTTP {status}" if status else type(exc).__name__
            except (WSError, OSError, TimeoutError) as exc:
                reason = type(exc).__name__
            logger.warning("upstream connect attempt %d/%d failed: %s", attempt, attempts, reason)
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay *= settings.RETRY_BACKOFF_FACTOR
        raise UpstreamConnectError(f"upstream unreachable after {attempts} attempts")

    def apply_backpressure(self, transport: WSTransport) -> None:
        """Called after an event is queued: stop reading the socket while the session is behind (a client
        reading slower than OpenAI sends), so the audio waits in TCP buffers, not in this process. The
        transport is picows' own: events can arrive before `connect` has returned."""
        if not self._reading_paused and self.inbox.qsize() >= MAX_QUEUED:
            self._reading_paused = True
            transport.underlying_transport.pause_reading()

    def mark_closed(self, code: int, reason: str) -> None:
        """Called on the first close frame, disconnect or `close()`: recv and send raise from now on."""
        if self._closed is None:
            self._closed = UpstreamClosed(code, reason)
            self.inbox.put_nowait(self._closed)
            self.writable.set()  # wake senders: they raise

    def set_text_handler(self, handler: BypassHandler | None) -> None:
        """Called by the session: relay server events (raw UTF-8) synchronously while its reader is parked."""
        self.inbox.bypass = handler

    def send_nowait(self, payload: bytes) -> bool:
        """Called on the hot path: write now, or False (closed or backed up: use `send`)."""
        transport = self._transport
        if self._closed is not None or transport is None or not self.writable.is_set():
            return False
        transport.send(_TEXT, payload)
        return True

    async def send(self, text: str) -> None:
        """Called for each event to forward; waits while the socket is backed up."""
        if not self.writable.is_set():
            await self.writable.wait()
        if self._closed is not None:
            raise self._closed
        if self._transport is None:
            raise UpstreamClosed(None, "not connected")
        self._transport.send(WSMsgType.TEXT, text.encode())

    async def recv(self) -> str:
        """Called by the session's reader loop."""
        if self._transport is None:
            raise UpstreamClosed(None, "not connected")
        item = await self.inbox.get()
        if self._reading_paused and self.inbox.empty():
            self._reading_paused = False
            self._transport.underlying_transport.resume_reading()  # type: ignore[union-attr]
        if item.__class__ is UpstreamClosed:
            self.inbox.put_nowait(item)  # every later recv raises too
            raise item
        return item

    async def close(self) -> None:
        """Called at session end or recycle."""
        transport = self._transport
        if transport is not None and not transport.is_disconnected:
            if self._closed is None:
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        self.mark_closed(1000, "closed by the gateway")


def upstream_kind() -> str:
    """"local" or "openai": what VOICE_UPSTREAM selects."""
    return "local" if settings.VOICE_UPSTREAM == "local" else "openai"


def make_upstream(model: str | None = None) -> Upstream:
    """The upstream configured by VOICE_UPSTREAM for a session of `model` (default OPENAI_REALTIME_MODEL):
    OpenAI (or a URL speaking its protocol) or the local engine."""
    if upstream_kind() == "local":
        from voice.realtime.engine.upstream import LocalUpstream

        return LocalUpstream(model=model)
    return OpenAIUpstream(url=upstream_url(model))
