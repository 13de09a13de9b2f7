"""Inbox: the queue between a socket's callbacks and the task that reads it, with a synchronous bypass.

Every audio frame would otherwise cost a queue put, a task wake-up and an await chain in each
direction. A reader that is parked on an empty inbox has nothing in flight, so a frame offered to its
*bypass handler* at that moment cannot overtake anything: the handler relays it synchronously (inside
the socket callback that parsed it) or declines, and a declined frame is queued as usual. Order is kept
because the bypass is only tried while the reader is parked and the queue is empty. The bypass sees the
raw UTF-8 payload, so a relayed frame is never decoded to str and encoded back.

Used by the voice server protocol (client frames, voice/server_ws.py) and the OpenAI upstream
(server events, voice/realtime/openai_upstream.py). Its interface is the part of asyncio.Queue that
uvicorn's protocol uses (put_nowait, get, empty, qsize).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

BypassHandler = Callable[[bytes], bool]  # gets a message's UTF-8 payload; True when it handled it
# Queued items past which a socket's owner stops reading it (TCP pushes back on the sender).
MAX_QUEUED = 64


class Inbox:
    """A FIFO of received items for one reader task, plus an optional synchronous bypass for text."""

    __slots__ = ("_items", "_waiter", "bypass")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[Any] | None = None
        self.bypass: BypassHandler | None = None

    def try_bypass(self, payload: bytes) -> bool:
        """Called by the socket callback for each text message's raw payload: True when the bypass handled
        it (only ever while the reader is parked on an empty queue); False: decode it and `put_nowait`."""
        bypass = self.bypass
        return bypass is not None and self.parked and bypass(payload)

    def put_nowait(self, item: Any) -> None:
        """Called to queue an item (a message, or a text the bypass declined) for the reader."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(item)
        else:
            self._items.append(item)

    async def get(self) -> Any:
        """Called by the reader task: the next item, waiting (parked) while there is none."""
        if self._items:
            return self._items.popleft()
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._items.appendleft(waiter.result())  # delivered as the reader was cancelled: keep it
            raise
        finally:
            self._waiter = None

    def empty(self) -> bool:
        """True when nothing is queued."""
        return not self._items

    def qsize(self) -> int:
        """How many items are queued."""
        return len(self._items)

    @property
    def parked(self) -> bool:
        """True while the reader waits on an empty inbox (a bypassed item cannot overtake anything)."""
        return self._waiter is not None and not self._waiter.done()
