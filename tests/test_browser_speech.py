"""Issue 16 in a real browser: Chromium's fake microphone plays the English brooding question, the local
engine recognises it (no script), and the demo shows the recognised question and an answer from the
brooding-temperature document."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import AUDIO
from tests.test_browser import _demo_url, _wait_ready, needs_chromium, open_browser_page
from tests.test_speech import needs_speech
from voice.realtime.engine.stt.service import stop_services

pytestmark = [pytest.mark.browser, needs_chromium, needs_speech]

QUESTION_WAV = AUDIO / "en_brooding_temperature.wav"
DAY_ONE = ("32", "thirty-two", "thirty two")  # °C at chick level in the first week (the document's table)


def as_48khz(source: Path, target: Path, silence_s: float = 20.0) -> Path:
    """The 24 kHz question at 48 kHz (band-limited, by FFT), the rate Chromium's capture runs at, then
    silence: the fake microphone loops, and a repeated question would interrupt the answer."""
    with wave.open(str(source)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    up = np.fft.irfft(np.fft.rfft(pcm), n=2 * len(pcm)) * 2
    up = np.concatenate((up, np.zeros(int(48000 * silence_s))))
    with wave.open(str(target), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(np.clip(np.rint(up), -32768, 32767).astype("<i2").tobytes())
    return target


@pytest.fixture
def speech_server(settings, tmp_path, live_db):
    """The demo, DEBUG off, nothing scripted: what the user says is what the engine hears."""
    from tests.live import LiveServer
    from voice.rag import reset_retrievers

    settings.DEBUG = False
    settings.VOICE_DEMO_ENABLED = True
    settings.LOCAL_ENGINE_SCRIPT = ""
    settings.LOCAL_ENGINE_STT = "auto"
    settings.LOCAL_ENGINE_STT_MODEL_DIR = str(tmp_path / "speech")
    settings.RAG_LOCAL_INDEX = str(tmp_path / "knowledge.sqlite3")
    reset_retrievers()
    server = LiveServer().start()
    yield server
    server.stop()
    reset_retrievers()
    stop_services()


def test_spoken_question_is_recognised_and_answered_in_the_browser(speech_server, tmp_path, token_for) -> None:
    microphone = as_48khz(QUESTION_WAV, tmp_path / "question-48k.wav")
    with open_browser_page(speech_server, microphone) as page:
        page.page.goto(_demo_url(speech_server, token=token_for()))
        _wait_ready(page)
        page.page.get_by_role("button", name="Start talking").click()
        page.wait_js("window.voiceDemo.events.includes('input_audio_buffer.speech_stopped')", 30, "speech_stopped")
        user_text = "[...document.querySelectorAll('#conversation .turn.user .text')].map(p => p.textContent)"
        page.wait_js(f"{user_text}.some(t => t.includes('temperature') && t.includes('chicks'))", 30,
                     "the recognised question")  # fmt: skip
        page.wait_js("window.voiceDemo.events.includes('response.done')", 30, "answer complete")
        answers = page.page.evaluate(
            "[...document.querySelectorAll('#conversation .turn.assistant .text')].map(p => p.textContent)"
        )
        question = page.page.evaluate(user_text)[0]
    assert "brooding" in question or "temperature" in question, question
    assert any(any(t in a.lower() for t in DAY_ONE) for a in answers), answers
