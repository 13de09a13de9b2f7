"""Admin: plans, the rollout singleton (through the services), profiles, read-only sessions, dashboard."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.utils import timezone

from tests.test_ops_seed import seed_dataset
from voice.models import BetaUser, PlanAccess, VoiceProfile, VoiceRollout, VoiceSession
from voice.services.users import plan_policies

pytestmark = pytest.mark.django_db




def test_plan_list_has_spend_and_editable_columns(admin_client):
    seed_dataset(now=timezone.now())
    response = admin_client.get("/admin/voice/planaccess/")
    assert response.status_code == 200
    content = response.content.decode()
    assert "spend this month" in content.lower()
    for field in ("voice_enabled", "sessions_per_hour", "max_session_seconds", "monthly_budget_usd",
                  "active_subscribers"):
        assert f'name="form-0-{field}"' in content


def test_plan_list_editable_save_clears_the_plan_cache(admin_client):
    plans = list(PlanAccess.objects.order_by("code"))
    assert plan_policies()["elite"].sessions_per_hour  # cached now
    data = {"form-TOTAL_FORMS": str(len(plans)), "form-INITIAL_FORMS": str(len(plans)), "_save": "Save"}
    for i, plan in enumerate(plans):
        data[f"form-{i}-id"] = str(plan.pk)
        data[f"form-{i}-voice_enabled"] = "on" if plan.voice_enabled else ""
        data[f"form-{i}-sessions_per_hour"] = "2" if plan.code == "elite" else ""
        data[f"form-{i}-max_session_seconds"] = ""
        data[f"form-{i}-monthly_budget_usd"] = "25.00" if plan.code == "elite" else ""
        data[f"form-{i}-active_subscribers"] = "300" if plan.code == "elite" else ""
        if not plan.voice_enabled:
            data.pop(f"form-{i}-voice_enabled")
    response = admin_client.post("/admin/voice/planaccess/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    elite = PlanAccess.objects.get(code="elite")
    assert elite.sessions_per_hour == 2
    assert (elite.monthly_budget_usd, elite.active_subscribers) == (Decimal(25), 300)
    assert plan_policies()["elite"].sessions_per_hour == 2  # cache cleared by save_model
    assert LogEntry.objects.filter(object_id=str(elite.pk)).exists()


def _rollout_form(voice_enabled: bool, percentage: int, beta: list[tuple[int, str]] = ()) -> dict:
    data = {"percentage": str(percentage), "beta_users-TOTAL_FORMS": str(len(beta)),
            "beta_users-INITIAL_FORMS": "0", "beta_users-MIN_NUM_FORMS": "0",
            "beta_users-MAX_NUM_FORMS": "1000", "_save": "Save"}
    if voice_enabled:
        data["voice_enabled"] = "on"
    for i, (user_pk, note) in enumerate(beta):
        data[f"beta_users-{i}-user"] = str(user_pk)
        data[f"beta_users-{i}-note"] = note
    return data


def test_rollout_is_a_singleton(admin_client):
    VoiceRollout.objects.get_or_create(pk=1)
    response = admin_client.get("/admin/voice/voicerollout/")
    assert response.status_code == 302
    assert response["Location"].endswith("/admin/voice/voicerollout/1/change/")
    assert admin_client.get("/admin/voice/voicerollout/add/").status_code == 403
    assert admin_client.get("/admin/voice/voicerollout/1/delete/").status_code == 403
    page = admin_client.get("/admin/voice/voicerollout/1/change/")
    assert page.status_code == 200
    assert "Rollout KPI gate" in page.content.decode()


def test_rollout_kill_switch_via_admin_broadcasts_and_audits(admin_client, sent):
    VoiceRollout.objects.update_or_create(pk=1, defaults={"voice_enabled": True, "percentage": 10})
    beta = get_user_model().objects.create(username="beta-person")
    response = admin_client.post("/admin/voice/voicerollout/1/change/",
                                 _rollout_form(False, 50, [(beta.pk, "pilot farm")]))
    assert response.status_code == 302, response.content.decode()[:3000]
    rollout = VoiceRollout.objects.get(pk=1)
    assert (rollout.voice_enabled, rollout.percentage) == (False, 50)
    assert sent == [{"code": "feature_disabled", "session_id": None}]
    assert BetaUser.objects.filter(user=beta, note="pilot farm").exists()
    messages = list(LogEntry.objects.filter(object_id="1").values_list("change_message", flat=True))
    assert any("kill switch engaged" in m for m in messages)
    assert VoiceRollout.objects.count() == 1


def test_profile_admin_search_and_beta_actions(admin_client):
    user = get_user_model().objects.create(username="farmer")
    profile = VoiceProfile.objects.create(user=user, external_id="ext-farmer-42", email="farmer@example.com")
    listing = admin_client.get("/admin/voice/voiceprofile/?q=ext-farmer")
    assert listing.status_code == 200 and "ext-farmer-42" in listing.content.decode()
    assert "spend this month" in listing.content.decode().lower()
    assert "ext-farmer-42" in admin_client.get("/admin/voice/voiceprofile/?q=farmer@example").content.decode()
    response = admin_client.post("/admin/voice/voiceprofile/",
                                 {"action": "add_to_beta", "_selected_action": [profile.pk]})
    assert response.status_code == 302
    assert BetaUser.objects.filter(user=user).exists()
    assert LogEntry.objects.filter(change_message="beta list: added farmer").exists()
    admin_client.post("/admin/voice/voiceprofile/",
                      {"action": "remove_from_beta", "_selected_action": [profile.pk]})
    assert not BetaUser.objects.filter(user=user).exists()


def test_sessions_are_read_only_with_filters_search_and_turns(admin_client):
    rows = seed_dataset(now=timezone.now())
    base = "/admin/voice/voicesession/"
    assert admin_client.get(base).status_code == 200
    for query in ("?plan=elite", "?end_reason__exact=timeout", "?upstream=local", "?cohort__exact=beta",
                  "?started_at__gte=2020-01-01+00:00:00%2B00:00", "?q=u3"):
        response = admin_client.get(base + query)
        assert response.status_code == 200, query
    assert str(rows["s3"].id) in admin_client.get(base + "?q=u3").content.decode()
    detail = admin_client.get(f"{base}{rows['s1'].id}/change/")
    assert detail.status_code == 200
    assert "first audio" in detail.content.decode().lower()
    assert admin_client.get(base + "add/").status_code == 403
    assert admin_client.post(f"{base}{rows['s1'].id}/delete/", {"post": "yes"}).status_code == 403
    assert admin_client.post(f"{base}{rows['s1'].id}/change/", {}).status_code == 403
    assert VoiceSession.objects.filter(pk=rows["s1"].id).exists()


def test_terminate_action_targets_live_sessions(admin_client, sent, monkeypatch):
    rows = seed_dataset(now=timezone.now())
    monkeypatch.setattr("voice.admin.live_session_ids_sync", lambda: [str(rows["s2"].id)])
    selected = [rows["s2"].id, rows["s4"].id, rows["s3"].id]  # s2 live, s4 open, s3 ended
    data = {"action": "terminate_sessions", "_selected_action": [str(i) for i in selected]}
    response = admin_client.post("/admin/voice/voicesession/", data)
    assert response.status_code == 302
    assert sorted(call["session_id"] for call in sent) == sorted([str(rows["s2"].id), str(rows["s4"].id)])
    assert all(call["code"] == "terminated" for call in sent)


def test_refusals_are_read_only(admin_client):
    seed_dataset(now=timezone.now())
    response = admin_client.get("/admin/voice/accessrefusal/?code=rate_limited")
    assert response.status_code == 200 and "rate_limited" in response.content.decode()
    assert admin_client.get("/admin/voice/accessrefusal/add/").status_code == 403


def test_dashboard_charts_gate_and_live_sessions(admin_client, monkeypatch):
    rows = seed_dataset(now=timezone.now())
    ghost = str(uuid.uuid4())  # live in Redis but no row yet
    monkeypatch.setattr("voice.admin.live_session_ids_sync", lambda: [str(rows["s4"].id), ghost])
    response = admin_client.get("/admin/voice/voicesession/dashboard/?days=30")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('role="img"') == 4 and "<rect" in html and "<polyline" in html
    assert "Rollout KPI gate" in html and "first_audio_p95_ms" in html
    assert "Live sessions (2)" in html and ghost in html and str(rows["s4"].id) in html
    assert 'name="csrfmiddlewaretoken"' in html and "Terminate" in html
    assert "<script" not in html.split('id="content-main"')[1]  # server-side SVG, no JS chart library
    assert admin_client.get("/admin/voice/voicesession/dashboard/?days=abc").status_code == 200
    assert "Voice dashboard" in admin_client.get("/admin/voice/").content.decode()
    assert "Dashboard" in admin_client.get("/admin/voice/voicesession/").content.decode()


def test_dashboard_terminate_is_post_only_and_staff_only(admin_client, client, sent, monkeypatch):
    session_id = str(uuid.uuid4())
    monkeypatch.setattr("voice.admin.live_session_ids_sync", lambda: [session_id])
    url = "/admin/voice/voicesession/dashboard/terminate/"
    assert admin_client.get(url).status_code == 405
    response = admin_client.post(url, {"session_id": session_id})
    assert response.status_code == 302 and response["Location"].endswith("/dashboard/")
    assert sent == [{"code": "terminated", "session_id": session_id}]
    admin_client.post(url, {"session_id": "not-live"})
    assert len(sent) == 1
    anonymous = client.post(url, {"session_id": session_id})
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]
    user = get_user_model().objects.create(username="not-staff")
    client.force_login(user)
    assert "/admin/login/" in client.get("/admin/voice/voicesession/dashboard/")["Location"]
    assert len(sent) == 1


def test_dashboard_requires_view_permission(client):
    staff = get_user_model().objects.create(username="staff-no-perms", is_staff=True)
    client.force_login(staff)
    assert client.get("/admin/voice/voicesession/dashboard/").status_code == 403
    terminate = client.post("/admin/voice/voicesession/dashboard/terminate/", {"session_id": "x"})
    assert terminate.status_code == 403
