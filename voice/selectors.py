"""Read-only queries over voice data (HackSoft 'selectors'). Every function is sync (ORM) and works on
SQLite and PostgreSQL alike: percentiles are computed in Python from the selected values."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import Count, DecimalField, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from voice.models import ERROR_END_REASONS, AccessRefusal, PlanAccess, VoiceProfile, VoiceSession, VoiceTurn


def month_start(now: datetime | None = None) -> datetime:
    """First instant of the current month (UTC)."""
    now = now or timezone.now()
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def day_start(now: datetime | None = None) -> datetime:
    """First instant of the current day (UTC)."""
    now = now or timezone.now()
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def month_spend_usd(*, user_id: int | None = None, plan: str | None = None) -> float:
    """Spend this month, for one user or one plan (sync; ORM)."""
    sessions = VoiceSession.objects.filter(started_at__gte=month_start())
    if user_id is not None:
        sessions = sessions.filter(user_id=user_id)
    if plan is not None:
        sessions = sessions.filter(plan=plan)
    total = sessions.aggregate(total=Sum("cost_usd"))["total"]
    return float(total or 0)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear interpolation between ranks (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


_FAILED = Q(end_reason__in=ERROR_END_REASONS)
MONEY = DecimalField(max_digits=14, decimal_places=6)


def _money(expression: str = "cost_usd") -> Coalesce:
    return Coalesce(Sum(expression), Value(Decimal(0)), output_field=MONEY)


def sessions_between(start: datetime, end: datetime | None = None) -> QuerySet[VoiceSession]:
    """Sessions started in [start, end)."""
    sessions = VoiceSession.objects.filter(started_at__gte=start)
    return sessions.filter(started_at__lt=end) if end is not None else sessions


def session_summary(sessions: QuerySet[VoiceSession]) -> dict:
    """Counts, errors, cost, rated sessions and mean rating of a session queryset (one query)."""
    row = sessions.aggregate(
        total=Count("id"),
        errors=Count("id", filter=_FAILED),
        cost=_money(),
        rated=Count("id", filter=Q(feedback_rating__isnull=False)),
        satisfied=Count("id", filter=Q(feedback_rating__gte=4)),
        rating_sum=Coalesce(Sum("feedback_rating"), 0),
    )
    return {
        "sessions": row["total"],
        "errors": row["errors"],
        "cost_usd": float(row["cost"]),
        "rated": row["rated"],
        "satisfied": row["satisfied"],
        "rating_mean": row["rating_sum"] / row["rated"] if row["rated"] else None,
    }


def end_reason_counts(sessions: QuerySet[VoiceSession]) -> dict[str, int]:
    """{end_reason: count} ("" is a session still open or never closed cleanly)."""
    rows = sessions.values("end_reason").annotate(n=Count("id")).order_by("end_reason")
    return {row["end_reason"] or "open": row["n"] for row in rows}


def first_audio_values(sessions: QuerySet[VoiceSession]) -> list[float]:
    """Speech-end → first-audio latencies (ms) of the turns of these sessions."""
    turns = VoiceTurn.objects.filter(session__in=sessions.values("id"), first_audio_ms__isnull=False)
    return [float(v) for v in turns.values_list("first_audio_ms", flat=True)]


def rag_turn_counts(sessions: QuerySet[VoiceSession]) -> dict[str, int]:
    """Turns that used retrieval, and those among them whose context was injected."""
    row = VoiceTurn.objects.filter(session__in=sessions.values("id")).aggregate(
        retrieval=Count("id", filter=Q(retrieval_used=True)),
        injected=Count("id", filter=Q(retrieval_used=True, rag_injected=True)),
    )
    return {"retrieval_turns": row["retrieval"], "injected_turns": row["injected"]}


def refusal_counts(start: datetime) -> dict[str, int]:
    """{refusal code: count} since `start`."""
    rows = AccessRefusal.objects.filter(at__gte=start).values("code").annotate(n=Count("id")).order_by("code")
    return {row["code"]: row["n"] for row in rows}


def adopters_by_plan(sessions: QuerySet[VoiceSession]) -> dict[str, int]:
    """{plan: distinct users with at least one completed (ended, not failed) session}."""
    completed = sessions.exclude(end_reason="").exclude(end_reason__in=ERROR_END_REASONS)
    rows = completed.values("plan").annotate(n=Count("external_user_id", distinct=True)).order_by("plan")
    return {row["plan"]: row["n"] for row in rows}


def spend_by_plan(start: datetime) -> dict[str, float]:
    """{plan: spend in USD} of sessions started since `start`."""
    rows = VoiceSession.objects.filter(started_at__gte=start).values("plan").annotate(total=_money())
    return {row["plan"]: float(row["total"]) for row in rows.order_by("plan")}


def top_spenders(start: datetime, limit: int = 10) -> list[dict]:
    """The `limit` users with the highest spend since `start`."""
    rows = (
        VoiceSession.objects.filter(started_at__gte=start)
        .values("external_user_id")
        .annotate(total=_money(), sessions=Count("id"))
        .order_by("-total", "external_user_id")[:limit]
    )
    return [
        {"user_id": row["external_user_id"], "cost_usd": float(row["total"]), "sessions": row["sessions"]}
        for row in rows
    ]


def _month_spend(group_by: str, outer: str) -> Coalesce:
    """This month's spend of the sessions whose `group_by` equals the outer row's `outer`, as a column."""
    spend = (
        VoiceSession.objects.filter(**{group_by: OuterRef(outer)}, started_at__gte=month_start())
        .values(group_by)
        .annotate(total=Sum("cost_usd"))
        .values("total")
    )
    return Coalesce(Subquery(spend), Value(Decimal(0)), output_field=MONEY)


def plans_with_month_spend() -> QuerySet[PlanAccess]:
    """Plans annotated with `month_spend` (Decimal) — the admin list and `voice_plans`."""
    return PlanAccess.objects.annotate(month_spend=_month_spend("plan", "code"))


def profiles_with_month_spend() -> QuerySet[VoiceProfile]:
    """Profiles annotated with `month_spend` (Decimal) — the admin list."""
    return VoiceProfile.objects.annotate(month_spend=_month_spend("user_id", "user_id"))


def daily_series(days: int, now: datetime | None = None) -> list[dict]:
    """One row per UTC day for the last `days` days: sessions, errors, error rate, cost, P50/P95 latency."""
    now = now or timezone.now()
    first = day_start(now) - timedelta(days=days - 1)
    sessions = sessions_between(first)
    by_day: dict[date, dict] = {
        (first + timedelta(days=i)).date(): {"sessions": 0, "errors": 0, "cost_usd": 0.0, "latencies": []}
        for i in range(days)
    }
    rows = (
        sessions.annotate(day=TruncDate("started_at"))
        .values("day")
        .annotate(n=Count("id"), cost=_money(), errors=Count("id", filter=_FAILED))
    )
    for row in rows:
        if row["day"] in by_day:
            by_day[row["day"]].update(sessions=row["n"], errors=row["errors"], cost_usd=float(row["cost"]))
    turns = VoiceTurn.objects.filter(session__started_at__gte=first, first_audio_ms__isnull=False)
    for started, latency in turns.values_list("session__started_at", "first_audio_ms"):
        day = started.astimezone(UTC).date() if timezone.is_aware(started) else started.date()
        if day in by_day:
            by_day[day]["latencies"].append(float(latency))
    series = []
    for day, data in by_day.items():
        latencies = data.pop("latencies")
        series.append({
            "day": day,
            **data,
            "error_rate": data["errors"] / data["sessions"] if data["sessions"] else None,
            "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95),
        })
    return series


def sessions_by_ids(ids: list[str]) -> dict[str, VoiceSession]:
    """{session id: row} for the given ids (unknown ids are absent)."""
    rows = VoiceSession.objects.filter(id__in=[i for i in ids if _is_uuid(i)]).select_related("user")
    return {str(row.id): row for row in rows}


def staff_user_for_external_id(external_id: str) -> AbstractBaseUser | None:
    """The active staff user behind a JWT user_id (profile external id, else username), or None."""
    profile = VoiceProfile.objects.select_related("user").filter(external_id=external_id).first()
    user = profile.user if profile else get_user_model().objects.filter(username=external_id).first()
    if user is None or not user.is_active or not user.is_staff:
        return None
    return user


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True
