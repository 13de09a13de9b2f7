"""Issue 18 (capacity v2): redial never refused, ended sessions freed without the cyclic collector."""

from __future__ import annotations

import time

import pytest

from tests.conftest import unique_user
from tests.live import VoiceClient

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def slow_end_write(monkeypatch):
    """The database write at session end takes 0.5 s (on the writer thread, like a slow database)."""
    from voice.services import sessions

    original = sessions.voice_session_end

    def slow(record):
        time.sleep(0.5)
        return original(record)

    monkeypatch.setattr(sessions, "voice_session_end", slow)


@pytest.fixture
def slow_upstream_close(monkeypatch):
    """Closing the upstream takes 0.5 s (a far-away server's close handshake)."""
    import asyncio

    from voice.realtime.engine.upstream import LocalUpstream

    original = LocalUpstream.close

    async def slow(self):
        await asyncio.sleep(0.5)
        await original(self)

    monkeypatch.setattr(LocalUpstream, "close", slow)


@pytest.mark.parametrize("slow", [None, "slow_end_write", "slow_upstream_close"])
async def test_a_user_who_redials_at_once_is_never_refused(gateway, token_for, settings, request, slow) -> None:
    """Close and reconnect at once, again and again: the slot is back before anything slow at session end."""
    settings.MAX_SESSIONS_PER_USER_PER_HOUR = 1000
    if slow:
        request.getfixturevalue(slow)
    user_id = unique_user("redial")
    codes = []
    for _ in range(15):
        client = await VoiceClient.open(gateway.ws_url, token=token_for(user_id))
        event = await client.next_event(30)
        while event["type"] not in ("gateway.session.ready", "gateway.error"):
            event = await client.next_event(30)
        codes.append(event.get("code", "ready"))
        await client.close()  # and at once the next connection: no pause for the server's end-of-session work
    assert codes == ["ready"] * 15
