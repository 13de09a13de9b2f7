"""Local realtime engine: GA protocol behaviour through LocalUpstream (no network, no database)."""

from __future__ import annotations

import asyncio
import base64
import json
import wave
from typing import Any

import numpy as np
import pytest

from tests.conftest import AUDIO
from voice.realtime.engine import PLACEHOLDER_TRANSCRIPT, EngineConfig, LocalUpstream

SPEECH = ["en_broiler_water.wav", "en_brooding_temperature.wav", "fr_brooding_temperature.wav"]
QUESTION = "What is the ideal brooding temperature for day old chicks during the first week?"
needs_audio = pytest.mark.skipif(not AUDIO.is_dir(), reason="shared test audio not available")


def cfg(**kw: Any) -> EngineConfig:
    """A fast, deterministic engine: tone TTS, audio at 1000x, no RAG, no script, no recognition."""
    base: dict[str, Any] = {
        "recognition": "off",
        "speed": 1000.0,
        "tts": "tone",
        "use_rag": False,
        "script": None,
        "first_audio_ms": 0,
        "transcript_delay_ms": 0,
    }
    return EngineConfig(**{**base, **kw})


_open: list[LocalUpstream] = []


@pytest.fixture(autouse=True)
async def _close_upstreams() -> Any:
    """Every upstream a test opened is closed, so no engine task outlives its test's loop."""
    yield
    while _open:
        await _open.pop().close()


async def start(config: EngineConfig | None = None, **session: Any) -> LocalUpstream:
    up = LocalUpstream(config or cfg())
    _open.append(up)
    await up.connect()
    assert (await recv(up))["type"] == "session.created"
    if session:
        await configure(up, **session)
    return up


async def send(up: LocalUpstream, **event: Any) -> None:
    await up.send(json.dumps(event))


async def recv(up: LocalUpstream, timeout: float = 3.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(up.recv(), timeout))


async def until(up: LocalUpstream, kind: str, timeout: float = 3.0) -> tuple[dict, list[dict]]:
    """Read events up to and including the first of type `kind`; returns (it, everything before it)."""
    seen: list[dict] = []
    while True:
        event = await recv(up, timeout)
        if event["type"] == kind:
            return event, seen
        seen.append(event)


async def drain(up: LocalUpstream, quiet: float = 0.05) -> list[dict]:
    """Everything the engine emits until it has been quiet for `quiet` seconds."""
    events = []
    while True:
        try:
            events.append(await recv(up, quiet))
        except TimeoutError:
            return events


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


async def configure(
    up: LocalUpstream,
    *,
    create_response: bool = False,
    transcription: bool | str = True,
    turn_detection: bool = True,
    **extra: Any,
) -> dict:
    td = {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "create_response": create_response,
        "interrupt_response": True,
    }
    td.update(extra.pop("td", {}))
    session = {
        "type": "realtime",
        "instructions": "Be brief.",
        "tools": [],
        **extra,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": transcription if isinstance(transcription, str) else "gpt-4o-transcribe"}
                if transcription else None,
                "turn_detection": td if turn_detection else None,
            }
        },
    }
    await send(up, type="session.update", session=session)
    updated, _ = await until(up, "session.updated")
    return updated


def wav_frames(name: str, ms: int = 40) -> list[str]:
    with wave.open(str(AUDIO / name)) as w:
        pcm = w.readframes(w.getnframes())
    step = ms * 48
    return [base64.b64encode(pcm[i : i + step]).decode() for i in range(0, len(pcm), step)]


def speech_end_ms(name: str) -> int:
    """End of the last 20 ms frame louder than -45 dBFS (espeak adds its own trailing silence)."""
    with wave.open(str(AUDIO / name)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
    frames = pcm[: len(pcm) // 480 * 480].reshape(-1, 480)
    loud = np.flatnonzero(np.sqrt((frames**2).mean(axis=1)) > 32768 * 10 ** (-45 / 20))
    return int(loud[-1] + 1) * 20


async def stream(up: LocalUpstream, name: str) -> None:
    for frame in wav_frames(name):
        await send(up, type="input_audio_buffer.append", audio=frame)


async def ask(up: LocalUpstream, text: str = QUESTION, **response: Any) -> tuple[dict, list[dict]]:
    """A text turn: user item + response.create; returns (response.done, events before it)."""
    await send(
        up,
        type="conversation.item.create",
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
    )
    await send(up, type="response.create", **({"response": response} if response else {}))
    return await until(up, "response.done")


# --- session lifecycle and validation -----------------------------------------------------------------
async def test_session_created_and_updated() -> None:
    up = LocalUpstream(cfg())
    await up.connect()
    created = await recv(up)
    assert created["type"] == "session.created" and created["session"]["id"].startswith("sess_")
    assert "instructions" in created["session"] and created["session"]["tools"] == []
    updated = await configure(up, tools=[{"type": "function", "name": "lookup", "parameters": {}}])
    session = updated["session"]
    assert session["instructions"] == "Be brief." and session["tools"][0]["name"] == "lookup"
    assert session["audio"]["input"]["turn_detection"]["create_response"] is False
    assert session["audio"]["output"]["voice"] == "marin"  # untouched fields survive the merge
    await up.close()


async def test_missing_session_type_rejected() -> None:
    up = await start()
    await send(up, type="session.update", event_id="evt_1", session={"instructions": "x"})
    err = await recv(up)
    assert err["type"] == "error" and err["error"]["code"] == "missing_required_parameter"
    assert err["error"]["param"] == "session.type" and err["error"]["event_id"] == "evt_1"


BETA_FIELDS = ["voice", "modalities", "input_audio_format", "turn_detection", "temperature"]


@pytest.mark.parametrize("field", BETA_FIELDS)
async def test_beta_fields_rejected(field: str) -> None:
    up = await start()
    await send(up, type="session.update", session={"type": "realtime", field: "x"})
    err = (await recv(up))["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "unknown_parameter"
    assert err["message"].startswith("Unknown parameter") and field in err["message"]
    await configure(up)  # the session stays usable


async def test_unknown_and_malformed_client_events() -> None:
    up = await start()
    await send(up, type="bogus.event", event_id="e9")
    err = (await recv(up))["error"]
    assert err["code"] == "invalid_event" and err["event_id"] == "e9"
    await up.send("{nope")
    assert (await recv(up))["type"] == "error"
    await send(up, type="engine.test_hook", action="stall")  # hooks are off by default
    assert (await recv(up))["error"]["code"] == "invalid_event"


# --- audio turns -------------------------------------------------------------------------------------
@needs_audio
@pytest.mark.parametrize("name", SPEECH)
async def test_vad_detects_exactly_one_turn(name: str) -> None:
    up = await start(cfg(), transcription=False)
    await stream(up, name)
    events = await drain(up)
    kinds = types(events)
    assert kinds.count("input_audio_buffer.speech_started") == 1
    assert kinds.count("input_audio_buffer.speech_stopped") == 1
    assert kinds.count("input_audio_buffer.committed") == 1
    assert "response.created" not in kinds  # create_response false: wait for response.create
    started, stopped, committed = (
        next(e for e in events if e["type"] == f"input_audio_buffer.{k}")
        for k in ("speech_started", "speech_stopped", "committed")
    )
    assert 150 <= started["audio_start_ms"] <= 300  # speech at ~500 ms minus 300 ms prefix padding
    assert abs(stopped["audio_end_ms"] - (speech_end_ms(name) + 500)) <= 60  # + silence_duration_ms
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    user = next(e for e in events if e["type"] == "conversation.item.added")
    assert user["item"]["role"] == "user" and user["item"]["content"] == [
        {"type": "input_audio", "transcript": None}
    ]
    assert kinds.index("input_audio_buffer.committed") < kinds.index("conversation.item.added")


@needs_audio
async def test_vad_audio_start_without_prefix_padding() -> None:
    up = await start(cfg(), transcription=False, td={"prefix_padding_ms": 0})
    await stream(up, SPEECH[1])
    started = next(e for e in await drain(up) if e["type"] == "input_audio_buffer.speech_started")
    assert 440 <= started["audio_start_ms"] <= 560


@needs_audio
async def test_silence_makes_no_turn() -> None:
    up = await start(cfg())
    await stream(up, "silence_2s.wav")
    assert await drain(up) == []


@needs_audio
async def test_create_response_true_answers_automatically() -> None:
    up = await start(cfg(), create_response=True)
    await stream(up, SPEECH[0])
    done, before = await until(up, "response.done")
    assert done["response"]["status"] == "completed"
    kinds = types(before)
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    completed = next(e for e in before if e["type"].endswith("input_audio_transcription.completed"))
    assert completed["transcript"] == PLACEHOLDER_TRANSCRIPT  # honest: no script, no recognition


@needs_audio
async def test_partial_transcripts_arrive_during_speech_with_a_streaming_transcription_model() -> None:
    """gpt-realtime-whisper streams the transcript while the user speaks; gpt-4o-transcribe only after
    the commit (OpenAI's behaviour, reproduced by default: LOCAL_ENGINE_PARTIAL_TRANSCRIPTS unset)."""
    up = await start(cfg(script=[QUESTION]), transcription="gpt-4o-transcribe")
    await stream(up, SPEECH[1])
    kinds = types(await drain(up))
    assert "conversation.item.input_audio_transcription.delta" not in kinds[:kinds.index(
        "input_audio_buffer.speech_stopped")]

    up = await start(cfg(script=[QUESTION, "second"]), transcription="gpt-realtime-whisper")
    await stream(up, SPEECH[1])
    events = await drain(up)
    kinds = types(events)
    deltas = [i for i, k in enumerate(kinds) if k == "conversation.item.input_audio_transcription.delta"]
    assert len(deltas) >= 5 and deltas[4] < kinds.index("input_audio_buffer.speech_stopped")
    text = "".join(events[i]["delta"] for i in deltas)
    completed = next(e for e in events if e["type"].endswith("input_audio_transcription.completed"))
    assert text == completed["transcript"] == QUESTION and completed["usage"]["input_tokens"] > 0
    assert kinds.index("input_audio_buffer.committed") < kinds.index(completed["type"])


async def test_manual_commit_and_clear() -> None:
    up = await start(cfg(script=["hello there"]), turn_detection=False)
    await send(up, type="input_audio_buffer.append", audio=base64.b64encode(b"\0" * 48 * 50).decode())
    await send(up, type="input_audio_buffer.commit", event_id="c1")
    err = (await recv(up))["error"]
    assert err["code"] == "input_audio_buffer_commit_empty" and err["event_id"] == "c1"
    await send(up, type="input_audio_buffer.append", audio=base64.b64encode(b"\0" * 48 * 100).decode())
    await send(up, type="input_audio_buffer.commit")
    kinds = types(await drain(up))
    assert kinds[:3] == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    assert kinds[-1] == "conversation.item.input_audio_transcription.completed"
    await send(up, type="input_audio_buffer.clear")
    assert (await recv(up))["type"] == "input_audio_buffer.cleared"


# --- responses ---------------------------------------------------------------------------------------
async def test_response_streams_audio_transcript_and_usage() -> None:
    up = await start(cfg(), create_response=False)
    done, before = await ask(up)
    kinds = types(before)
    order = [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
    ]
    positions = [len(kinds) - 1 - kinds[::-1].index(k) for k in order]  # last occurrence of each
    assert positions == sorted(positions)
    audio = b"".join(
        base64.b64decode(e["delta"]) for e in before if e["type"] == "response.output_audio.delta"
    )
    assert len(audio) > 48 * 1000 and len(audio) % 2 == 0
    transcript = "".join(e["delta"] for e in before if e["type"] == "response.output_audio_transcript.delta")
    assert transcript == next(e for e in before if e["type"].endswith("transcript.done"))["transcript"]
    response = done["response"]
    assert response["status"] == "completed" and response["status_details"] is None
    assert response["output"][0]["content"][0] == {"type": "output_audio", "transcript": transcript}
    usage = response["usage"]
    assert usage["output_token_details"]["audio_tokens"] >= len(audio) // 48 * 20 // 1000
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert set(usage["input_token_details"]["cached_tokens_details"]) == {"text_tokens", "audio_tokens"}


async def test_later_turns_cost_more_and_hit_the_cache() -> None:
    up = await start(cfg(), create_response=False)
    first, _ = await ask(up, "first question?")
    second, _ = await ask(up, "second question?")
    u1, u2 = first["response"]["usage"], second["response"]["usage"]
    assert u2["input_tokens"] > u1["input_tokens"]
    cached = u2["input_token_details"]["cached_tokens"]
    assert 0 < cached <= u2["input_tokens"] and u1["input_token_details"]["cached_tokens"] == 0


async def test_text_modality_and_context_answer() -> None:
    up = await start(cfg(), output_modalities=["text"])
    await send(
        up,
        type="conversation.item.create",
        item={
            "id": "u1",
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": QUESTION}],
        },
    )
    context = (
        "Relevant knowledge:\n[1] Brooding (source: brooding.md)\n"
        "In practice the ideal temperature is about 32 °C at chick level. It is lowered weekly."
    )
    await send(
        up,
        type="conversation.item.create",
        previous_item_id="u1",
        item={"type": "message", "role": "system", "content": [{"type": "input_text", "text": context}]},
    )
    await send(up, type="response.create")
    _, before = await until(up, "response.done")
    assert "response.output_audio.delta" not in types(before)
    text = next(e for e in before if e["type"] == "response.output_text.done")["text"]
    assert "32 °C at chick level" in text
    assert "".join(e["delta"] for e in before if e["type"] == "response.output_text.delta") == text


async def test_answerer_and_per_response_instructions() -> None:
    calls = []

    async def answerer(question: str, context: str | None) -> str:
        calls.append((question, context))
        return "Scripted answer."

    up = await start(cfg(answerer=answerer), create_response=False)
    done, _ = await ask(
        up, "hi?", instructions="Be brief.\nKnowledge: Chicks need 32 °C.", output_modalities=["text"]
    )
    assert calls == [("hi?", "Knowledge: Chicks need 32 °C.")]
    assert done["response"]["output"][0]["content"][0]["text"] == "Scripted answer."


async def test_rag_answer_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    class Retriever:
        async def search(self, query: str, limit: int = 3) -> list[Any]:
            text = "| Age | T |\n| Day 1 | 32 |\nKeep chicks at 32 °C in the first week. Then lower it."
            return [type("Passage", (), {"title": "t", "text": text, "source": "s", "score": 1.0})()]

    monkeypatch.setattr("voice.rag.get_retriever", lambda: Retriever())
    up = await start(cfg(use_rag=True), output_modalities=["text"])
    done, _ = await ask(up)
    assert "Keep chicks at 32 °C in the first week." in done["response"]["output"][0]["content"][0]["text"]


async def test_one_active_response_and_cancel() -> None:
    up = await start(cfg(first_audio_ms=300), create_response=False)
    await send(up, type="response.cancel", event_id="x1")
    err = (await recv(up))["error"]
    assert err["code"] == "response_cancel_not_active" and err["event_id"] == "x1"
    await send(up, type="response.create")
    created = await recv(up)
    assert created["type"] == "response.created"
    await send(up, type="response.create")
    assert (await recv(up))["error"]["code"] == "conversation_already_has_active_response"
    await send(up, type="response.cancel")
    done = await recv(up)
    assert done["type"] == "response.done" and done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "client_cancelled"
    assert await drain(up, 0.4) == []  # nothing of the cancelled response leaks out later


@needs_audio
async def test_speech_interrupts_the_active_response() -> None:
    up = await start(cfg(speed=1.0), create_response=False)
    await send(up, type="response.create")
    await until(up, "response.output_audio.delta")
    await stream(up, SPEECH[0])
    done, before = await until(up, "response.done")
    assert "input_audio_buffer.speech_started" in types(before)
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    assert done["response"]["output"][0]["status"] == "incomplete"


async def test_truncate_and_delete() -> None:
    up = await start(cfg(), create_response=False)
    done, _ = await ask(up, "anything?")
    item_id = done["response"]["output"][0]["id"]
    played = done["response"]["usage"]["output_token_details"]["audio_tokens"] * 50  # ≈ ms sent
    for end_ms, code in ((0, "unsupported_content_type"), (played + 5000, "invalid_value")):
        await send(
            up, type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=end_ms
        )
        err = (await recv(up))["error"]
        assert err["code"] == code
    assert "already shorter than" in err["message"]
    await send(up, type="conversation.item.truncate", item_id="nope", content_index=0, audio_end_ms=10)
    assert (await recv(up))["error"]["code"] == "item_truncate_invalid_item_id"
    await send(up, type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=500)
    truncated = await recv(up)
    assert truncated["type"] == "conversation.item.truncated" and truncated["audio_end_ms"] == 500
    await send(up, type="conversation.item.delete", item_id=item_id)
    assert (await recv(up)) | {"event_id": None} == {
        "type": "conversation.item.deleted",
        "item_id": item_id,
        "event_id": None,
    }
    await send(up, type="conversation.item.delete", item_id=item_id)
    assert (await recv(up))["error"]["code"] == "item_delete_invalid_item_id"


async def test_item_create_rules_and_positioning() -> None:
    up = await start(cfg())

    async def create(item: dict, **kw: Any) -> dict:
        await send(up, type="conversation.item.create", item=item, **kw)
        return await recv(up)

    def msg(role: str, ptype: str, item_id: str | None = None) -> dict:
        return {
            **({"id": item_id} if item_id else {}),
            "type": "message",
            "role": role,
            "content": [{"type": ptype, "text": "x", "audio": ""}],
        }

    assert (await create(msg("system", "input_audio")))["error"]["code"] == "invalid_value"
    assert (await create(msg("assistant", "output_audio")))["type"] == "error"
    a = await create(msg("user", "input_text", "a"))
    assert a["type"] == "conversation.item.added" and a["previous_item_id"] is None
    await recv(up)  # .done
    await create(msg("user", "input_text", "b"))
    await recv(up)
    c = await create(msg("system", "input_text", "c"), previous_item_id="a")
    assert c["previous_item_id"] == "a"
    assert [e.item["id"] for e in up.session.conversation.entries] == ["a", "c", "b"]
    await recv(up)
    err = await create(msg("user", "input_text", "d"), previous_item_id="missing")
    assert err["error"]["code"] == "invalid_value" and err["error"]["param"] == "previous_item_id"


async def test_first_audio_delay_and_late_transcription() -> None:
    # 300 ms between the late transcript and the first audio: the order must not hang on a 50 ms margin
    # when CI's two cores are busy (it flipped once: transcript after audio).
    config = cfg(first_audio_ms=400, transcript_delay_ms=100, script=["hi there"])
    up = await start(config, create_response=False, turn_detection=False)
    await send(up, type="input_audio_buffer.append", audio=base64.b64encode(b"\0" * 48 * 200).decode())
    await send(up, type="input_audio_buffer.commit")
    await send(up, type="response.create")
    began = asyncio.get_running_loop().time()
    _, before = await until(up, "response.output_audio.delta")
    assert asyncio.get_running_loop().time() - began >= 0.39
    kinds = types(before)
    transcribed = kinds.index("conversation.item.input_audio_transcription.completed")
    assert kinds.index("response.created") < transcribed  # arrives after commit, asynchronously
