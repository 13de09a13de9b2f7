"""Supervision of a live voice connection: the per-second checks and the control messages.

A mixin of VoiceConsumer (voice/consumers.py), split out to keep each module about one thing: the consumer
adapts the socket (connect, frames, ending); this one watches a live session (kill switch, duration,
upstream stall, slot refresh) and answers the channel layer's control messages (terminate, drain).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from django.conf import settings

from voice.services import sessions as session_services
from voice.services.access import concurrency_key
from voice.services.rollout import BROADCAST_GROUP, rollout_cache_clear, rollout_snapshot
from voice.services.state import get_state
from voice.services.stats import ACTIVE_SESSIONS_KEY

logger = logging.getLogger("voice.consumers")

SLOT_REFRESH_SECONDS = 10


class SessionSupervision:
    """The consumer's supervision loop and control-message handlers (they use its state and `_end`)."""

    async def _supervise(self) -> None:
        """Every second: kill switch, duration limit, upstream stall; slots refreshed every 10 s."""
        state = get_state()
        state.add_resync_hook(self._publish_presence)
        await self._publish_presence()
        ticks = 0
        try:
            while not self._ended:
                await asyncio.sleep(1)
                ticks += 1
                now = time.monotonic()
                if not settings.ENABLE_VOICE_REALTIME or not (await rollout_snapshot()).voice_enabled:
                    await self._end("feature_disabled", "feature_disabled", "Voice has been disabled")
                    return
                left = self.deadline - now
                if left <= 0:
                    limit = int(self.meta.max_duration_s)
                    label = f"{limit // 60} min" if limit % 60 == 0 else f"{limit} s"
                    await self._end("timeout", "session_timeout", f"Session timeout ({label} max)")
                    return
                if left <= settings.SESSION_WARNING_SECONDS and not self.warned:
                    self.warned = True
                    await self._send_event({"type": "gateway.session.expiring", "seconds_left": int(left)})
                if self.session is not None:
                    await self.session.tick(now)
                if ticks % SLOT_REFRESH_SECONDS == 0:
                    await self._publish_presence()
        finally:
            state.remove_resync_hook(self._publish_presence)

    async def _publish_presence(self) -> None:
        """Keep (or, after a Redis outage, re-publish) this session's slots and groups."""
        state = get_state()
        ttl = SLOT_REFRESH_SECONDS * 3
        await state.slot_refresh(concurrency_key(self.identity.user_id), self.session_id, ttl=ttl)
        await state.slot_refresh(ACTIVE_SESSIONS_KEY, self.session_id, ttl=ttl)
        if self.channel_layer is not None and not getattr(self, "_joined", False):
            try:
                await asyncio.wait_for(self.channel_layer.group_add(BROADCAST_GROUP, self.channel_name), 1)
                await asyncio.wait_for(
                    self.channel_layer.group_add(f"voice.session.{self.session_id}", self.channel_name), 1
                )
                self._joined = True
                self._control_listener = asyncio.get_running_loop().create_task(self._listen_control())
            except Exception:  # noqa: BLE001 - the layer's Redis is down: the kill switch is also polled
                logger.warning("channel layer unavailable; control messages paused until it returns")

    async def _listen_control(self) -> None:
        """Receive channel-layer messages (kill switch, terminate) without ever dying on a Redis outage."""
        while not self._ended:
            try:
                message = await self.channel_layer.receive(self.channel_name)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                self._joined = False  # re-join when Redis is back (next presence refresh)
                return
            await self.dispatch(message)

    async def session_terminate(self, message: dict[str, Any]) -> None:
        """Called by the channel layer: the kill switch was engaged, or an operator ended this session."""
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
