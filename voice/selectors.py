"""Read-only queries over voice data (HackSoft 'selectors')."""

from __future__ import annotations

from datetime import datetime

from django.db.models import Sum
from django.utils import timezone

from voice.models import VoiceSession


def month_start(now: datetime | None = None) -> datetime:
    """First instant of the current month (UTC)."""
    now = now or timezone.now()
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def month_spend_usd(*, user_id: int | None = None, plan: str | None = None) -> float:
    """Spend this month, for one user or one plan (sync; ORM)."""
    sessions = VoiceSession.objects.filter(started_at__gte=month_start())
    if user_id is not None:
        sessions = sessions.filter(user_id=user_id)
    if plan is not None:
        sessions = sessions.filter(plan=plan)
    total = sessions.aggregate(total=Sum("cost_usd"))["total"]
    return float(total or 0)
