"""The voice server's WebSocket protocol (voice/server_ws.py) on a real uvicorn, frame by frame.

The fast path cuts frames itself and hands everything unusual to websockets: these tests send raw
frames (coalesced, split byte by byte, fragmented, masked or not, invalid) and check what an RFC 6455
client must see, and that the synchronous bypass never reorders messages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from websockets.speedups import apply_mask

from voice.server_ws import FASTPATH_EXTENSION, VoiceWebSocketProtocol

MAX_SIZE = 256 * 1024


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echoes text as "echo:<text>" and bytes as bytes. On /fast it installs a bypass that answers frames
    starting with "fast" synchronously ("bypass:<text>"); frames starting with "slow" keep it busy 50 ms."""
    assert scope["type"] == "websocket"
    await receive()
    await send({"type": "websocket.accept"})
    fastpath = scope["extensions"].get(FASTPATH_EXTENSION)
    if scope["path"] == "/fast":
        def bypass(payload: bytes) -> bool:
            return payload.startswith(b"fast") and fastpath["send_text_nowait"](b"bypass:" + payload)

        fastpath["set_text_handler"](bypass)
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            text = message["text"]
            if text.startswith("slow"):
                await asyncio.sleep(0.05)
            if text == "close":
                await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
                continue
            await send({"type": "websocket.send", "text": "echo:" + text})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


@contextlib.contextmanager
def serving(app: Any, **config: Any) -> Iterator[tuple[int, uvicorn.Server]]:
    """A real uvicorn with the voice protocol serving `app` on a free port, in a thread."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = {"ws_max_size": MAX_SIZE, "lifespan": "off", "log_level": "warning", "ws_ping_interval": None,
                "ws_per_message_deflate": False, **config}
    uv = uvicorn.Server(uvicorn.Config(app, ws=VoiceWebSocketProtocol, **settings))
    thread = threading.Thread(target=lambda: asyncio.run(uv.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not uv.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield port, uv
    finally:
        uv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server():
    with serving(echo_app) as (port, _):
        yield port


# --- a raw RFC 6455 client --------------------------------------------------------------------------------
def upgrade_request(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def connect(port: int, path: str = "/echo") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(upgrade_request(path))
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def frame(payload: bytes, opcode: int = 0x1, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    first, second = recv_exact(sock, 2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", recv_exact(sock, 2))[0]
    elif size == 127:
        size = struct.unpack("!Q", recv_exact(sock, 8))[0]
    assert not second & 0x80, "server frames are never masked"
    return first & 0x0F, recv_exact(sock, size)


def read_text(sock: socket.socket) -> str:
    opcode, payload = read_frame(sock)
    assert opcode == 0x1, (opcode, payload)
    return payload.decode()


def read_close_code(sock: socket.socket) -> int:
    while True:
        opcode, payload = read_frame(sock)
        if opcode == 0x8:
            return struct.unpack("!H", payload[:2])[0]


# --- tests ------------------------------------------------------------------------------------------------
def test_coalesced_frames_each_delivered_in_order(server) -> None:
    sock = connect(server)
    sock.sendall(b"".join(frame(f"m{i}".encode()) for i in range(20)))
    assert [read_text(sock) for _ in range(20)] == [f"echo:m{i}" for i in range(20)]


def test_frame_split_byte_by_byte(server) -> None:
    sock = connect(server)
    for byte in frame(("x" * 300).encode()):  # 16-bit length header, split everywhere
        sock.sendall(bytes([byte]))
    assert read_text(sock) == "echo:" + "x" * 300


def test_64_bit_lengths_both_ways(server) -> None:
    sock = connect(server)
    text = "é" * 40000  # 80,000 bytes of UTF-8: a 64-bit length header, multi-byte characters
    sock.sendall(frame(text.encode()))
    assert read_text(sock) == "echo:" + text


def test_fragmented_message_with_a_ping_between_fragments(server) -> None:
    sock = connect(server)
    sock.sendall(frame(b"hel", fin=False) + frame(b"lo ", 0x0, fin=False) + frame(b"ping!", 0x9)
                 + frame(b"world", 0x0))
    assert read_frame(sock) == (0xA, b"ping!")  # the pong, as soon as the ping arrives
    assert read_text(sock) == "echo:hello world"
    sock.sendall(frame(b"after"))  # back on the fast path
    assert read_text(sock) == "echo:after"


def test_binary_frames_reach_the_app_as_bytes(server) -> None:
    sock = connect(server)
    sock.sendall(frame(b"\x00\x01\xff", 0x2))
    assert read_frame(sock) == (0x2, b"\x00\x01\xff")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (frame(b"\xff\xfe"), 1007),  # invalid UTF-8
        (frame(b"hello", masked=False), 1002),  # clients must mask
        (frame(b"hello", rsv=0b100), 1002),  # no extension was negotiated
        (frame(b"x" * (MAX_SIZE + 1)), 1009),  # too big
        (frame(b"part", 0x0), 1002),  # a continuation with nothing to continue
    ],
)
def test_protocol_errors_close_with_the_rfc_code(server, raw: bytes, code: int) -> None:
    sock = connect(server)
    sock.sendall(frame(b"ok"))
    assert read_text(sock) == "echo:ok"  # on the fast path first
    sock.sendall(raw)
    assert read_close_code(sock) == code


def test_client_close_is_answered(server) -> None:
    sock = connect(server)
    sock.sendall(frame(struct.pack("!H", 1000) + b"done", 0x8))
    assert read_close_code(sock) == 1000


def test_app_close_then_client_reply(server) -> None:
    sock = connect(server)
    sock.sendall(frame(b"close"))
    assert read_close_code(sock) == 4001
    sock.sendall(frame(b"late frame, discarded") + frame(struct.pack("!H", 4001), 0x8))
    assert sock.recv(1) == b""  # the server completes the closing handshake and hangs up


def test_bypass_never_overtakes_a_busy_app(server) -> None:
    """While the app handles a slow message, frames its bypass would take are queued behind it."""
    sock = connect(server, "/fast")
    order = ["fast1", "slow1", "fast2", "fast3", "slow2", "fast4", "plain", "fast5"]
    sock.sendall(b"".join(frame(text.encode()) for text in order))
    replies = [read_text(sock) for _ in order]
    assert [reply.split(":", 1)[1] for reply in replies] == order  # nothing overtook anything
    assert replies[0] == "bypass:fast1"  # the app was parked: taken synchronously
    assert replies[2:4] == ["echo:fast2", "echo:fast3"]  # the app was busy: queued behind slow1
    time.sleep(0.2)  # idle again: the bypass answers at once
    sock.sendall(frame(b"fast6"))
    assert read_text(sock) == "bypass:fast6"


async def flood_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Writes until the transport's buffer is full (its peer reads nothing); on /close it then closes (and
    must not wait for that buffer to drain first)."""
    await receive()
    await send({"type": "websocket.accept"})
    send_text_nowait = scope["extensions"][FASTPATH_EXTENSION]["send_text_nowait"]
    chunk, deadline = b"x" * 65536, time.monotonic() + 5
    while send_text_nowait(chunk) and time.monotonic() < deadline:
        await asyncio.sleep(0)
    if scope["path"] == "/close":
        await send({"type": "websocket.close", "code": 1001})
        scope["state"]["closed"] = True
    while (await receive())["type"] != "websocket.disconnect":
        pass


def silent_peer(port: int, path: str) -> socket.socket:
    """A client that completes the upgrade and then reads nothing (a phone that changed network)."""
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once: the server backs up
    silent.connect(("127.0.0.1", port))
    silent.sendall(upgrade_request(path))
    return silent


def wait_until(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(condition())


def test_a_peer_that_went_silent_is_closed_at_once_and_cut_off_after_the_close_timeout() -> None:
    """A peer that reads nothing more (a phone that changed network mid-answer, a superseded connection):
    the app's close returns at once (uvicorn's waited for the unsent frames to drain first: a resume waited
    on the old connection's close), and the connection is aborted once the close timeout (the ping timeout)
    has passed, rather than kept until TCP gives up (minutes)."""
    with serving(flood_app, ws_ping_timeout=0.3) as (port, uv):
        with contextlib.closing(silent_peer(port, "/close")):
            assert wait_until(lambda: uv.server_state.connections, 2), "the connection never reached the server"
            protocol = next(iter(uv.server_state.connections))
            assert wait_until(lambda: protocol.scope.get("state", {}).get("closed"), 2), "the close waited"
            assert wait_until(lambda: not uv.server_state.connections, 3), "the silent peer's connection was kept"


def test_a_silent_peer_does_not_hold_the_server_shutdown() -> None:
    """At shutdown uvicorn closes every connection gracefully and waits for them (up to its graceful timeout,
    else for ever): a silent peer is cut off after the close timeout instead."""
    with serving(flood_app, ws_ping_timeout=0.3) as (port, uv):
        with contextlib.closing(silent_peer(port, "/stay")):
            assert wait_until(lambda: uv.server_state.connections, 2), "the connection never reached the server"
            time.sleep(0.2)  # the app has filled the buffer
            uv.should_exit = True
            assert wait_until(lambda: not uv.server_state.connections, 3), "the shutdown waited on a silent peer"
