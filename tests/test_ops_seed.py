"""A known data set for the stats / KPI-gate / command tests (numbers worked out in the docstring)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


def seed_dataset(now: datetime = NOW, prefix: str = "") -> dict:
    """Plans elite (voice, 20 subscribers, budget 10 USD) and intelia (voice, unknown subscribers, no
    budget); sessions (window = 7 days before `now`):

    s1 u1 elite/beta        now-1h   client_closed   0.50 USD  rating 5  turns: 100 ms (rag used+injected),
                                                                        200 ms (rag used, not injected)
    s2 u2 elite/percentage  now-2d   timeout         1.00      rating 4  turns: 300 (used+injected), 400
    s3 u3 intelia/percent.  now-3d   upstream_error  0.25      -         turns: 500
    s4 u1 elite/beta        now-30m  (open)          0.00      -         no turns
    s5 u4 intelia/everyone  now-6d   client_closed   2.00      rating 3  turns: 1000, (no audio)
    s6 u5 elite             now-10d  internal_error  4.00 (outside the window, same month) turn 5000 ms
    s7 u6 elite             now-20d  client_closed 100.00 (previous month)
    refusals: 2 rate_limited + 1 plan_not_allowed in the window, 1 rate_limited at now-10d.

    → window: 5 sessions, 1 error (20 %), first audio [100,200,300,400,500,1000] → p50 350, p95 875,
      p99 975; rag 2/3; cost today 0.50, month 7.75, window 3.75; adoption elite 2/20 = 0.10, intelia
      1/unknown; satisfaction mean 4.0, share 4-5 = 2/3.
    """
    from voice.models import AccessRefusal, PlanAccess, VoiceSession, VoiceTurn

    PlanAccess.objects.update_or_create(code="elite", defaults={
        "name": "Elite", "voice_enabled": True, "active_subscribers": 20, "monthly_budget_usd": Decimal(10)})
    PlanAccess.objects.update_or_create(code="intelia", defaults={
        "name": "Intelia", "voice_enabled": True, "active_subscribers": None, "monthly_budget_usd": None})
    PlanAccess.objects.update_or_create(code="pro", defaults={"name": "Pro", "voice_enabled": False})

    def user(n: int) -> str:
        return f"{prefix}u{n}"

    def session(key, n, plan, cohort, started, reason, cost, rating=None, turns=()):
        row = VoiceSession.objects.create(
            external_user_id=user(n), plan=plan, cohort=cohort, upstream="local", started_at=started,
            end_reason=reason, cost_usd=Decimal(cost), feedback_rating=rating, turns=len(turns),
            ended_at=None if not reason else started + timedelta(minutes=5),
        )
        for index, (first_audio, used, injected) in enumerate(turns):
            VoiceTurn.objects.create(session=row, index=index, first_audio_ms=first_audio,
                                     retrieval_used=used, rag_injected=injected)
        return row

    rows = {
        "s1": session("s1", 1, "elite", "beta", now - timedelta(hours=1), "client_closed", "0.50", 5,
                      [(100, True, True), (200, True, False)]),
        "s2": session("s2", 2, "elite", "percentage", now - timedelta(days=2), "timeout", "1.00", 4,
                      [(300, True, True), (400, False, False)]),
        "s3": session("s3", 3, "intelia", "percentage", now - timedelta(days=3), "upstream_error", "0.25",
                      None, [(500, False, False)]),
        "s4": session("s4", 1, "elite", "beta", now - timedelta(minutes=30), "", "0"),
        "s5": session("s5", 4, "intelia", "everyone", now - timedelta(days=6), "client_closed", "2.00", 3,
                      [(1000, False, False), (None, False, False)]),
        "s6": session("s6", 5, "elite", "", now - timedelta(days=10), "internal_error", "4.00", None,
                      [(5000, False, False)]),
        "s7": session("s7", 6, "elite", "", now - timedelta(days=20), "client_closed", "100.00"),
    }
    refusals = (("rate_limited", timedelta(hours=2)), ("rate_limited", timedelta(days=1)),
                ("plan_not_allowed", timedelta(days=4)), ("rate_limited", timedelta(days=10)))
    for code, age in refusals:
        refusal = AccessRefusal.objects.create(external_user_id=user(9), plan="pro", code=code)
        AccessRefusal.objects.filter(pk=refusal.pk).update(at=now - age)
    return rows


@pytest.mark.django_db
def test_seed_dataset_is_consistent():
    from voice.models import VoiceSession, VoiceTurn

    seed_dataset()
    assert VoiceSession.objects.count() == 7
    assert VoiceTurn.objects.count() == 8
