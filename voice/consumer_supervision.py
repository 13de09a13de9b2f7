"""Supervision of a live voice connection: the per-second checks and the control messages.

A mixin of VoiceConsumer (voice/consumers.py), split out to keep each module about one thing: the consumer
adapts the socket (connect, frames, ending); this one watches a live session (kill switch, duration,
upstream stall, slot refresh) and answers the control messages (terminate, drain) that the process's control
channel hands it (voice/realtime/control.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from django.conf import settings

from voice.realtime.control import control_channel
from voice.services import sessions as session_services
from voice.services.access import concurrency_key
from voice.services.rollout import rollout_cache_clear, rollout_snapshot
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
        await self._publish_presence(just_admitted=True)
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

    async def _publish_presence(self, *, just_admitted: bool = False) -> None:
        """Keep (or, after a Redis outage, re-publish) this session's slots and groups."""
        state = get_state()
        ttl = SLOT_REFRESH_SECONDS * 3
        if not just_admitted:  # the admission itself took the concurrency slot, with this time to live
            await state.slot_refresh(concurrency_key(self.identity.user_id), self.session_id, ttl=ttl)
        await state.slot_refresh(ACTIVE_SESSIONS_KEY, self.session_id, ttl=ttl)
        if self.channel_layer is not None:
            control = control_channel(self.channel_layer)
            if self._control_joined is None or self._control_joined != control.generation:
                self._control_joined = await control.join(self.session_id)

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
