"""Offline speech recognition (voice/realtime/engine/stt): language model, resampling, the engine's
streaming transcripts and its capacity bounds. Needs requirements/speech.txt; skipped without it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import AUDIO
from tests.test_engine import cfg, configure, recv, send, until, wav_frames
from voice.realtime.engine import PLACEHOLDER_TRANSCRIPT, LocalUpstream
from voice.realtime.engine.recognition import OVERLOADED_TRANSCRIPT, UNAVAILABLE_TRANSCRIPT, newly_stable
from voice.realtime.engine.stt import domain_lm, unavailable_reason
from voice.realtime.engine.stt.resample import Resampler24to16
from voice.realtime.engine.stt.service import RESTART_BACKOFF_S, RecognitionService, stop_services
from voice.realtime.engine.stt.wer import word_error_rate

SPEECH_MISSING = unavailable_reason("en")
needs_speech = pytest.mark.skipif(SPEECH_MISSING is not None, reason=f"speech tests: {SPEECH_MISSING}")
needs_audio = pytest.mark.skipif(not AUDIO.is_dir(), reason="shared test audio not available")
MANIFEST = json.loads((AUDIO / "manifest.json").read_text()) if AUDIO.is_dir() else {"files": []}
ENGLISH = [f for f in MANIFEST["files"] if f["language"] == "en"]
STREAMING_TRANSCRIPTION_MODEL = "gpt-realtime-whisper"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Iterator[Path]:
    """A fresh speech model directory: the worker builds the model from the bundled knowledge."""
    yield tmp_path_factory.mktemp("speech")
    stop_services()


def test_arpa_model_is_a_normalised_backoff_model() -> None:
    sentences = [s.split() for s in ("the ideal temperature", "the ideal humidity", "water per day")]
    text = domain_lm.arpa(sentences)
    grams: dict[int, dict[tuple, tuple[float, float]]] = defaultdict(dict)
    order = 0
    for line in text.splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1])
        elif order and line.strip() and not line.startswith("\\"):
            parts = line.split("\t")
            grams[order][tuple(parts[1].split())] = (float(parts[0]), float(parts[2]) if len(parts) > 2 else 0.0)
    vocab = [w for (w,) in grams[1] if w != "<s>"]

    def prob(history: tuple, word: str) -> float:
        gram = (*history, word)
        if gram in grams[len(gram)]:
            return 10 ** grams[len(gram)][gram][0]
        return 10 ** grams[len(history)].get(history, (0, 0.0))[1] * prob(history[1:], word)

    for history in [(), ("the",), ("<s>", "the"), ("ideal",), ("water", "per"), ("per", "day")]:
        assert math.isclose(sum(prob(history, w) for w in vocab), 1.0, rel_tol=1e-3), history


def test_knowledge_sentences_speak_numbers_and_units() -> None:
    text = "---\ntitle: Brooding temperature\nlang: en\n---\n| Week 2 | 29–30 °C |\nDay-old chicks: 60 %."
    sentences, topics = domain_lm.knowledge_sentences(text)
    flat = [" ".join(s) for s in sentences]
    assert "twenty nine to thirty degrees" in flat and "day old chicks" in flat and "sixty percent" in flat
    assert "brooding temperature" in topics


def test_resampler_keeps_the_tone_and_is_chunk_invariant() -> None:
    t = np.arange(24000) / 24000
    pcm = (8000 * np.sin(2 * np.pi * 1000 * t)).astype("<i2").tobytes()
    whole = Resampler24to16().feed(pcm)
    pieces, chunked = Resampler24to16(), b""
    for offset in range(0, len(pcm), 1919):  # odd sizes: split samples and phases
        chunked += pieces.feed(pcm[offset : offset + 1919])
    assert whole == chunked and abs(len(whole) // 2 - 16000) <= 1
    out = np.frombuffer(whole, "<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(out[1000:]))
    assert abs(np.argmax(spectrum) * 16000 / len(out[1000:]) - 1000) < 5


def test_only_words_successive_hypotheses_agree_on_are_sent() -> None:
    history = [["what"], ["what", "is"]]
    assert newly_stable([], history, ["what", "is", "the"]) == ["what"]
    assert newly_stable(["what"], [["what", "is"], ["what", "is", "the"]], ["what", "is", "the", "ideal"]) == ["is"]
    assert newly_stable(["what", "was"], history, ["what", "is", "the"]) == []  # revised: wait for the final


async def _spoken(up: LocalUpstream, wav: str, pace: float = 0.0) -> list[dict]:
    """Stream a WAV into a VAD + transcription session; events up to the completed transcript."""
    events: list[dict] = []
    for frame in wav_frames(wav):
        await send(up, type="input_audio_buffer.append", audio=frame)
        await asyncio.sleep(pace)
    while not events or events[-1]["type"] != "conversation.item.input_audio_transcription.completed":
        events.append(await recv(up, timeout=20))
    return events


async def worker_ready(service: RecognitionService, timeout: float = 60) -> None:
    """Wait until the recognition worker is up (a loaded machine may take seconds to start it)."""
    service.start()
    deadline = time.monotonic() + timeout
    while not service.ready:
        assert time.monotonic() < deadline, f"recognition worker not ready: {service.failed_reason}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def engine(model_dir: Path, **kw: Any) -> AsyncIterator[LocalUpstream]:
    """A recognising engine session (VAD, streaming transcription), its worker ready; closed after use."""
    up = await _engine(model_dir, **kw)
    try:
        yield up
    finally:
        await up.close()


async def _engine(model_dir: Path, **kw: Any) -> LocalUpstream:
    up = LocalUpstream(cfg(recognition="auto", stt_model_dir=str(model_dir), **kw))
    await up.connect()
    assert (await recv(up))["type"] == "session.created"
    await configure(up, transcription=True)
    # A transcription model that streams while the user speaks (as OpenAI's does), so deltas are due.
    await send(up, type="session.update", session={"type": "realtime", "audio": {"input": {
        "transcription": {"model": STREAMING_TRANSCRIPTION_MODEL}}}})  # fmt: skip
    assert (await recv(up))["type"] == "session.updated"
    if up.session._speech is not None:
        await worker_ready(up.session._speech.service)
    return up


@needs_speech
@needs_audio
@pytest.mark.parametrize("entry", ENGLISH, ids=[f["file"] for f in ENGLISH])
async def test_engine_recognises_the_english_questions(model_dir, entry) -> None:
    async with engine(model_dir) as up:
        events = await _spoken(up, entry["file"], pace=0.02)  # twice real time
        kinds = [e["type"] for e in events]
        transcript = events[-1]["transcript"]
        assert word_error_rate(entry["transcript"], transcript) <= 0.4, transcript
        deltas = [i for i, k in enumerate(kinds) if k.endswith("input_audio_transcription.delta")]
        assert deltas and deltas[0] < kinds.index("input_audio_buffer.speech_stopped")


@needs_speech
@needs_audio
@pytest.mark.parametrize("limits", [{"stt_max_streams": 0}, {"stt_max_lag_ms": 1}], ids=["full", "falling_behind"])
async def test_beyond_capacity_a_placeholder_never_a_stall(model_dir, limits) -> None:
    """No free stream: refused at speech start. Lag over the bound (1 ms: any backlog): dropped mid-speech."""
    async with engine(model_dir, **limits) as up:
        events = await asyncio.wait_for(_spoken(up, "en_broiler_water.wav"), 20)
        assert events[-1]["transcript"] == OVERLOADED_TRANSCRIPT


@needs_speech
@needs_audio
async def test_a_dead_worker_gives_a_placeholder_and_is_restarted(tmp_path) -> None:
    async with engine(tmp_path) as up:
        service = up.session._speech.service
        frames = wav_frames("en_brooding_temperature.wav")
        for frame in frames[:60]:  # mid-question
            await send(up, type="input_audio_buffer.append", audio=frame)
            await asyncio.sleep(0.005)
        service._proc.kill()
        for frame in frames[60:]:
            await send(up, type="input_audio_buffer.append", audio=frame)
        done, _ = await until(up, "conversation.item.input_audio_transcription.completed", timeout=10)
        assert done["transcript"] == UNAVAILABLE_TRANSCRIPT
        await asyncio.sleep(RESTART_BACKOFF_S)
        await worker_ready(service)  # the next utterance starts a new worker
        events = await _spoken(up, "en_brooding_temperature.wav", pace=0.01)
        assert "temperature" in events[-1]["transcript"]


@needs_audio
async def test_without_a_recogniser_the_engine_keeps_its_placeholder(monkeypatch, model_dir) -> None:
    monkeypatch.setattr("voice.realtime.engine.recognition.unavailable_reason", lambda lang: "not installed")
    async with engine(model_dir) as up:
        assert up.session._speech is None
        events = await _spoken(up, "en_broiler_water.wav")
        assert events[-1]["transcript"] == PLACEHOLDER_TRANSCRIPT


@needs_speech
@needs_audio
async def test_french_sessions_stay_on_the_placeholder(model_dir) -> None:
    async with engine(model_dir) as up:
        french = {"transcription": {"model": STREAMING_TRANSCRIPTION_MODEL, "language": "fr"}}
        await send(up, type="session.update", session={"type": "realtime", "audio": {"input": french}})
        assert (await recv(up))["type"] == "session.updated"
        events = await _spoken(up, "fr_brooding_temperature.wav")
        assert events[-1]["transcript"] == PLACEHOLDER_TRANSCRIPT


@needs_speech
@pytest.mark.django_db
def test_voice_ingest_rebuilds_the_speech_model(tmp_path, settings) -> None:
    from django.core.management import call_command

    settings.RAG_LOCAL_INDEX = str(tmp_path / "index.sqlite3")
    settings.LOCAL_ENGINE_STT_MODEL_DIR = str(tmp_path / "speech")
    doc = tmp_path / "en-zucchini.md"
    doc.write_text("---\ntitle: Zucchini for hens\nlang: en\n---\nHens may peck zucchini slices in summer.\n")
    call_command("voice_ingest", str(doc), "--reset")
    lm = (tmp_path / "speech" / domain_lm.LM_NAME).read_text()
    assert "\tzucchini" in lm and "brooding" not in lm  # reset: only what was ingested
    call_command("voice_ingest", str(doc))  # without reset: adds to what the model was built from
    assert "\tzucchini" in (tmp_path / "speech" / domain_lm.LM_NAME).read_text()


@needs_speech
@needs_audio
async def test_answers_wait_for_the_committed_turns_final_not_for_the_next_turn(model_dir) -> None:
    async with engine(model_dir) as up:
        await _spoken(up, "en_brooding_temperature.wav", pace=0.01)
        frames = wav_frames("en_broiler_water.wav")
        for frame in frames[: len(frames) // 2]:  # the next question, cut mid-speech: no commit, no final
            await send(up, type="input_audio_buffer.append", audio=frame)
            await asyncio.sleep(0.005)
        await send(up, type="response.create")
        done, events = await until(up, "response.done", timeout=10)
        assert done["response"]["status"] == "completed"
        assert not [e for e in events if e["type"].endswith("input_audio_transcription.completed")]


@needs_speech
@needs_audio
async def test_an_automatic_answer_reads_the_recognised_question(model_dir) -> None:
    async with engine(model_dir) as up:
        await configure(up, create_response=True)
        for frame in wav_frames("en_broiler_water.wav"):
            await send(up, type="input_audio_buffer.append", audio=frame)
            await asyncio.sleep(0.01)
        _, events = await until(up, "response.done", timeout=20)
        kinds = [e["type"] for e in events]
        # The response started at commit but read its question only once the final transcript was out.
        assert kinds.index("response.created") < kinds.index("response.output_item.added")
        assert kinds.index("conversation.item.input_audio_transcription.completed") < kinds.index(
            "response.output_item.added")
