"""Usage statistics and the rollout KPI gate (GET /v1/voice/stats, `voice_stats`, `voice_rollout --check`,
the admin dashboard).

The KPI gate decides whether the rollout may move on (10 % → 50 % → 100 %). Each KPI has a value, a
threshold (settings VOICE_KPI_*) and a status: PASS, FAIL, or NO DATA (which fails: a KPI that cannot be
measured cannot be trusted). The gate is computed overall, per cohort (beta / percentage / everyone) and
per plan; the decision (`passed`) is the overall row, the other rows locate a regression. Cost and
adoption are plan-level figures and are not computed per cohort.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from asgiref.sync import async_to_sync
from django.conf import settings
from django.utils import timezone

from voice import selectors
from voice.models import Cohort, PlanAccess, VoiceSession
from voice.services import state as state_module
from voice.services.state import SharedState, get_state

T = TypeVar("T")
ACTIVE_SESSIONS_KEY = "active_sessions"  # the slot set of live sessions (held by each VoiceConsumer)
PASS, FAIL, NO_DATA = "PASS", "FAIL", "NO DATA"
_SINCE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks", "": "days"}


# --- helpers shared by views and commands ----------------------------------------------------------
def parse_since(text: str) -> timedelta:
    """Called for `--since` / `?since=`: "7d", "12h", "30m", "2w", "90s" (a bare number is days)."""
    match = _SINCE.match(text or "")
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"invalid duration {text!r}: use e.g. 7d, 12h, 30m")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def run_with_state(func: Callable[[SharedState], Awaitable[T]]) -> T:
    """Called from sync code (admin, sync views, commands): run `func(state)` on an event loop.

    Under an ASGI server this runs on the server's loop with its SharedState; elsewhere (commands,
    tests) on a throwaway loop whose SharedState is closed afterwards (no leaked Redis connections).
    """

    async def runner() -> T:
        loop = asyncio.get_running_loop()
        fresh = loop not in state_module._states
        state = get_state()
        try:
            return await func(state)
        finally:
            if fresh:
                await state.aclose()
                state_module._states.pop(loop, None)

    return async_to_sync(runner)()


async def live_session_ids() -> list[str]:
    """Called by async code: ids of the live sessions on every instance."""
    return await get_state().slot_members(ACTIVE_SESSIONS_KEY)


def live_session_ids_sync() -> list[str]:
    """Called by sync code (stats, dashboard, voice_sessions): ids of the live sessions everywhere."""
    return run_with_state(lambda state: state.slot_members(ACTIVE_SESSIONS_KEY))


# --- stats -------------------------------------------------------------------------------------------
def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _window(since: timedelta, now: datetime | None) -> tuple[datetime, datetime]:
    now = now or timezone.now()
    return now - since, now


def _window_doc(start: datetime, now: datetime) -> dict[str, Any]:
    seconds = int((now - start).total_seconds())
    return {"since": start.isoformat(), "until": now.isoformat(), "seconds": seconds}


def stats_report(
    *, since: timedelta, live_ids: list[str], now: datetime | None = None, top: int = 10, gate: bool = True
) -> dict[str, Any]:
    """Called by GET /v1/voice/stats and `voice_stats`: the usage report over the window (sync; ORM)."""
    start, now = _window(since, now)
    window = selectors.sessions_between(start, now)
    summary = selectors.session_summary(window)
    latencies = selectors.first_audio_values(window)
    rag = selectors.rag_turn_counts(window)
    plans = {plan.code: plan for plan in selectors.plans_with_month_spend()}
    adopters = selectors.adopters_by_plan(window)
    month_by_plan = selectors.spend_by_plan(selectors.month_start(now))
    adoption = {}
    for code in sorted(set(adopters) | {c for c, p in plans.items() if p.voice_enabled}):
        subscribers = plans[code].active_subscribers if code in plans else None
        users = adopters.get(code, 0)
        adoption[code] = {"users": users, "active_subscribers": subscribers,
                          "rate": _rate(users, subscribers or 0)}
    report: dict[str, Any] = {
        "generated_at": now.isoformat(),
        "window": _window_doc(start, now),
        "active_sessions": len(live_ids),
        "sessions": {
            "today": selectors.sessions_between(selectors.day_start(now), now).count(),
            "7d": selectors.sessions_between(now - timedelta(days=7), now).count(),
            "window": summary["sessions"],
        },
        "end_reasons": selectors.end_reason_counts(window),
        "errors": summary["errors"],
        "error_rate": _rate(summary["errors"], summary["sessions"]),
        "refusals": selectors.refusal_counts(start),
        "first_audio_ms": {
            "count": len(latencies),
            "p50": selectors.percentile(latencies, 50),
            "p95": selectors.percentile(latencies, 95),
            "p99": selectors.percentile(latencies, 99),
        },
        "rag": rag,
        "rag_injection_rate": _rate(rag["injected_turns"], rag["retrieval_turns"]),
        "satisfaction": _satisfaction(summary),
        "cost_usd": {
            "today": selectors.session_summary(selectors.sessions_between(selectors.day_start(now), now))[
                "cost_usd"],
            "month": sum(month_by_plan.values()),
            "window": summary["cost_usd"],
        },
        "adoption": adoption,
        "spend": {
            "per_plan": [
                {"plan": code, "month_usd": spend,
                 "budget_usd": _budget(plans[code]) if code in plans else None}
                for code, spend in month_by_plan.items()
            ],
            "top_users": selectors.top_spenders(selectors.month_start(now), top),
        },
    }
    if gate:
        report["kpi_gate"] = kpi_gate(since, now=now)
    return report


def _budget(plan: PlanAccess) -> float | None:
    return float(plan.monthly_budget_usd) if plan.monthly_budget_usd is not None else None


def _satisfaction(summary: dict[str, Any]) -> dict[str, Any]:
    return {"rated": summary["rated"], "mean": summary["rating_mean"],
            "share_4_5": _rate(summary["satisfied"], summary["rated"])}


# --- KPI gate ----------------------------------------------------------------------------------------
def _kpi(value: float | None, threshold: float, passed: bool | None, **detail: Any) -> dict[str, Any]:
    """passed None = no data."""
    status = NO_DATA if passed is None else PASS if passed else FAIL
    return {"value": value, "threshold": threshold, "status": status, "passed": bool(passed), **detail}


def _latency_kpi(sessions: Any) -> dict[str, Any]:
    threshold = settings.VOICE_KPI_FIRST_AUDIO_P95_MS
    values = selectors.first_audio_values(sessions)
    p95 = selectors.percentile(values, 95)
    return _kpi(p95, threshold, None if p95 is None else p95 < threshold, turns=len(values))


def _error_kpi(summary: dict[str, Any]) -> dict[str, Any]:
    threshold = settings.VOICE_KPI_MAX_ERROR_RATE
    rate = _rate(summary["errors"], summary["sessions"])
    return _kpi(rate, threshold, None if rate is None else rate < threshold,
                errors=summary["errors"], sessions=summary["sessions"])


def _satisfaction_kpi(summary: dict[str, Any]) -> dict[str, Any]:
    threshold = settings.VOICE_KPI_MIN_SATISFACTION
    details = _satisfaction(summary)
    mean = details["mean"]
    return _kpi(mean, threshold, None if mean is None else mean > threshold,
                rated=details["rated"], share_4_5=details["share_4_5"])


def _cost_kpi(plans: list[PlanAccess], spend: dict[str, float]) -> dict[str, Any]:
    rows, ratios = [], []
    for plan in plans:
        budget = _budget(plan)
        used = spend.get(plan.code, 0.0)
        rows.append({"plan": plan.code, "spend_usd": round(used, 6), "budget_usd": budget,
                     "passed": budget is None or used <= budget})
        if budget:  # a zero budget only passes or fails (no ratio)
            ratios.append(used / budget)
    value = max(ratios) if ratios else None  # the highest spend/budget ratio; None = no budget set
    return _kpi(value, 1.0, all(row["passed"] for row in rows), plans=rows)


def _adoption_kpi(plans: list[PlanAccess], adopters: dict[str, int]) -> dict[str, Any]:
    threshold = settings.VOICE_KPI_MIN_ADOPTION
    known = [plan for plan in plans if plan.active_subscribers]
    users = sum(adopters.get(plan.code, 0) for plan in known)
    subscribers = sum(plan.active_subscribers or 0 for plan in known)
    rate = _rate(users, subscribers)
    return _kpi(rate, threshold, None if rate is None else rate > threshold,
                users=users, active_subscribers=subscribers or None)


def _segment(sessions: Any, plans: list[PlanAccess] | None, spend: dict[str, float],
             adopters: dict[str, int]) -> dict[str, Any]:
    summary = selectors.session_summary(sessions)
    kpis = {
        "first_audio_p95_ms": _latency_kpi(sessions),
        "error_rate": _error_kpi(summary),
        "satisfaction": _satisfaction_kpi(summary),
    }
    if plans is not None:
        kpis["cost_within_budget"] = _cost_kpi(plans, spend)
        kpis["adoption"] = _adoption_kpi(plans, adopters)
    return {"sessions": summary["sessions"], "passed": all(k["passed"] for k in kpis.values()), "kpis": kpis}


def kpi_gate(since: timedelta, *, now: datetime | None = None) -> dict[str, Any]:
    """Called by stats, `voice_rollout --check` and the dashboard: the rollout KPIs over the window."""
    start, now = _window(since, now)
    window = selectors.sessions_between(start, now)
    spend = selectors.spend_by_plan(selectors.month_start(now))
    adopters = selectors.adopters_by_plan(window)
    used_plans = set(window.values_list("plan", flat=True).distinct())
    plans = [plan for plan in PlanAccess.objects.all() if plan.voice_enabled or plan.code in used_plans]
    overall = _segment(window, plans, spend, adopters)
    return {
        "window": _window_doc(start, now),
        "passed": overall["passed"],
        "decision": "overall",
        "thresholds": {
            "first_audio_p95_ms": settings.VOICE_KPI_FIRST_AUDIO_P95_MS,
            "error_rate": settings.VOICE_KPI_MAX_ERROR_RATE,
            "adoption": settings.VOICE_KPI_MIN_ADOPTION,
            "satisfaction": settings.VOICE_KPI_MIN_SATISFACTION,
        },
        "overall": overall,
        "cohorts": {
            cohort: _segment(window.filter(cohort=cohort), None, spend, adopters) for cohort in Cohort.values
        },
        "plans": {
            plan.code: _segment(window.filter(plan=plan.code), [plan], spend, adopters) for plan in plans
        },
    }


def kpi_rows(gate: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Called by `voice_rollout --check` and the dashboard: (segment, kpi, value, threshold, status) rows."""
    rows = []
    segments = [("overall", gate["overall"])]
    segments += [(f"cohort:{name}", seg) for name, seg in gate["cohorts"].items()]
    segments += [(f"plan:{name}", seg) for name, seg in gate["plans"].items()]
    for label, segment in segments:
        for name, kpi in segment["kpis"].items():
            rows.append((label, name, format_value(name, kpi["value"]), format_value(name, kpi["threshold"]),
                         kpi["status"]))
    return rows


def format_value(kpi: str, value: float | None) -> str:
    """A KPI value for humans: ms, %, ratio or rating."""
    if value is None:
        return "-"
    if kpi == "first_audio_p95_ms":
        return f"{value:.0f} ms"
    if kpi in ("error_rate", "adoption"):
        return f"{value * 100:.1f} %"
    if kpi == "cost_within_budget":
        return f"{value * 100:.0f} % of budget"
    return f"{value:.2f}"


def session_rows(limit: int = 20, ids: list[str] | None = None) -> list[VoiceSession]:
    """Called by `voice_sessions`: the most recent sessions, or the given ones."""
    if ids is not None:
        return list(selectors.sessions_by_ids(ids).values())
    return list(VoiceSession.objects.select_related("user").order_by("-started_at")[:limit])


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Called by the management commands: rows (the first is the header) as aligned text columns."""
    if not rows:
        return ""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join(lines)
