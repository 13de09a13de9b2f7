"""Supervision of live voice connections: the per-second checks and the control messages.

A mixin of VoiceConsumer (voice/consumers.py), split out to keep each module about one thing: the consumer
adapts the socket (connect, frames, ending); this one watches a live session (kill switch, duration,
upstream stall, slot refresh) and answers the control messages (terminate, drain) that the process's control
channel hands it (voice/realtime/control.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable
from typing import Any

from django.conf import settings

from voice.realtime.control import control_channel
from voice.realtime.registry import loop_local
from voice.services import sessions as session_services
from voice.services.access import session_slots
from voice.services.rollout import rollout_cache_clear, rollout_snapshot
from voice.services.state import get_state

logger = logging.getLogger("voice.consumers")

SLOT_REFRESH_SECONDS = 10


class Supervisor:
    """The per-second supervision of every live session of one event loop: one task and one timer for all of
    them (a task, a coroutine and a timer each cost every session's objects to the collector and a wake-up per
    second). A session's check is synchronous and returns the async work due, if any, which runs as a task of
    its own (rare: a warning, a presence refresh every 10 s, an end)."""

    def __init__(self) -> None:
        self.watched: dict[Any, None] = {}  # an ordered set of consumers
        self._task: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[Any]] = set()

    def watch(self, consumer: Any) -> None:
        """Called once a session is live."""
        self.watched[consumer] = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def unwatch(self, consumer: Any) -> None:
        """Called as a session ends."""
        self.watched.pop(consumer, None)

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run a session's due work (not a task of the session: ending it cancels those)."""
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(1)
            if not self.watched:
                continue
            try:
                enabled = settings.ENABLE_VOICE_REALTIME and (await rollout_snapshot()).voice_enabled
            except Exception:  # noqa: BLE001 - the database is down: no kill switch to read, keep serving
                logger.warning("rollout unreadable; kill switch not checked this second")
                enabled = True
            self._check_all(time.monotonic(), enabled)

    def _check_all(self, now: float, enabled: bool) -> None:
        # A method of its own: a loop variable left in `_run`'s frame would keep the last session alive.
        presence: list[tuple[str, str]] = []
        for consumer in list(self.watched):
            try:
                for work in consumer._supervision_tick(now, enabled, presence):
                    self.spawn(work)
            except Exception:  # one session's failure must not stop the others' supervision
                logger.exception("session supervision failed")
        if presence:  # every slot due this second, in one round trip
            self.spawn(get_state().slots_refresh(presence, ttl=SLOT_REFRESH_SECONDS * 3))

    def close(self) -> None:
        """Called when the loop's server stops."""
        if self._task is not None:
            self._task.cancel()


_supervisors: dict[asyncio.AbstractEventLoop, Supervisor] = {}


def supervisor() -> Supervisor:
    """The running event loop's supervisor (created on first use)."""
    return loop_local(_supervisors, Supervisor)


def supervisor_close() -> None:
    """Called as a server's event loop shuts down."""
    found = _supervisors.pop(asyncio.get_running_loop(), None)
    if found is not None:
        found.close()


class SessionSupervision:
    """The consumer's per-second checks and control-message handlers (they use its state and `_end`)."""

    def _supervision_start(self) -> None:
        """Called once the session is live: checked every second from now on, present in Redis at once."""
        # Sessions admitted in the same second refresh in different seconds: each second's batch stays small.
        self._ticks = random.randrange(SLOT_REFRESH_SECONDS)
        get_state().add_resync_hook(self._publish_presence)
        loop_supervisor = supervisor()
        loop_supervisor.watch(self)
        loop_supervisor.spawn(self._publish_presence(just_admitted=True))

    def _supervision_stop(self) -> None:
        """Called as the connection ends (idempotent)."""
        if getattr(self, "_ticks", None) is None:
            return
        self._ticks = None
        get_state().remove_resync_hook(self._publish_presence)
        supervisor().unwatch(self)

    def _supervision_tick(self, now: float, voice_enabled: bool,
                          presence: list[tuple[str, str]]) -> list[Awaitable[Any]]:
        """Called every second by the loop's supervisor: kill switch, duration limit, upstream stall; every
        10 s the session's slots join `presence` (refreshed together). Returns the async work due now
        (usually none)."""
        if self._ended:
            return []
        if not voice_enabled:
            return [self._end("feature_disabled", "feature_disabled", "Voice has been disabled")]
        left = self.deadline - now
        if left <= 0:
            limit = int(self.meta.max_duration_s)
            label = f"{limit // 60} min" if limit % 60 == 0 else f"{limit} s"
            return [self._end("timeout", "session_timeout", f"Session timeout ({label} max)")]
        due: list[Awaitable[Any]] = []
        if left <= settings.SESSION_WARNING_SECONDS and not self.warned:
            self.warned = True
            due.append(self._send_event({"type": "gateway.session.expiring", "seconds_left": int(left)}))
        if self.session is not None and self.session.tick(now):
            return [self._end("upstream_unavailable", "upstream_unavailable", "The voice service stopped responding",
                              error="upstream_unavailable")]
        self._ticks += 1
        if self._ticks % SLOT_REFRESH_SECONDS == 0:
            presence.extend(self._presence_slots())
            if not self._control_current():
                due.append(self._join_control())
        return due

    def _presence_slots(self) -> list[tuple[str, str]]:
        """This session's slots: its user's concurrency slot and its live-session slot."""
        return session_slots(self.identity.user_id, self.session_id)

    async def _publish_presence(self, *, just_admitted: bool = False) -> None:
        """Publish (at the start, or after a Redis outage again) this session's slots and join the control
        channel."""
        if not just_admitted:  # the admission took both slots with this time to live, in one round trip
            await get_state().slots_refresh(self._presence_slots(), ttl=SLOT_REFRESH_SECONDS * 3)
        if not self._control_current():
            await self._join_control()

    def _control_current(self) -> bool:
        """True when this session is in the control channel's groups (or there is no channel layer)."""
        if self.channel_layer is None:
            return True
        return self._control_joined is not None and self._control_joined == control_channel(
            self.channel_layer).generation

    async def _join_control(self) -> None:
        self._control_joined = await control_channel(self.channel_layer).join()

    async def session_terminate(self, message: dict[str, Any]) -> None:
        """Called by the process's control channel: the kill switch was engaged, or an operator ended this
        session."""
        if message.get("code") == "feature_disabled":
            # The row changed before this broadcast, maybe on another instance: this process's cached
            # rollout (up to 1 s old) would still admit the next connection.
            rollout_cache_clear()
            await self._end("feature_disabled", "feature_disabled", "Voice has been disabled")
        else:
            await self._end("terminated", "terminated", "Session ended by an operator")

    async def drain(self) -> None:
        """Called on SIGTERM: tell the client to resume elsewhere, then close 4012 and persist."""
        await self._send_event({
            "type": "gateway.session.draining",
            "session_id": self.session_id,
            "resume_token": session_services.resume_token_issue(
                session_id=self.session_id, user_id=self.identity.user_id),
        })
        await self._end("draining", None, "")
