"""Dedicated database threads: one for the latency-critical lookups of the access decision, one for the
session rows written at the start and end of every connection.

Under ASGI, Django's advice is CONN_MAX_AGE=0: request threads come and go, so each sync_to_async call
opens and closes its own connection. For the access decision that connect/close is most of its cost
(bench/access.py: 72 % on SQLite; worse on PostgreSQL). The access thread keeps its connection between
calls instead, reconnecting once when the database dropped it.

Session rows get their own single writer: when a hundred sessions end at once (a network blip, a load
test), a pool of threads fought over SQLite's write lock (busy-wait back-offs) and over the GIL with the
event loop for seconds, stalling every live session's audio (bench/relay.py); one writer drains the same
burst in order, and access lookups never queue behind it. Every write reuses the writer's connection (turn rows,
session starts and ends): a connect per session start and end was most of their cost.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from django.db import InterfaceError, OperationalError, connections

T = TypeVar("T")
# One worker: its thread-local connection stays open; a lookup takes well under a millisecond.
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="voice-db")
_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="voice-db-writer")


def _call(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    try:
        return fn(*args, **kwargs)
    except (InterfaceError, OperationalError):
        connections.close_all()  # the server closed it (restart, idle timeout): reconnect once
        return fn(*args, **kwargs)
    finally:
        # A function that handled a database error itself (the session-end spool) leaves a broken
        # connection behind: drop it so the next call reconnects.
        if any(conn.errors_occurred for conn in connections.all(initialized_only=True)):
            connections.close_all()


async def run_db(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run a short ORM function on the database thread (called per connection by the access decision)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, functools.partial(_call, fn, *args, **kwargs))


async def run_db_write(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run a session-row write on the writer thread (called at the start and end of every connection)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_writer, functools.partial(_call, fn, *args, **kwargs))


def submit_write(fn: Callable[..., object], *args: object) -> None:
    """Queue a write on the writer thread without waiting for it (called from the event loop per turn): no
    future, no task; `fn` reports back itself (loop.call_soon_threadsafe) if it has to."""
    _writer.submit(_call, fn, *args)


def close_db_thread_connections() -> None:
    """Close the database threads' connections (tests before dropping the database; shutdown)."""
    _executor.submit(connections.close_all).result(10)
    _writer.submit(connections.close_all).result(10)
