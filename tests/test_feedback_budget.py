"""Issue 9 feedback (socket and HTTP, validation, ownership) and issue 6 budget refusal; cohort recorded."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.utils import timezone

from tests.conftest import unique_user
from tests.live import VoiceClient
from voice.models import PlanAccess, VoiceSession
from voice.services.access import budget_cache_clear
from voice.services.users import plan_cache_clear

pytestmark = pytest.mark.django_db(transaction=True)


async def _finished_session(gateway, token: str) -> tuple[VoiceClient, str]:
    client = await VoiceClient.open(gateway.ws_url, token=token)
    ready = await client.wait_for("gateway.session.ready")
    return client, ready["session_id"]


async def test_feedback_over_the_socket_validated_once(gateway, token_for) -> None:
    client, session_id = await _finished_session(gateway, token_for())
    for bad in ({"rating": 0}, {"rating": 6}, {"rating": "5"}, {"rating": 4, "comment": "x" * 1001}):
        await client.send({"type": "gateway.feedback", **bad})
        assert (await client.wait_for("gateway.error"))["code"] == "invalid_feedback"
    await client.send({"type": "gateway.feedback", "rating": 5, "comment": "Très utile"})
    assert (await client.wait_for("gateway.feedback.received"))["session_id"] == session_id
    await client.send({"type": "gateway.feedback", "rating": 1})
    error = await client.wait_for("gateway.error")
    assert error["code"] == "invalid_feedback" and "already" in error["message"]
    await client.close()
    row = await VoiceSession.objects.aget(pk=session_id)
    assert row.feedback_rating == 5 and row.feedback_comment == "Très utile"
    assert row.cohort == "everyone"  # admitted by the 100 % rollout


async def test_feedback_over_http_ownership_and_window(gateway, token_for) -> None:
    owner = unique_user("owner")
    client, session_id = await _finished_session(gateway, token_for(owner))
    await client.close()
    await asyncio.sleep(0.3)
    url = f"/v1/voice/sessions/{session_id}/feedback"
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        assert (await http.post(url, json={"rating": 4})).status_code == 401
        other = {"Authorization": f"Bearer {token_for()}"}
        assert (await http.post(url, json={"rating": 4}, headers=other)).status_code == 403
        mine = {"Authorization": f"Bearer {token_for(owner)}"}
        assert (await http.post(url, json={"rating": 9}, headers=mine)).status_code == 400
        assert (await http.post(url, content=b"not json", headers=mine)).status_code == 400
        response = await http.post(url, json={"rating": 4, "comment": "ok"}, headers=mine)
        assert response.status_code == 201
        assert (await http.post(url, json={"rating": 5}, headers=mine)).status_code == 409
        unknown = "/v1/voice/sessions/00000000-0000-0000-0000-000000000000/feedback"
        assert (await http.post(unknown, json={"rating": 4}, headers=mine)).status_code == 404
        # Older than 24 h: refused.
        client, late_id = await _finished_session(gateway, token_for(owner))
        await client.close()
        await asyncio.sleep(0.3)
        old = timezone.now() - timedelta(hours=25)
        await VoiceSession.objects.filter(pk=late_id).aupdate(started_at=old, ended_at=old)
        late = await http.post(f"/v1/voice/sessions/{late_id}/feedback", json={"rating": 3}, headers=mine)
        assert late.status_code == 400
    assert (await VoiceSession.objects.aget(pk=session_id)).feedback_rating == 4


async def test_budget_exhausted_refuses_new_sessions(gateway, token_for) -> None:
    user_id = unique_user("spender")
    client, session_id = await _finished_session(gateway, token_for(user_id, plan="intelia"))
    await client.close()
    await asyncio.sleep(0.3)
    await VoiceSession.objects.filter(pk=session_id).aupdate(cost_usd=Decimal("12.50"))
    await PlanAccess.objects.filter(code="intelia").aupdate(monthly_budget_usd=Decimal("10.00"))
    plan_cache_clear()
    budget_cache_clear()
    await asyncio.sleep(1.1)  # the gateway's plan cache
    refused = await VoiceClient.open(gateway.ws_url, token=token_for(plan="intelia"))
    error = await refused.wait_for("gateway.error")
    assert error["code"] == "budget_exhausted" and "budget" in error["message"].lower()
    assert await refused.wait_closed() == 4402
    # Other plans are unaffected.
    fine = await VoiceClient.open(gateway.ws_url, token=token_for(plan="elite"))
    await fine.wait_for("gateway.session.ready")
    await fine.close()
