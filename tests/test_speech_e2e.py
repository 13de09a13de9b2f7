"""Issue 16 acceptance through the gateway: the manifest's English questions, spoken into /v1/ws/voice,
recognised by the local engine while they are spoken, with the knowledge prefetched before speech ends."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import AUDIO, needs_audio
from tests.live import LiveServer, VoiceClient, read_wav
from tests.test_speech import ENGLISH, needs_speech, worker_ready
from voice.models import VoiceTurn
from voice.realtime.engine.stt.service import get_service, stop_services
from voice.realtime.engine.stt.wer import word_error_rate

pytestmark = [pytest.mark.django_db(transaction=True), needs_audio, needs_speech]

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


@pytest.fixture
def recognising(settings, tmp_path):
    """No script: the engine recognises what it hears; a fresh index and speech model."""
    settings.LOCAL_ENGINE_SCRIPT = ""
    settings.LOCAL_ENGINE_STT = "auto"
    settings.LOCAL_ENGINE_STT_MODEL_DIR = str(tmp_path / "speech")
    settings.RAG_LOCAL_INDEX = str(tmp_path / "knowledge.sqlite3")
    from voice.rag import reset_retrievers

    reset_retrievers()
    yield
    reset_retrievers()
    stop_services()  # this test's worker (its own model directory) is not needed any more


async def started_worker(settings) -> None:
    """The worker the gateway's engine will use, started and ready (start-up is not what is tested)."""
    from pathlib import Path

    await worker_ready(get_service(Path(settings.LOCAL_ENGINE_STT_MODEL_DIR),
                                   max_streams=settings.LOCAL_ENGINE_STT_MAX_STREAMS,
                                   max_lag_ms=settings.LOCAL_ENGINE_STT_MAX_LAG_MS))  # fmt: skip


async def test_spoken_english_questions_are_recognised_while_spoken(live_db, recognising, settings,
                                                                    token_for) -> None:
    await started_worker(settings)
    server = LiveServer().start()
    try:
        client = await VoiceClient.open(server.ws_url, token=token_for())
        ready = await client.wait_for("gateway.session.ready")
        turns = []
        for entry in ENGLISH:
            start = len(client.events)
            # Real time, as from a microphone: partials must beat the VAD's 500 ms of silence.
            await client.stream_pcm(read_wav(AUDIO / entry["file"]), pace=0.04)
            context = await client.wait_for("gateway.rag.context", timeout=30)
            await client.wait_for("response.done", timeout=30)  # the engine answers once it has the final
            completed = client.seen(COMPLETED)[len(turns)]
            kinds = [e["type"] for e in client.events[start:]]
            transcript = completed["transcript"]
            wer = word_error_rate(entry["transcript"], transcript)
            assert wer <= 0.4, (entry["file"], transcript, wer)
            assert DELTA in kinds[: kinds.index("input_audio_buffer.speech_stopped")], entry["file"]
            turns.append((entry, transcript, context))
        brooding = {e["file"]: (t, c) for e, t, c in turns}["en_brooding_temperature.wav"]
        assert "temperature" in brooding[0].split() and "chicks" in brooding[0].split()
        assert brooding[1]["injected"] and brooding[1]["sources"]
        assert brooding[1]["sources"][0]["title"] == "Brooding temperature for broiler chicks by age"
        await client.close()
        await asyncio.sleep(0.5)
        stored = [t async for t in VoiceTurn.objects.filter(session_id=ready["session_id"]).order_by("index")]
        assert len(stored) == len(ENGLISH)
        for turn in stored:  # the prefetch started from recognised words before the user stopped speaking
            assert turn.retrieval_used and turn.retrieval_started_ms is not None
            assert turn.retrieval_started_ms < turn.speech_ms, (turn.retrieval_started_ms, turn.speech_ms)
    finally:
        server.stop()
