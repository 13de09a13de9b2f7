"""Operator-side changes: plans, the beta list, rate-limit resets (admin actions, `voice_plans`,
`voice_rollout`, `voice_reset_ratelimit`, POST /v1/voice/plans/<code>/subscribers). Plan and beta changes
are audited in the admin's LogEntry and the per-process caches are cleared (other processes see the
change within their 1 s cache)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from limits import RateLimitItem, RateLimitItemPerHour
from redis.exceptions import RedisError

from voice.models import BetaUser, PlanAccess, VoiceProfile, VoiceRollout
from voice.services.access import budget_cache_clear, rate_item, rate_key
from voice.services.rollout import audit, rollout_cache_clear
from voice.services.state import KEY_PREFIX, SharedState
from voice.services.users import find_user, plan_cache_clear, plan_policies

KEEP: Any = object()  # "leave this field unchanged" (None means "clear it": use the global default)
PLAN_FIELDS = ("name", "voice_enabled", "sessions_per_hour", "max_session_seconds", "monthly_budget_usd",
               "active_subscribers", "realtime_model", "transcription_model", "voice", "vad_type", "vad_eagerness")


class PlanNotFound(LookupError):
    """The plan code is unknown (and creation was not asked for)."""


def plan_update(
    *, code: str, actor_id: int | None, create: bool = False, **values: Any
) -> tuple[PlanAccess, list[str]]:
    """Called by `voice_plans --set` and the subscribers API: apply `values`, audit, clear the caches."""
    unknown = set(values) - set(PLAN_FIELDS)
    if unknown:
        raise TypeError(f"unknown plan fields: {', '.join(sorted(unknown))}")
    with transaction.atomic():
        plan = PlanAccess.objects.select_for_update().filter(code=code).first()
        created = False
        if plan is None:
            if not create:
                raise PlanNotFound(code)
            plan, created = PlanAccess(code=code, name=code.replace("-", " ").title()), True
        changes = ["created"] if created else []
        for field, value in values.items():
            if value is KEEP:
                continue
            if field == "monthly_budget_usd" and value is not None:
                value = Decimal(str(value)).quantize(Decimal("0.01"))
            if getattr(plan, field) != value:
                setattr(plan, field, value)
                changes.append(f"{field}={value}")
        if changes:
            plan.full_clean()
            plan.save()
            audit(actor_id=actor_id, obj=plan, message="plan " + "; ".join(changes))
    plan_cache_clear()
    budget_cache_clear()
    return plan, changes


def user_ensure(reference: str, *, email: str = "") -> tuple[AbstractBaseUser, bool]:
    """Called by `voice_rollout --add-beta`: the user for a JWT user_id or username, created (with a voice
    profile whose external_id is `reference`) when unknown, so a beta list can precede the first login."""
    user = find_user(reference)
    if user is not None:
        return user, False
    with transaction.atomic():
        user = get_user_model().objects.create(username=reference[:150], email=email)
        VoiceProfile.objects.create(user=user, external_id=reference, email=email)
    return user, True


def beta_add(*, user: AbstractBaseUser, actor_id: int | None, note: str = "") -> bool:
    """Called by admin actions and `voice_rollout --add-beta`: True when added, False if already there."""
    rollout, _ = VoiceRollout.objects.get_or_create(pk=1)
    _, created = BetaUser.objects.get_or_create(user=user, defaults={"rollout": rollout, "note": note[:200]})
    if created:
        audit(actor_id=actor_id, obj=rollout, message=f"beta list: added {user.get_username()}")
    rollout_cache_clear()
    return created


def beta_remove(*, user: AbstractBaseUser, actor_id: int | None) -> bool:
    """Called by admin actions and `voice_rollout --remove-beta`: True when removed, False if absent."""
    rollout, _ = VoiceRollout.objects.get_or_create(pk=1)
    deleted, _ = BetaUser.objects.filter(user=user).delete()
    if deleted:
        audit(actor_id=actor_id, obj=rollout, message=f"beta list: removed {user.get_username()}")
    rollout_cache_clear()
    return bool(deleted)


class RateLimitResetError(RuntimeError):
    """Redis could not be reached to clear the window."""


def rate_limit_items() -> list[RateLimitItem]:
    """Every hourly window a user's sessions can be counted in (one per distinct plan limit) (sync; ORM)."""
    items = [rate_item(policy) for policy in plan_policies().values()]
    items.append(RateLimitItemPerHour(settings.MAX_SESSIONS_PER_USER_PER_HOUR))
    return list({item.key_for("x"): item for item in items}.values())


async def rate_limit_reset(state: SharedState, external_id: str, items: list[RateLimitItem]) -> int:
    """Called by `voice_reset_ratelimit`: clear the user's hourly session windows in Redis and in this
    process's memory; returns how many Redis window keys existed. Keys are also matched by pattern, so a
    window counted under a plan limit that has since changed is cleared too."""
    key = rate_key(external_id)
    found: list[str] = []
    if state.client is not None and not state.using_fallback:
        glob = re.sub(r"([*?\[\]\\])", r"\\\1", key)
        exact = re.compile(rf".*:LIMITER/{re.escape(key)}/\d+/\d+/\w+")
        try:
            found = [k async for k in state.client.scan_iter(match=f"{KEY_PREFIX}limits*{glob}/*", count=500)
                     if exact.fullmatch(k)]
            for item in items:
                await state.rate_clear(item, key)
            if found:
                await state.client.delete(*found)
        except (RedisError, OSError) as exc:
            raise RateLimitResetError(type(exc).__name__) from exc
    else:
        for item in items:
            await state.rate_clear(item, key)
    return len(found)
