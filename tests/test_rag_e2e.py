"""Issue 5 through the gateway: prefetch during speech, bounded wait, injection, stale context removal."""

from __future__ import annotations

import json

import pytest

from tests.conftest import AUDIO, needs_audio
from tests.live import LiveServer, VoiceClient, read_wav
from voice.models import VoiceSession, VoiceTurn

pytestmark = [pytest.mark.django_db(transaction=True), needs_audio]

QUESTION = "What is the ideal brooding temperature for day old chicks during the first week?"
SECOND = "How much water should a broiler drink per day at four weeks of age?"


@pytest.fixture
def scripted(settings, tmp_path):
    """The local engine 'hears' the manifest transcripts, word by word while the user speaks."""
    script = tmp_path / "script.json"
    script.write_text(json.dumps([QUESTION, SECOND]))
    settings.LOCAL_ENGINE_SCRIPT = str(script)
    settings.RAG_LOCAL_INDEX = str(tmp_path / "knowledge.sqlite3")
    from voice.rag import reset_retrievers

    reset_retrievers()
    yield
    reset_retrievers()


async def _spoken_turn(client: VoiceClient, wav: str) -> dict:
    await client.stream_pcm(read_wav(AUDIO / wav), pace=0.01)
    context = await client.wait_for("gateway.rag.context", timeout=15)
    await client.wait_for("response.done", timeout=20)
    return context


async def test_prefetch_during_speech_injects_before_response_and_deletes_stale(
    live_db, scripted, token_for, engine_spy
) -> None:
    server = LiveServer().start()
    try:
        client = await VoiceClient.open(server.ws_url, token=token_for())
        ready = await client.wait_for("gateway.session.ready")
        context = await _spoken_turn(client, "en_brooding_temperature.wav")
        assert context["injected"] is True and context["sources"]
        assert "brooding" in context["sources"][0]["title"].lower() or "temperature" in \
            context["sources"][0]["title"].lower()
        # Early transcript deltas arrived before the end of speech, and the query started on the 5th word.
        kinds = [e["type"] for e in client.events]
        first_delta = kinds.index("conversation.item.input_audio_transcription.delta")
        assert first_delta < kinds.index("input_audio_buffer.speech_stopped")
        committed = client.seen("input_audio_buffer.committed")[0]["item_id"]
        sent = [e["type"] for e in engine_spy]
        inject = next(i for i, e in enumerate(engine_spy)
                      if e["type"] == "conversation.item.create" and e["item"]["role"] == "system"
                      and e["item"]["id"].startswith("ctx_") and "history" not in e["item"]["id"])
        assert engine_spy[inject]["previous_item_id"] == committed
        assert inject < sent.index("response.create")
        first_context_id = engine_spy[inject]["item"]["id"]
        # The injected item is the gateway's business: the client never sees it.
        assert not [e for e in client.events if (e.get("item") or {}).get("id") == first_context_id]

        await _spoken_turn(client, "en_broiler_water.wav")
        deletes = [i for i, e in enumerate(engine_spy)
                   if e["type"] == "conversation.item.delete" and e["item_id"] == first_context_id]
        second_create = [i for i, e in enumerate(engine_spy) if e["type"] == "response.create"][1]
        assert deletes and deletes[0] < second_create
        await client.close()
        import asyncio

        await asyncio.sleep(0.5)
        turns = [t async for t in VoiceTurn.objects.filter(session_id=ready["session_id"]).order_by("index")]
        assert len(turns) == 2
        speech_ms = turns[0].speech_ms
        assert turns[0].retrieval_used and turns[0].rag_injected
        assert turns[0].retrieval_started_ms is not None and turns[0].retrieval_started_ms < speech_ms
        assert turns[0].retrieval_waited_ms is not None and turns[0].retrieval_waited_ms <= 250
        assert turns[0].first_audio_ms is not None
    finally:
        server.stop()


async def test_slow_retrieval_never_waits_longer_than_the_bound(live_db, scripted, settings, token_for):
    settings.RAG_LOCAL_DELAY_MS = 3000
    settings.RAG_WAIT_TIMEOUT_MS = 200
    server = LiveServer().start()
    try:
        client = await VoiceClient.open(server.ws_url, token=token_for())
        ready = await client.wait_for("gateway.session.ready")
        context = await _spoken_turn(client, "fr_brooding_temperature.wav")
        assert context["injected"] is False
        await client.close()
        import asyncio

        await asyncio.sleep(0.5)
        turn = await VoiceTurn.objects.aget(session_id=ready["session_id"], index=0)
        assert turn.retrieval_used and not turn.rag_injected
        assert turn.retrieval_waited_ms is not None and turn.retrieval_waited_ms <= 200 + 30
    finally:
        server.stop()


async def test_weaviate_unreachable_turns_still_answered(live_db, settings, token_for) -> None:
    settings.RAG_BACKEND = "weaviate"
    settings.WEAVIATE_URL = "http://127.0.0.1:1"
    from voice.rag import reset_retrievers

    reset_retrievers()
    server = LiveServer().start()
    try:
        client = await VoiceClient.open(server.ws_url, token=token_for())
        await client.wait_for("gateway.session.ready")
        await client.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}})
        await client.send({"type": "response.create"})
        done = await client.wait_for("response.done", timeout=15)
        assert done["response"]["status"] == "completed"
        assert not client.seen("gateway.error")
        await client.close()
    finally:
        server.stop()
        reset_retrievers()


async def test_parallel_transcription_session_starts_retrieval_during_speech(live_db, scripted, settings,
                                                                              token_for) -> None:
    """OpenAI-like: the conversation session transcribes only after commit; the transcription-only
    session (EARLY_TRANSCRIPTION=openai, committed in slices while the user speaks) feeds the prefetch."""
    settings.LOCAL_ENGINE_PARTIAL_TRANSCRIPTS = False
    settings.EARLY_TRANSCRIPTION = "openai"
    settings.EARLY_TRANSCRIPTION_SLICE_MS = 500
    server = LiveServer().start()
    try:
        client = await VoiceClient.open(server.ws_url, token=token_for())
        ready = await client.wait_for("gateway.session.ready")
        context = await _spoken_turn(client, "en_brooding_temperature.wav")
        kinds = [e["type"] for e in client.events]
        stopped = kinds.index("input_audio_buffer.speech_stopped")
        assert "conversation.item.input_audio_transcription.delta" not in kinds[:stopped]  # OpenAI-like
        assert context["injected"] is True
        await client.close()
        import asyncio

        await asyncio.sleep(0.5)
        turn = await VoiceTurn.objects.aget(session_id=ready["session_id"], index=0)
        assert turn.retrieval_started_ms is not None and turn.retrieval_started_ms < turn.speech_ms
    finally:
        server.stop()


@pytest.mark.parametrize(("mode", "transcription_model", "sockets"), [
    ("inline", "gpt-realtime-whisper", 1),  # the conversation session's own deltas during speech
    ("openai", "gpt-4o-transcribe", 2),  # OpenAI-like late transcripts + the transcription-only session
])
async def test_early_transcription_over_real_sockets(live_db, scripted, settings, token_for, monkeypatch,
                                                     mode, transcription_model, sockets) -> None:
    """Both early-transcription paths against the engine's WebSocket server as the "openai" upstream: the
    prefetch starts before the end of speech, the turn end waits at most RAG_WAIT_TIMEOUT_MS, and inline
    needs one upstream socket per session where openai needs two."""
    import asyncio

    from voice.realtime.engine import server as engine_server

    paths: list[str] = []
    accept = engine_server._accept

    def counting(engine, request):
        paths.append(request.path.decode())
        return accept(engine, request)

    monkeypatch.setattr(engine_server, "_accept", counting)
    settings.EARLY_TRANSCRIPTION = "auto" if mode == "inline" else mode  # auto picks inline for this model
    settings.EARLY_TRANSCRIPTION_SLICE_MS = 500
    settings.VOICE_TRANSCRIPTION_MODEL = transcription_model
    engine = engine_server.EngineServerThread().start()
    settings.VOICE_UPSTREAM, settings.OPENAI_REALTIME_URL = "openai", engine.url
    settings.OPENAI_API_KEY = "local-engine-key"
    server = LiveServer().start()
    try:
        client = await VoiceClient.open(server.ws_url, token=token_for())
        ready = await client.wait_for("gateway.session.ready")
        assert ready["upstream"] == "openai"
        context = await _spoken_turn(client, "en_brooding_temperature.wav")
        assert context["injected"] is True
        kinds = [e["type"] for e in client.events]
        early_deltas = "conversation.item.input_audio_transcription.delta" in kinds[
            :kinds.index("input_audio_buffer.speech_stopped")]
        assert early_deltas is (mode == "inline")
        await client.close()
        await asyncio.sleep(0.5)
        turn = await VoiceTurn.objects.aget(session_id=ready["session_id"], index=0)
        assert turn.retrieval_started_ms is not None and turn.retrieval_started_ms < turn.speech_ms
        assert turn.retrieval_waited_ms is not None and turn.retrieval_waited_ms <= settings.RAG_WAIT_TIMEOUT_MS
        # Cost: the response and the conversation's own transcription; "openai" also pays its slices.
        from voice.realtime.accounting import cost_from_usage, transcription_cost

        one_session = sum(cost_from_usage(e["response"]["usage"], settings.OPENAI_REALTIME_MODEL)
                          for e in client.seen("response.done")) + sum(
            transcription_cost(e["usage"], transcription_model)
            for e in client.seen("conversation.item.input_audio_transcription.completed"))
        for _ in range(100):  # the end record is written after the socket closes
            row = await VoiceSession.objects.filter(pk=ready["session_id"], ended_at__isnull=False).afirst()
            if row is not None:
                break
            await asyncio.sleep(0.1)
        assert row is not None
        if mode == "inline":
            assert float(row.cost_usd) == pytest.approx(one_session, abs=1e-6)
        else:
            assert float(row.cost_usd) > one_session + 1e-6
    finally:
        server.stop()
        engine.stop()
    assert len(paths) == sockets, paths
    assert ["intent=transcription" in path for path in paths] == [False, True][:sockets]
