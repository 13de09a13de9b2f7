"""Framing between the engine and its recognition worker process: header (length, op, stream) + payload."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

HEADER = struct.Struct(">IBI")  # payload length, op, stream id

# engine -> worker
OPEN, AUDIO, FINISH, CANCEL = 1, 2, 3, 4
# worker -> engine
READY, HYP, FINAL, FAILED = 10, 11, 12, 13


def frame(op: int, stream: int, payload: bytes = b"") -> bytes:
    """Encode one message."""
    return HEADER.pack(len(payload), op, stream) + payload


def json_frame(op: int, stream: int, body: dict[str, Any]) -> bytes:
    """Encode one message with a JSON payload."""
    return frame(op, stream, json.dumps(body, separators=(",", ":")).encode())


class FrameReader:
    """Reads whatever a pipe holds and yields the complete messages in it (blocking only in os.read)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()

    def read(self) -> list[tuple[int, int, bytes]] | None:
        """Block until at least one byte arrives; returns the complete messages so far (None at EOF)."""
        chunk = os.read(self._fd, 1 << 16)
        if not chunk:
            return None
        self._buffer += chunk
        messages, view = [], self._buffer
        offset = 0
        while len(view) - offset >= HEADER.size:
            length, op, stream = HEADER.unpack_from(view, offset)
            end = offset + HEADER.size + length
            if end > len(view):
                break
            messages.append((op, stream, bytes(view[offset + HEADER.size : end])))
            offset = end
        del self._buffer[:offset]
        return messages
