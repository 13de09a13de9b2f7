"""Local user records for people known only through JWTs issued by the main application."""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.utils import timezone

from voice.models import PlanAccess, VoiceProfile

SYSTEM_USERNAME = "voice-system"
PLAN_CACHE_SECONDS = 1.0


@dataclass(frozen=True)
class PlanPolicy:
    """The limits that apply to a session, resolved from the plan row and the global settings."""

    code: str
    name: str
    voice_enabled: bool
    sessions_per_hour: int
    max_session_seconds: int
    monthly_budget_usd: float | None


@dataclass(frozen=True)
class LocalUser:
    pk: int
    external_id: str
    is_staff: bool
    plan_code: str | None  # stored on the profile (used when the JWT has no `plan` claim)
    monthly_budget_usd: float | None


def user_for_identity(*, external_id: str, email: str = "") -> LocalUser:
    """Find or create the local user and voice profile for a JWT `user_id` (sync; ORM)."""
    User = get_user_model()
    profile = VoiceProfile.objects.select_related("user", "plan").filter(external_id=external_id).first()
    if profile is None:
        user, _ = User.objects.get_or_create(username=external_id[:150], defaults={"email": email})
        profile, _ = VoiceProfile.objects.get_or_create(user=user, defaults={"external_id": external_id})
    now = timezone.now()
    updates = {}
    if email and profile.email != email:
        updates["email"] = email
    if profile.last_seen_at is None or (now - profile.last_seen_at).total_seconds() > 300:
        updates["last_seen_at"] = now  # coarse: no write on every connection
    if updates:
        VoiceProfile.objects.filter(pk=profile.pk).update(**updates)
    budget = profile.monthly_budget_usd
    return LocalUser(
        pk=profile.user_id,
        external_id=profile.external_id,
        is_staff=profile.user.is_staff,
        plan_code=profile.plan.code if profile.plan else None,
        monthly_budget_usd=float(budget) if budget is not None else None,
    )


def find_user(reference: str):
    """Resolve an operator's USER argument: a JWT user_id (profile) or a username (sync; ORM)."""
    profile = VoiceProfile.objects.select_related("user").filter(external_id=reference).first()
    if profile is not None:
        return profile.user
    return get_user_model().objects.filter(username=reference).first()


def system_user():
    """The user that shell commands act as in audit records."""
    user, _ = get_user_model().objects.get_or_create(
        username=SYSTEM_USERNAME, defaults={"is_active": False}
    )
    return user


_plan_cache: tuple[float, dict[str, PlanPolicy]] | None = None


def plan_policies() -> dict[str, PlanPolicy]:
    """All plans as policies, cached for PLAN_CACHE_SECONDS (sync; ORM)."""
    global _plan_cache
    from django.conf import settings

    if _plan_cache is not None and time.monotonic() - _plan_cache[0] < PLAN_CACHE_SECONDS:
        return _plan_cache[1]
    policies = {
        plan.code: PlanPolicy(
            code=plan.code,
            name=plan.name,
            voice_enabled=plan.voice_enabled,
            sessions_per_hour=plan.sessions_per_hour or settings.MAX_SESSIONS_PER_USER_PER_HOUR,
            max_session_seconds=plan.max_session_seconds or settings.MAX_SESSION_DURATION,
            monthly_budget_usd=float(plan.monthly_budget_usd) if plan.monthly_budget_usd is not None else None,
        )
        for plan in PlanAccess.objects.all()
    }
    _plan_cache = (time.monotonic(), policies)
    return policies


def plan_cache_clear() -> None:
    """Forget cached plans (after an edit, and in tests)."""
    global _plan_cache
    _plan_cache = None
