"""Issue 2: settings, plans, rollout bucketing, beta list, kill switch, health, masking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.admin.models import LogEntry
from django.test import AsyncClient

from tests.conftest import unique_user
from voice.logging import mask_url_password, redact
from voice.models import BetaUser, Cohort, PlanAccess, VoiceRollout
from voice.services import state as state_module
from voice.services.rollout import (
    rollout_bucket,
    rollout_cohort,
    rollout_read,
    rollout_update,
)
from voice.services.users import user_for_identity

ROOT = Path(__file__).resolve().parent.parent


def _settings_in_subprocess(env: dict[str, str], expr: str) -> object:
    code = (
        "import os, json; os.environ['DJANGO_SETTINGS_MODULE']='intelia_voice.settings'\n"
        "from django.conf import settings\n"
        f"print(json.dumps({expr}, default=str))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_settings_defaults_from_environment() -> None:
    values = _settings_in_subprocess(
        {},
        "[settings.DATABASES['default']['ENGINE'], settings.REDIS_URL, settings.REDIS_ENABLED,"
        " settings.RETRY_BACKOFF_FACTOR, settings.RETRY_MAX_ATTEMPTS, settings.ENABLE_VOICE_REALTIME,"
        " settings.OPENAI_REALTIME_URL, settings.OPENAI_REALTIME_MODEL, settings.VOICE_UPSTREAM,"
        " settings.MAX_SESSION_DURATION, settings.MAX_SESSIONS_PER_USER_PER_HOUR, settings.SESSION_TTL,"
        " settings.JWT_SIGNING_KEY == settings.SECRET_KEY, settings.DATABASES['default']['CONN_MAX_AGE']]",
    )
    assert values == [
        "django.db.backends.sqlite3", "redis://127.0.0.1:6379/0", True, 2.0, 3, False,
        "wss://api.openai.com/v1/realtime", "gpt-realtime", "local", 600, 5, 3600, True, 0,
    ]


def test_settings_postgres_url_and_openai_upstream_default() -> None:
    values = _settings_in_subprocess(
        {"DATABASE_URL": "postgres://voice:pw@db.example:5432/voice", "OPENAI_API_KEY": "sk-test-123456789",
         "MAX_SESSION_DURATION": "120", "REDIS_ENABLED": "false"},
        "[settings.DATABASES['default']['ENGINE'], settings.DATABASES['default']['NAME'],"
        " settings.VOICE_UPSTREAM, settings.MAX_SESSION_DURATION,"
        " settings.CHANNEL_LAYERS['default']['BACKEND']]",
    )
    assert values == [
        "django.db.backends.postgresql", "voice", "openai", 120, "channels.layers.InMemoryChannelLayer",
    ]


@pytest.mark.django_db
def test_plans_are_seeded() -> None:
    plans = {p.code: p.voice_enabled for p in PlanAccess.objects.all()}
    assert plans == {"essential": False, "pro": False, "elite": True, "intelia": True}
    rollout = VoiceRollout.objects.get(pk=1)
    assert rollout.voice_enabled is True and rollout.percentage == 0
    assert not BetaUser.objects.exists()


def test_rollout_bucket_is_deterministic_and_uniform() -> None:
    ids = [f"user-{i}" for i in range(10_000)]
    first = [rollout_bucket(i) for i in ids]
    assert first == [rollout_bucket(i) for i in ids]  # same user → same answer, any instance
    for percentage in (10, 50, 90):
        admitted = sum(1 for b in first if b < percentage)
        assert abs(admitted - percentage * 100) < 250, (percentage, admitted)


@pytest.mark.django_db
def test_percentage_beta_and_everyone_cohorts() -> None:
    user = user_for_identity(external_id=unique_user("beta"))
    outsider = next(f"out-{i}" for i in range(1000) if rollout_bucket(f"out-{i}") >= 10)
    insider = next(f"in-{i}" for i in range(1000) if rollout_bucket(f"in-{i}") < 10)
    rollout_update(actor_id=None, percentage=10)
    snapshot = rollout_read()
    assert rollout_cohort(snapshot, user_pk=None, external_user_id=outsider) is None
    assert rollout_cohort(snapshot, user_pk=None, external_user_id=insider) == Cohort.PERCENTAGE
    BetaUser.objects.create(rollout=VoiceRollout.objects.get(pk=1), user_id=user.pk)
    snapshot = rollout_read()
    assert rollout_cohort(snapshot, user_pk=user.pk, external_user_id=outsider) == Cohort.BETA
    rollout_update(actor_id=None, percentage=100)
    assert rollout_cohort(rollout_read(), user_pk=None, external_user_id=outsider) == Cohort.EVERYONE


@pytest.mark.django_db
def test_kill_switch_is_audited() -> None:
    rollout_update(actor_id=None, voice_enabled=False)
    assert rollout_read().voice_enabled is False
    rollout_update(actor_id=None, voice_enabled=True, percentage=25)
    messages = list(LogEntry.objects.order_by("pk").values_list("change_message", flat=True))
    assert messages == ["kill switch engaged", "kill switch released; percentage 25%"]
    with pytest.raises(ValueError):
        rollout_update(actor_id=None, percentage=101)


def test_password_masking_and_redaction() -> None:
    assert mask_url_password("redis://:s3cret@redis.internal:6379/0") == "redis://:***@redis.internal:6379/0"
    assert mask_url_password("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    assert mask_url_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    line = 'GET /v1/ws/voice?token=eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyX2lkIjoiMSJ9.c2lnbmF0dXJl&resume=abc HTTP/1.1'
    cleaned = redact(line + " key sk-abcdefghijklmnop Authorization: Bearer abc.def.ghi")
    assert "eyJ" not in cleaned and "sk-abcdefghijklmnop" not in cleaned and "abc.def.ghi" not in cleaned
    assert "resume=abc" not in cleaned


async def _health(client: AsyncClient) -> dict:
    response = await client.get("/v1/voice/health")
    assert response.status_code == 200
    return response.json()


@pytest.mark.django_db
async def test_health_healthy_with_real_redis(own_redis, settings) -> None:
    settings.REDIS_URL = own_redis.url
    state_module.reset_states()
    body = await _health(AsyncClient())
    assert body["status"] == "healthy"
    assert body["feature_enabled"] is True
    redis = body["redis"]
    assert redis["redis_available"] is True and redis["using_fallback"] is False
    assert redis["redis_version"] and redis["connected_clients"] >= 1 and redis["used_memory_human"]


@pytest.mark.django_db
async def test_health_degraded_when_redis_unreachable_then_recovers(own_redis, settings) -> None:
    settings.REDIS_URL = own_redis.url
    settings.REDIS_PROBE_INTERVAL = 0.2
    state_module.reset_states()
    client = AsyncClient()
    assert (await _health(client))["status"] == "healthy"
    own_redis.stop()
    body = await _health(client)
    assert body["status"] == "degraded"
    assert body["redis"]["redis_available"] is False and body["redis"]["using_fallback"] is True
    own_redis.start()
    import asyncio

    for _ in range(50):
        await asyncio.sleep(0.1)
        if not state_module.get_state().using_fallback:
            break
    assert (await _health(client))["status"] == "healthy"


@pytest.mark.django_db
async def test_health_disabled_and_secrets_masked(settings) -> None:
    settings.ENABLE_VOICE_REALTIME = False
    settings.REDIS_URL = "redis://:topsecret@127.0.0.1:1/0"
    settings.OPENAI_API_KEY = "sk-live-abcdefghijklmnop"
    state_module.reset_states()
    response = await AsyncClient().get("/v1/voice/health")
    body = response.json()
    assert body["status"] == "disabled"
    assert body["openai_configured"] is True
    assert body["redis"]["redis_url"] == "redis://:***@127.0.0.1:1/0"
    assert "topsecret" not in response.content.decode() and "sk-live" not in response.content.decode()


@pytest.mark.django_db
def test_profile_lookup_matches_the_orm() -> None:
    """The access decision's precompiled lookup returns exactly what the ORM would."""
    from decimal import Decimal

    from django.utils import timezone

    from voice.models import VoiceProfile
    from voice.services.users import _PROFILE_FIELDS, _profile_row, user_for_identity

    user = user_for_identity(external_id="lookup-user", email="a@example.com")
    VoiceProfile.objects.filter(user_id=user.pk).update(
        plan=PlanAccess.objects.get(code="intelia"), monthly_budget_usd=Decimal("12.50"),
        last_seen_at=timezone.now())
    orm = VoiceProfile.objects.filter(external_id="lookup-user").values(*_PROFILE_FIELDS).first()
    raw = _profile_row("lookup-user")
    assert raw["last_seen_at"] == orm["last_seen_at"]
    assert Decimal(str(raw["monthly_budget_usd"])) == orm["monthly_budget_usd"]
    assert {k: v for k, v in raw.items() if k not in ("last_seen_at", "monthly_budget_usd")} == {
        k: v for k, v in orm.items() if k not in ("last_seen_at", "monthly_budget_usd")}
    again = user_for_identity(external_id="lookup-user")
    assert (again.plan_code, again.monthly_budget_usd, again.is_staff) == ("intelia", 12.5, False)
    assert _profile_row("nobody") is None


@pytest.mark.django_db
def test_first_connection_creates_user_and_profile_from_claims() -> None:
    from voice.models import VoiceProfile
    from voice.services.users import user_for_identity

    user = user_for_identity(external_id="jwt-42", email="eleveur@example.fr", plan="elite")
    profile = VoiceProfile.objects.select_related("user", "plan").get(external_id="jwt-42")
    assert profile.user.username == "jwt-42" and profile.user_id == user.pk
    assert profile.email == "eleveur@example.fr" and profile.plan.code == "elite"
    assert user.plan_code == "elite"
