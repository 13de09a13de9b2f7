"""The live sessions of this process, for draining on shutdown and for operators."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from django.conf import settings

logger = logging.getLogger(__name__)


class Drainable(Protocol):
    session_id: str

    async def drain(self) -> None: ...


T = TypeVar("T")

_live: dict[asyncio.AbstractEventLoop, set[Any]] = {}
_draining: set[asyncio.AbstractEventLoop] = set()
_admitted = 0  # sessions registered since start (any loop): tells an idle instance whether anything ran


def loop_local(store: dict[asyncio.AbstractEventLoop, T], factory: Callable[[], T]) -> T:
    """The running event loop's entry of `store`, made by `factory` on first use (per-process objects such as
    the admission gate and the supervisor belong to one loop; tests run several servers, hence several loops,
    and the entries of closed ones are dropped then)."""
    loop = asyncio.get_running_loop()
    found = store.get(loop)
    if found is None:
        for old in [known for known in store if known.is_closed()]:
            del store[old]
        found = store[loop] = factory()
    return found


def instance_id() -> str:
    """This gateway instance's name in session rows (INSTANCE_ID, else host:pid)."""
    return settings.INSTANCE_ID or f"{socket.gethostname()}:{os.getpid()}"


def register(consumer: Drainable) -> None:
    """Called when a session is admitted."""
    global _admitted
    _admitted += 1
    _live.setdefault(asyncio.get_running_loop(), set()).add(consumer)


def unregister(consumer: Drainable) -> None:
    """Called when a session ends."""
    _live.get(asyncio.get_running_loop(), set()).discard(consumer)


def live_sessions() -> list[Any]:
    """The live consumers on this event loop."""
    return list(_live.get(asyncio.get_running_loop(), ()))


def live_session(session_id: str) -> Any | None:
    """The live consumer of `session_id` on this event loop, if any (a resume checks for it)."""
    return next((c for c in live_sessions() if getattr(c, "session_id", None) == session_id), None)


def sessions_admitted() -> int:
    """How many sessions this process has admitted since it started."""
    return _admitted


def is_draining() -> bool:
    """True once this instance started draining: new connections are turned away."""
    return asyncio.get_running_loop() in _draining


async def drain_all() -> int:
    """Called on SIGTERM: every live session is told to reconnect elsewhere and persisted."""
    loop = asyncio.get_running_loop()
    _draining.add(loop)
    consumers = list(_live.get(loop, ()))
    if consumers:
        logger.warning("draining %d live voice sessions", len(consumers))
        results = await asyncio.gather(*(c.drain() for c in consumers), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.error("drain failed for a session: %s", type(result).__name__)
    return len(consumers)


def reset_draining() -> None:
    """Forget the draining flag of the running loop (a restarted in-process server in tests)."""
    _draining.discard(asyncio.get_running_loop())
