"""Management commands: voice_rollout, voice_token, voice_plans, voice_stats, voice_reset_ratelimit (real
Redis), voice_sessions, voice_cleanup, voice_health."""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from limits import RateLimitItemPerHour

from tests.conftest import unique_user
from tests.test_ops_seed import seed_dataset
from voice.models import AccessRefusal, BetaUser, PlanAccess, VoiceProfile, VoiceRollout, VoiceSession, VoiceTurn
from voice.services.access import rate_item, rate_key
from voice.services.auth import identity_from_jwt
from voice.services.stats import run_with_state
from voice.services.users import plan_policies

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()




# --- voice_token ----------------------------------------------------------------------------------
def test_voice_token_prints_a_valid_access_token():
    out = run("voice_token", "ext-42", "--plan", "elite", "--minutes", "5", "--email", "a@b.example")
    token = out.strip()
    identity = identity_from_jwt(token)
    assert (identity.user_id, identity.plan, identity.email) == ("ext-42", "elite", "a@b.example")
    with pytest.raises(CommandError):
        run("voice_token", "ext-42", "--minutes", "0")


# --- voice_rollout --------------------------------------------------------------------------------
def test_rollout_disable_enable_percent(sent):
    VoiceRollout.objects.update_or_create(pk=1, defaults={"voice_enabled": True, "percentage": 0})
    assert "ENGAGED" in run("voice_rollout", "--disable")
    assert VoiceRollout.objects.get(pk=1).voice_enabled is False
    assert sent == [{"code": "feature_disabled", "session_id": None}]
    run("voice_rollout", "--enable")
    run("voice_rollout", "--percent", "50")
    rollout = VoiceRollout.objects.get(pk=1)
    assert (rollout.voice_enabled, rollout.percentage) == (True, 50)
    messages = set(LogEntry.objects.filter(object_id="1").values_list("change_message", flat=True))
    assert {"kill switch engaged", "kill switch released", "percentage 50%"} <= messages
    assert LogEntry.objects.filter(user__username="voice-system").exists()
    with pytest.raises(CommandError):
        run("voice_rollout", "--percent", "150")
    with pytest.raises(CommandError):  # mutually exclusive actions
        run("voice_rollout", "--enable", "--disable")


def test_rollout_beta_add_creates_unknown_users_and_remove():
    external = unique_user("beta")
    assert "new local user created" in run("voice_rollout", "--add-beta", external, "--note", "pilot")
    profile = VoiceProfile.objects.get(external_id=external)
    assert BetaUser.objects.filter(user=profile.user, note="pilot").exists()
    assert "already on" in run("voice_rollout", "--add-beta", external)
    get_user_model().objects.create(username="known-username")
    run("voice_rollout", "--add-beta", "known-username")
    shown = run("voice_rollout", "--show")
    assert external in shown and "known-username" in shown and "Beta users:  2" in shown
    run("voice_rollout", "--remove-beta", external)
    assert not BetaUser.objects.filter(user=profile.user).exists()
    assert LogEntry.objects.filter(change_message=f"beta list: removed {external}").exists()
    with pytest.raises(CommandError, match="not on the beta list"):
        run("voice_rollout", "--remove-beta", external)
    with pytest.raises(CommandError, match="unknown user"):
        run("voice_rollout", "--remove-beta", "never-seen-" + external)


def test_rollout_enable_percent_and_beta_in_one_call(sent):
    VoiceRollout.objects.update_or_create(pk=1, defaults={"voice_enabled": False, "percentage": 0})
    alice = unique_user("alice")
    out = run("voice_rollout", "--enable", "--percent", "10", "--add-beta", alice, "--add-beta", "bob-" + alice)
    rollout = VoiceRollout.objects.get(pk=1)
    assert (rollout.voice_enabled, rollout.percentage) == (True, 10)
    assert BetaUser.objects.filter(user__username__in=[alice, "bob-" + alice]).count() == 2
    assert "Kill switch released" in out and "10 %" in out and "Beta users:  2" in out
    messages = set(LogEntry.objects.filter(object_id="1").values_list("change_message", flat=True))
    assert {"kill switch released", "percentage 10%", f"beta list: added {alice}"} <= messages
    # Everything is checked before anything changes: a bad user leaves the percentage alone.
    with pytest.raises(CommandError, match="unknown user"):
        run("voice_rollout", "--percent", "20", "--remove-beta", "never-seen-" + alice)
    assert VoiceRollout.objects.get(pk=1).percentage == 10
    with pytest.raises(CommandError, match="does not combine"):
        run("voice_rollout", "--check", "--percent", "20")


def test_rollout_check_exit_status(settings):
    seed_dataset(now=timezone.now())
    with pytest.raises(CommandError, match="KPI gate FAILED"):
        run("voice_rollout", "--check", "--since", "7d")
    settings.VOICE_KPI_FIRST_AUDIO_P95_MS = 900
    settings.VOICE_KPI_MAX_ERROR_RATE = 0.25
    settings.VOICE_KPI_MIN_SATISFACTION = 3.9
    settings.VOICE_KPI_MIN_ADOPTION = 0.05
    # The seed's older sessions may fall in this month depending on today's date: lift the budget.
    PlanAccess.objects.filter(code="elite").update(monthly_budget_usd=1000)
    out = run("voice_rollout", "--check")
    assert "KPI gate PASSED" in out and "cohort:beta" in out and "plan:elite" in out
    gate = json.loads(run("voice_rollout", "--check", "--json").split("KPI gate PASSED")[0])
    assert gate["passed"] is True
    with pytest.raises(CommandError):
        run("voice_rollout", "--check", "--since", "forever")


# --- voice_plans ----------------------------------------------------------------------------------
def test_plans_list_and_set():
    seed_dataset(now=timezone.now())
    listing = run("voice_plans")
    assert "elite" in listing and "MONTH SPEND" in listing
    assert plan_policies()["elite"].sessions_per_hour  # warm the cache
    out = run("voice_plans", "--set", "elite", "--voice", "off", "--sessions-per-hour", "3",
              "--budget", "12.5", "--subscribers", "40", "--max-seconds", "300")
    assert "updated" in out
    elite = PlanAccess.objects.get(code="elite")
    assert (elite.voice_enabled, elite.sessions_per_hour, elite.max_session_seconds) == (False, 3, 300)
    assert (elite.monthly_budget_usd, elite.active_subscribers) == (Decimal("12.50"), 40)
    assert plan_policies()["elite"].sessions_per_hour == 3  # plan cache cleared
    run("voice_plans", "--set", "elite", "--budget", "none")
    assert PlanAccess.objects.get(code="elite").monthly_budget_usd is None
    assert "unchanged" in run("voice_plans", "--set", "elite", "--budget", "none")
    with pytest.raises(CommandError, match="unknown plan"):
        run("voice_plans", "--set", "platinum", "--voice", "on")
    run("voice_plans", "--set", "platinum", "--voice", "on", "--create")
    assert PlanAccess.objects.get(code="platinum").voice_enabled is True
    for bad in (("--budget", "abc"), ("--subscribers", "-2")):
        with pytest.raises(CommandError):
            run("voice_plans", "--set", "elite", *bad)
    with pytest.raises(CommandError):
        run("voice_plans", "--voice", "on")  # no --set


# --- voice_stats ----------------------------------------------------------------------------------
def test_stats_table_and_json():
    seed_dataset(now=timezone.now())
    table = run("voice_stats", "--since", "7d")
    assert "error rate" in table and "20.0 %" in table and "Rollout KPI gate" in table
    report = json.loads(run("voice_stats", "--json"))
    assert report["sessions"]["7d"] == 5 and report["first_audio_ms"]["count"] == 6
    with pytest.raises(CommandError):
        run("voice_stats", "--since", "nope")


# --- voice_reset_ratelimit (real Redis) -----------------------------------------------------------
def test_reset_ratelimit_clears_the_redis_window():
    PlanAccess.objects.filter(code="elite").update(sessions_per_hour=2)
    external = unique_user("rate")
    user = get_user_model().objects.create(username=f"name-{external}")
    VoiceProfile.objects.create(user=user, external_id=external)
    item = rate_item(plan_policies()["elite"])
    stale = RateLimitItemPerHour(7)  # a window counted under a limit no plan has any more

    async def fill(state):
        for _ in range(2):
            await state.rate_hit(item, rate_key(external))
        await state.rate_hit(stale, rate_key(external))
        return await state.rate_check(item, rate_key(external))

    allowed, retry_after = run_with_state(fill)
    assert not allowed and retry_after > 0
    out = run("voice_reset_ratelimit", f"name-{external}")  # by username: resolved to the external id
    assert external in out and "2 window key(s)" in out

    async def check(state):
        keys = [k async for k in state.client.scan_iter(match=f"intelia_voice:limits*{external}*")]
        return await state.rate_check(item, rate_key(external)), keys

    (allowed, _), keys = run_with_state(check)
    assert allowed and keys == []
    with pytest.raises(CommandError):
        run("voice_reset_ratelimit", " ")


def test_reset_ratelimit_redis_down(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/15"
    with pytest.raises(CommandError, match="Redis unreachable"):
        run("voice_reset_ratelimit", unique_user("down"))


# --- voice_sessions -------------------------------------------------------------------------------
def test_sessions_list_active_terminate_and_spool(sent, settings, tmp_path):
    rows = seed_dataset(now=timezone.now())
    listing = run("voice_sessions", "--limit", "3")
    assert str(rows["s4"].id) in listing and "live/open" in listing
    live_id = str(rows["s4"].id)
    ghost = str(uuid.uuid4())
    run_with_state(lambda s: s.slot_acquire("active_sessions", live_id, limit=10_000, ttl=30))
    run_with_state(lambda s: s.slot_acquire("active_sessions", ghost, limit=10_000, ttl=30))
    try:
        active = run("voice_sessions", "--active")
        assert live_id in active and ghost in active
        assert "Termination sent" in run("voice_sessions", "--terminate", live_id)
        assert sent == [{"code": "terminated", "session_id": live_id}]
    finally:
        for sid in (live_id, ghost):
            run_with_state(lambda s, sid=sid: s.slot_release("active_sessions", sid))
    assert "not live" in run("voice_sessions", "--terminate", str(rows["s1"].id))
    with pytest.raises(CommandError, match="unknown session"):
        run("voice_sessions", "--terminate", str(uuid.uuid4()))

    from voice.services.sessions import spool_record

    settings.METRICS_SPOOL_DIR = str(tmp_path)
    spooled = str(uuid.uuid4())
    spool_record({
        "id": spooled, "user_pk": None, "user_id": "spool-user", "plan": "elite", "cohort": "beta",
        "upstream": "local", "instance": "i1", "started_at": timezone.now().timestamp() - 60,
        "ended_at": timezone.now().timestamp(), "duration_s": 60.0, "end_reason": "client_closed",
        "close_code": 1000, "error": "", "frames_in": 1, "frames_out": 1, "bytes_in": 1, "bytes_out": 1,
        "interruptions": 0, "rag_queries": 0, "rag_hits": 0, "cost_usd": 0.01, "tokens": {}, "turns": [],
    })
    assert "1 spooled record(s) replayed" in run("voice_sessions", "--flush-spool")
    assert VoiceSession.objects.filter(pk=spooled, end_reason="client_closed").exists()


# --- voice_cleanup --------------------------------------------------------------------------------
def test_cleanup_older_than():
    now = timezone.now()
    seed_dataset(now=now)  # s6 (10 days) and s7 (20 days) are old; one refusal is 10 days old
    dry = run("voice_cleanup", "--older-than", "8", "--dry-run")
    assert "would delete 2 session(s), 1 turn(s), 1 refusal(s)" in dry
    assert VoiceSession.objects.count() == 7
    out = run("voice_cleanup", "--older-than", "8")
    assert "Deleted 2 session(s), 1 turn(s), 1 refusal(s)" in out
    assert VoiceSession.objects.count() == 5 and VoiceTurn.objects.count() == 7
    assert not AccessRefusal.objects.filter(at__lt=now - timedelta(days=8)).exists()
    with pytest.raises(CommandError):
        run("voice_cleanup", "--older-than", "0")


# --- voice_health ---------------------------------------------------------------------------------
def test_health_ok_with_real_redis(settings):
    settings.RAG_BACKEND = "off"
    out = run("voice_health")
    assert "database" in out and "redis" in out and "OK" in out.upper()
    report = json.loads(run("voice_health", "--json"))
    assert report["ok"] is True
    assert report["checks"]["redis"]["status"] == "ok"
    assert report["checks"]["upstream"]["status"] == "ok"
    assert "speech" in report["checks"]["upstream"]["detail"]  # the local engine says whether it hears


def test_health_shows_each_plans_model_and_warns_before_a_shutdown(settings):
    import datetime as dt

    settings.RAG_BACKEND = "off"
    settings.OPENAI_REALTIME_MODEL = "gpt-realtime-2"
    today = dt.date.today()
    settings.VOICE_MODEL_SHUTDOWNS = {"gpt-realtime-mini": (today + dt.timedelta(days=59)).isoformat(),
                                      "gpt-realtime-2": (today + dt.timedelta(days=61)).isoformat()}
    PlanAccess.objects.filter(code="elite").update(realtime_model="gpt-realtime-mini")
    out = run("voice_health")
    assert "WARN" in out and "gpt-realtime-mini shuts down on" in out and "(59 days)" in out
    table = out.split("Models per plan")[1]
    assert re.search(r"elite\s+on\s+gpt-realtime-mini\s", table)
    assert re.search(r"pro\s+off\s+gpt-realtime-2\s", table)  # the environment default
    report = json.loads(run("voice_health", "--json"))
    assert report["ok"] is True and report["checks"]["models"]["status"] == "warn"
    with pytest.raises(CommandError, match="models"):
        run("voice_health", "--strict")
    settings.VOICE_PRICES = {k: v for k, v in settings.VOICE_PRICES.items() if k != "gpt-realtime-mini"}
    with pytest.raises(CommandError, match="models"):
        run("voice_health")


def test_health_fails_when_redis_or_upstream_is_down_without_leaking_secrets(settings):
    settings.RAG_BACKEND = "off"
    settings.REDIS_URL = "redis://:hunter2-secret@127.0.0.1:1/15"
    out = StringIO()
    with pytest.raises(CommandError, match="redis"):
        call_command("voice_health", stdout=out, stderr=StringIO())
    assert "hunter2-secret" not in out.getvalue()
    settings.REDIS_URL = "redis://127.0.0.1:6379/15"
    settings.VOICE_UPSTREAM = "openai"
    settings.OPENAI_API_KEY = "sk-test-not-printed-0123456789"
    settings.OPENAI_REALTIME_URL = "wss://127.0.0.1:1/v1/realtime"
    out = StringIO()
    with pytest.raises(CommandError, match="upstream"):
        call_command("voice_health", stdout=out, stderr=StringIO())
    assert "sk-test" not in out.getvalue()
