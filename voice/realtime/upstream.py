"""The upstream abstraction: one realtime conversation with OpenAI (or the local engine).

A gateway session owns exactly one `Upstream` at a time. Events cross it as JSON *text* (str), never
re-serialised on the hot path: the gateway forwards client audio frames verbatim and relays upstream
events verbatim.
"""

from __future__ import annotations

import abc
from collections.abc import Callable


class UpstreamError(Exception):
    """Base class for upstream failures."""


class UpstreamConnectError(UpstreamError):
    """The upstream could not be reached or refused the handshake."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal  # True: retrying cannot help (e.g. 401 invalid key)


class UpstreamClosed(UpstreamError):
    """The upstream connection is closed (by the peer, a crash, or `close()`)."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(f"upstream closed (code={code}, reason={reason!r})")
        self.code = code
        self.reason = reason


class Upstream(abc.ABC):
    """One realtime conversation speaking the OpenAI Realtime GA protocol."""

    kind: str = "abstract"  # "openai" | "local"

    @abc.abstractmethod
    async def connect(self) -> None:
        """Called once before any send/recv; raises UpstreamConnectError on failure."""

    @abc.abstractmethod
    async def send(self, text: str) -> None:
        """Called for every client event to forward (JSON text); raises UpstreamClosed."""

    def send_nowait(self, payload: bytes) -> bool:
        """Called on the hot path with a client event's UTF-8 JSON: forward it at once and return True, or
        return False to have `send` awaited. Upstreams without a fast path always return False."""
        return False

    def set_text_handler(self, handler: Callable[[bytes], bool] | None) -> None:
        """Called by the session: offer each server event's raw UTF-8 to `handler` synchronously while the
        reader is parked (it returns True when it relayed the event). Upstreams without a fast path ignore it."""
        return None

    @abc.abstractmethod
    async def recv(self) -> str:
        """Called in the gateway's reader loop; returns the next server event, raises UpstreamClosed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Called when the session ends or the upstream is recycled; idempotent."""
