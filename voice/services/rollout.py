"""Rollout: the runtime kill switch, the deterministic percentage bucket and the beta list.

Why not django-waffle: its percentage flags are decided per browser cookie (a user would get different
answers on phone and desktop, and a WebSocket handshake carries no waffle cookie), and its per-user
lists need Django auth sessions. What we need is three fields and a hash, so we own them; the admin
edits them (audited in LogEntry) and `voice_rollout` does the same from the shell.

Changes reach every instance within 1 s: instances re-read the row at most once a second (a cache per
process), and engaging the kill switch also broadcasts `session.terminate` on the channel layer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.contenttypes.models import ContentType

from voice.models import BetaUser, Cohort, VoiceRollout

CACHE_SECONDS = 1.0
BROADCAST_GROUP = "voice.sessions"


@dataclass(frozen=True)
class RolloutSnapshot:
    voice_enabled: bool
    percentage: int
    beta_user_ids: frozenset[int]  # Django user pks
    read_at: float


def rollout_bucket(external_user_id: str) -> int:
    """A stable bucket in [0, 100) for a user id: the same on every device, instance and restart."""
    digest = hashlib.sha256(f"intelia-voice-rollout:{external_user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def rollout_cohort(snapshot: RolloutSnapshot, *, user_pk: int | None, external_user_id: str) -> str | None:
    """The cohort that admits the user, or None when the rollout does not (kill switch aside)."""
    if user_pk is not None and user_pk in snapshot.beta_user_ids:
        return Cohort.BETA
    if snapshot.percentage >= 100:
        return Cohort.EVERYONE
    if rollout_bucket(external_user_id) < snapshot.percentage:
        return Cohort.PERCENTAGE
    return None


def rollout_read() -> RolloutSnapshot:
    """Read the rollout row and beta list from the database (sync; ORM)."""
    rollout, _ = VoiceRollout.objects.get_or_create(pk=1)
    beta = frozenset(BetaUser.objects.values_list("user_id", flat=True))
    return RolloutSnapshot(rollout.voice_enabled, rollout.percentage, beta, time.monotonic())


_cache: RolloutSnapshot | None = None
# The read in flight, per event loop: every session's tick shares it (single flight). Without it, all
# the ticks of the moment the cache expires each queued a read on the one DB thread, and under load the
# queue outgrew a second, so the next expiry found it longer still.
_reads: dict[asyncio.AbstractEventLoop, asyncio.Task[RolloutSnapshot]] = {}
_generation = 0  # bumped by rollout_cache_clear: a read started before a change does not refill the cache


async def _read_into_cache(generation: int) -> RolloutSnapshot:
    global _cache
    from voice.services.db import run_db

    snapshot = await run_db(rollout_read)
    if generation == _generation:
        _cache = snapshot
    return snapshot


async def rollout_snapshot() -> RolloutSnapshot:
    """The rollout as seen by this process, at most CACHE_SECONDS old (called per connection/tick)."""
    snapshot = _cache
    if snapshot is not None and time.monotonic() - snapshot.read_at <= CACHE_SECONDS:
        return snapshot
    loop = asyncio.get_running_loop()
    read = _reads.get(loop)
    if read is None:
        read = _reads[loop] = loop.create_task(_read_into_cache(_generation))
        read.add_done_callback(lambda done: _reads.pop(loop, None) if _reads.get(loop) is done else None)
    return await asyncio.shield(read)


def rollout_cache_clear() -> None:
    """Drop the cached snapshot (called after a local change, and by tests)."""
    global _cache, _generation
    _cache = None
    _generation += 1
    _reads.clear()


def rollout_update(
    *, actor_id: int | None, voice_enabled: bool | None = None, percentage: int | None = None
) -> VoiceRollout:
    """Change the kill switch and/or percentage, audit it, and broadcast a kill to live sessions."""
    if percentage is not None and not 0 <= percentage <= 100:
        raise ValueError("percentage must be between 0 and 100")
    rollout, _ = VoiceRollout.objects.get_or_create(pk=1)
    changes = []
    if voice_enabled is not None and voice_enabled != rollout.voice_enabled:
        rollout.voice_enabled = voice_enabled
        changes.append("kill switch " + ("released" if voice_enabled else "engaged"))
    if percentage is not None and percentage != rollout.percentage:
        rollout.percentage = percentage
        changes.append(f"percentage {percentage}%")
    if changes:
        rollout.save()
        audit(actor_id=actor_id, obj=rollout, message="; ".join(changes))
    rollout_cache_clear()
    if voice_enabled is False:
        broadcast_terminate(code="feature_disabled")
    return rollout


def audit(*, actor_id: int | None, obj: object, message: str) -> None:
    """Record a rollout change in the admin's LogEntry (shown in the object's history)."""
    if actor_id is None:
        from voice.services.users import system_user

        actor_id = system_user().pk
    LogEntry.objects.create(
        user_id=actor_id,
        content_type=ContentType.objects.get_for_model(type(obj)),
        object_id=str(getattr(obj, "pk", "")),
        object_repr=str(obj)[:200],
        action_flag=CHANGE,
        change_message=message,
    )


def broadcast_terminate(*, code: str, session_id: str | None = None) -> bool:
    """Tell live sessions (all, or one) on every instance to close; False when the layer is down."""
    from asgiref.sync import async_to_sync

    from voice.realtime.control import control_broadcast

    message = {"type": "session.terminate", "code": code}
    if session_id:
        # Every process receives it; the one holding the session ends it (voice/realtime/control.py).
        message["session_id"] = session_id
    # When the layer is down, sessions still poll the kill switch every second.
    return async_to_sync(control_broadcast)(message)
