"""Local user records for people known only through JWTs issued by the main application."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from django.contrib.auth import get_user_model
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from voice.models import PlanAccess, VoiceProfile
from voice.realtime.profile import RealtimeProfile

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
    realtime: RealtimeProfile = field(default_factory=RealtimeProfile.resolve)  # models and voice


@dataclass(frozen=True)
class LocalUser:
    pk: int
    external_id: str
    is_staff: bool
    plan_code: str | None  # stored on the profile (used when the JWT has no `plan` claim)
    monthly_budget_usd: float | None


_PROFILE_FIELDS = ("pk", "user_id", "email", "last_seen_at", "monthly_budget_usd", "plan__code", "user__is_staff",
                   "external_id")
BATCH_LOOKUP_MAX = 32  # profiles per query of a batch
_PLACEHOLDER = "\x00external-id\x00"


@functools.lru_cache(maxsize=64)
def _profiles_lookup_sql(alias: str, count: int) -> str:
    """The lookup of `count` profiles (one per connection; a batch of an admission storm's), compiled once per
    database and size by the ORM itself (building the query costs ~0.4 ms per call, executing it ~0.02 ms;
    this lookup runs on every connection)."""
    placeholders = [f"{_PLACEHOLDER}{i}" for i in range(count)]
    query = VoiceProfile.objects.using(alias).filter(external_id__in=placeholders).values(*_PROFILE_FIELDS).query
    sql, params = query.get_compiler(alias).as_sql()
    assert sorted(params) == sorted(placeholders), params
    return sql


def _profile_row(external_id: str) -> dict[str, Any] | None:
    return _profile_rows([external_id]).get(external_id)  # external_id is unique


def _profile_rows(external_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Profiles by external id, BATCH_LOOKUP_MAX per query."""
    rows: dict[str, dict[str, Any]] = {}
    connection = connections[DEFAULT_DB_ALIAS]
    unique = list(dict.fromkeys(external_ids))
    with connection.cursor() as cursor:
        for start in range(0, len(unique), BATCH_LOOKUP_MAX):
            chunk = unique[start:start + BATCH_LOOKUP_MAX]
            cursor.execute(_profiles_lookup_sql(DEFAULT_DB_ALIAS, len(chunk)), chunk)
            for values in cursor.fetchall():
                row = _typed_row(values)
                rows[row["external_id"]] = row
    return rows


def _typed_row(values: tuple[Any, ...]) -> dict[str, Any]:
    row = dict(zip(_PROFILE_FIELDS, values, strict=True))
    # A raw cursor skips the ORM's converters: SQLite hands back text and numbers.
    if isinstance(row["last_seen_at"], str):
        row["last_seen_at"] = parse_datetime(row["last_seen_at"])
    if row["last_seen_at"] is not None and timezone.is_naive(row["last_seen_at"]):
        row["last_seen_at"] = timezone.make_aware(row["last_seen_at"], UTC)
    row["user__is_staff"] = bool(row["user__is_staff"])
    return row


def user_for_identity(*, external_id: str, email: str = "", plan: str | None = None) -> LocalUser:
    """Find or create the local user and voice profile for a JWT `user_id` (sync; ORM).

    Called on every connection (the access decision's only database read): one precompiled query, and a
    write only when something changed or every 5 minutes (`last_seen_at`).
    """
    return _local_user(_profile_row(external_id), external_id=external_id, email=email, plan=plan)


def users_for_identities(identities: list[tuple[str, str, str | None]]) -> list[LocalUser | Exception]:
    """`user_for_identity` for (external_id, email, plan) of many connections at once (sync; ORM): one query
    for all their profiles, then per identity only what a single lookup would write (a new user, a changed
    email, a stale `last_seen_at`). An identity that fails gets its exception, the others their users."""
    rows = _profile_rows([external_id for external_id, _, _ in identities])
    found: list[LocalUser | Exception] = []
    for external_id, email, plan in identities:
        try:
            found.append(_local_user(rows.get(external_id), external_id=external_id, email=email, plan=plan))
        except DatabaseError:
            raise  # the database is down: every lookup of the batch fails alike
        except Exception as exc:  # noqa: BLE001 - that identity's own failure, handed to its admission
            found.append(exc)
    return found


def _local_user(row: dict[str, Any] | None, *, external_id: str, email: str, plan: str | None) -> LocalUser:
    if row is None:
        user, _ = get_user_model().objects.get_or_create(username=external_id[:150], defaults={"email": email})
        # The plan claim seeds the profile, so the admin sees it; later tokens without a claim use it.
        plan_row = PlanAccess.objects.filter(code=plan).first() if plan else None
        VoiceProfile.objects.get_or_create(  # by id: the instances would cache each other (a cycle)
            user_id=user.pk, defaults={"external_id": external_id, "email": email, "plan": plan_row}
        )
        row = _profile_row(external_id)
        assert row is not None
    now = timezone.now()
    updates = {}
    if email and row["email"] != email:
        updates["email"] = email
    if row["last_seen_at"] is None or (now - row["last_seen_at"]).total_seconds() > 300:
        updates["last_seen_at"] = now  # coarse: no write on every connection
    if updates:
        VoiceProfile.objects.filter(pk=row["pk"]).update(**updates)
    budget = row["monthly_budget_usd"]
    return LocalUser(
        pk=row["user_id"],
        external_id=external_id,
        is_staff=row["user__is_staff"],
        plan_code=row["plan__code"],
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
            realtime=RealtimeProfile.resolve(
                model=plan.realtime_model, transcription_model=plan.transcription_model, voice=plan.voice,
                vad_type=plan.vad_type, vad_eagerness=plan.vad_eagerness,
            ),
        )
        for plan in PlanAccess.objects.all()
    }
    _plan_cache = (time.monotonic(), policies)
    return policies


def plan_cache_clear() -> None:
    """Forget cached plans (after an edit, and in tests)."""
    global _plan_cache
    _plan_cache = None
