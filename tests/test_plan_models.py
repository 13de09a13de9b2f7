"""Models per plan (issue 17): the plan's realtime model, transcription model, voice and VAD reach the
session; cost uses that model's price row; a model without a price row is refused, never priced as another."""

from __future__ import annotations

import asyncio
import time
from io import StringIO

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.conftest import seed_plans
from tests.live import LiveServer, VoiceClient
from voice.models import PlanAccess, VoiceSession
from voice.realtime.accounting import cost_from_usage
from voice.realtime.models_catalog import UnpricedModel, early_transcription_mode, shutdown_warning
from voice.realtime.profile import RealtimeProfile
from voice.realtime.session_config import session_update_event
from voice.services.plans import plan_update
from voice.services.users import plan_policies

USAGE = {"input_token_details": {"text_tokens": 1000, "audio_tokens": 500},
         "output_token_details": {"text_tokens": 200, "audio_tokens": 3000}}


def _change_form(plan: PlanAccess, **changes: str) -> dict[str, str]:
    data = {"code": plan.code, "name": plan.name, "sessions_per_hour": "", "max_session_seconds": "",
            "monthly_budget_usd": "", "active_subscribers": "", "realtime_model": plan.realtime_model,
            "transcription_model": plan.transcription_model, "voice": plan.voice, "vad_type": plan.vad_type,
            "vad_eagerness": plan.vad_eagerness, "_save": "Save"}
    if plan.voice_enabled:
        data["voice_enabled"] = "on"
    data.update(changes)
    return data


async def _text_turn(url: str, token: str) -> tuple[str, dict]:
    client = await VoiceClient.open(url, token=token)
    ready = await client.wait_for("gateway.session.ready")
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Water per broiler?"}]}})
    await client.send({"type": "response.create"})
    done = await client.wait_for("response.done", timeout=20)
    await client.close()
    return ready["session_id"], done


@pytest.mark.django_db(transaction=True)
def test_plan_switched_in_the_admin_sets_the_next_sessions_model_and_its_price(live_db, admin_client, token_for,
                                                                               engine_spy):
    elite = PlanAccess.objects.get(code="elite")
    url = f"/admin/voice/planaccess/{elite.pk}/change/"
    refused = admin_client.post(url, _change_form(elite, realtime_model="gpt-9-realtime"))
    assert refused.status_code == 200 and "has no price row" in refused.content.decode()
    assert PlanAccess.objects.get(code="elite").realtime_model == ""

    response = admin_client.post(url, _change_form(elite, realtime_model="gpt-realtime-mini"))
    assert response.status_code == 302, response.content.decode()[:2000]
    assert plan_policies()["elite"].realtime.model == "gpt-realtime-mini"

    server = LiveServer().start()
    try:
        session_id, done = asyncio.run(_text_turn(server.ws_url, token_for(plan="elite")))
    finally:
        server.stop()
    update = next(e for e in engine_spy if e["type"] == "session.update")
    assert update["session"]["model"] == "gpt-realtime-mini"
    usage = done["response"]["usage"]
    expected = cost_from_usage(usage, "gpt-realtime-mini")
    assert 0 < expected < cost_from_usage(usage, "gpt-realtime")
    deadline = time.monotonic() + 10
    row = None
    while time.monotonic() < deadline:  # the end record is written after the socket closes
        row = VoiceSession.objects.filter(pk=session_id, ended_at__isnull=False).first()
        if row is not None:
            break
        time.sleep(0.1)
    assert row is not None and row.model == "local:gpt-realtime-mini"
    assert float(row.cost_usd) == pytest.approx(expected, abs=1e-6)


@pytest.mark.django_db
def test_unpriced_models_are_refused_on_save_and_by_the_command():
    with pytest.raises(ValidationError, match="no price row"):
        plan_update(code="elite", actor_id=None, realtime_model="gpt-4-turbo-realtime")
    with pytest.raises(CommandError, match="no price row"):
        call_command("voice_plans", "--set", "elite", "--transcription-model", "nope-transcribe", stdout=StringIO())
    out = StringIO()
    call_command("voice_plans", "--set", "elite", "--model", "gpt-realtime-2", "--vad", "semantic_vad",
                 "--eagerness", "low", "--voice-name", "cedar", stdout=out)
    assert "realtime_model=gpt-realtime-2" in out.getvalue()
    profile = plan_policies()["elite"].realtime
    assert (profile.model, profile.vad_type, profile.vad_eagerness, profile.voice) == (
        "gpt-realtime-2", "semantic_vad", "low", "cedar")
    call_command("voice_plans", "--set", "elite", "--model", "default", stdout=StringIO())
    assert PlanAccess.objects.get(code="elite").realtime_model == ""


def test_cost_never_falls_back_to_another_models_row():
    with pytest.raises(UnpricedModel):
        cost_from_usage(USAGE, "gpt-imaginary-realtime")
    assert cost_from_usage(USAGE, "gpt-realtime-2") > cost_from_usage(USAGE, "gpt-realtime")  # text out $24


def test_start_up_check_refuses_an_unpriced_default_model(settings):
    assert not [e for e in run_checks() if e.id == "voice.E001"]
    settings.OPENAI_REALTIME_MODEL = "gpt-imaginary-realtime"
    settings.VOICE_TRANSCRIPTION_MODEL = "imaginary-transcribe"
    errors = [e for e in run_checks() if e.id == "voice.E001"]
    assert len(errors) == 2 and "no price row" in errors[0].msg


@pytest.mark.django_db
def test_database_check_names_a_plan_whose_price_row_was_removed(settings):
    seed_plans()
    PlanAccess.objects.filter(code="pro").update(realtime_model="gpt-realtime-2")
    settings.VOICE_PRICES = {k: v for k, v in settings.VOICE_PRICES.items() if k != "gpt-realtime-2"}
    errors = [e for e in run_checks(databases=["default"]) if e.id == "voice.E002"]
    assert len(errors) == 1 and "plan pro" in errors[0].msg


def test_session_update_carries_the_profiles_choices(settings):
    settings.VOICE_TRANSCRIPTION_DELAY = "low"
    profile = RealtimeProfile.resolve(model="gpt-realtime-2", transcription_model="gpt-realtime-whisper",
                                      voice="cedar", vad_type="semantic_vad", vad_eagerness="high")
    session = session_update_event(profile)["session"]
    assert session["model"] == "gpt-realtime-2" and session["audio"]["output"]["voice"] == "cedar"
    assert session["audio"]["input"]["transcription"] == {"model": "gpt-realtime-whisper", "delay": "low"}
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad", "eagerness": "high", "create_response": False, "interrupt_response": True}
    legacy = session_update_event(RealtimeProfile.resolve(transcription_model="gpt-4o-transcribe"))["session"]
    assert legacy["audio"]["input"]["transcription"] == {"model": "gpt-4o-transcribe"}  # no delay knob
    assert legacy["audio"]["input"]["turn_detection"]["type"] == "server_vad"


def test_early_transcription_mode_follows_the_transcription_model(settings):
    settings.EARLY_TRANSCRIPTION = "auto"
    assert early_transcription_mode("gpt-realtime-whisper") == "inline"
    assert early_transcription_mode("gpt-4o-transcribe") == "off"
    settings.EARLY_TRANSCRIPTION = "openai"
    assert early_transcription_mode("gpt-realtime-whisper") == "openai"


def test_shutdown_warning_within_sixty_days():
    import datetime as dt

    today = dt.date(2026, 12, 3)
    assert shutdown_warning("gpt-realtime", today) == "gpt-realtime shuts down on 2027-01-20 (48 days)"
    assert shutdown_warning("gpt-4o-transcribe", today) is None  # 2027-02-26: 85 days away
    assert "was shut down" in shutdown_warning("gpt-4o-transcribe", dt.date(2027, 3, 1))
    assert shutdown_warning("gpt-realtime-2", today) is None


def test_input_transcription_is_priced_at_its_own_row():
    from voice.realtime.accounting import SessionStats, transcription_cost

    tokens = {"type": "tokens", "input_tokens": 100, "output_tokens": 20,
              "input_token_details": {"audio_tokens": 100, "text_tokens": 0}}
    assert transcription_cost(tokens, "gpt-4o-mini-transcribe") == pytest.approx((100 * 3.00 + 20 * 5.00) / 1e6)
    assert transcription_cost({"type": "duration", "seconds": 30}, "whisper-1") == pytest.approx(0.003)
    with pytest.raises(UnpricedModel):
        transcription_cost(tokens, "imaginary-transcribe")
    stats = SessionStats()
    stats.add_transcription(tokens, "gpt-4o-transcribe")
    assert stats.cost_usd == pytest.approx((100 * 6.00 + 20 * 10.00) / 1e6)


def test_inline_without_a_streaming_model_warns_at_start_up(settings):
    settings.EARLY_TRANSCRIPTION = "inline"
    assert not [e for e in run_checks() if e.id == "voice.W001"]
    settings.VOICE_TRANSCRIPTION_MODEL = "gpt-4o-transcribe"
    assert [e for e in run_checks() if e.id == "voice.W001"]
