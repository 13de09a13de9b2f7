"""The OpenAI Python SDK as an independent oracle of the realtime GA protocol (issue 17).

The whole suite is checked at its end (tests/sdk_conformance.py, wired in conftest): every event the
gateway sent upstream and every event the local engine emitted. Here: the checker itself, one gateway
session checked on its own (so this file alone covers the relay), and the SDK's own client driving the
local engine's WebSocket server through a text turn and an audio turn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests import sdk_conformance
from tests.conftest import AUDIO, needs_audio
from tests.test_engine import QUESTION, cfg, wav_frames
from voice.realtime import protocol_tap

pytestmark = pytest.mark.skipif(not sdk_conformance.sdk_available(),
                                reason="the openai package (requirements/local.txt) is not installed")


@contextlib.contextmanager
def tapped() -> Iterator[tuple[list[Any], list[dict[str, Any]]]]:
    """What the gateway sends upstream and what the engine emits while in the block (the suite-wide
    recorder, when installed, keeps recording too)."""
    sent: list[Any] = []
    emitted: list[dict[str, Any]] = []
    previous = protocol_tap.gateway_sent, protocol_tap.engine_emitted

    def on_sent(text: Any) -> None:
        sent.append(text)
        if previous[0] is not None:
            previous[0](text)

    def on_emitted(event: dict[str, Any]) -> None:
        emitted.append(sdk_conformance._trimmed(event))
        if previous[1] is not None:
            previous[1](event)

    protocol_tap.gateway_sent, protocol_tap.engine_emitted = on_sent, on_emitted
    try:
        yield sent, emitted
    finally:
        protocol_tap.gateway_sent, protocol_tap.engine_emitted = previous


def all_problems(sent: list[Any], emitted: list[dict[str, Any]]) -> list[str]:
    import json

    found = []
    for text in sent:
        found += sdk_conformance.problems("client", json.loads(text))
    for event in emitted:
        found += sdk_conformance.problems("server", event)
    return found


# --- the checker ---------------------------------------------------------------------------------------
def test_checker_fails_unknown_keys_and_invalid_values_and_honours_the_allow_list() -> None:
    ok = {"type": "response.create", "response": {"output_modalities": ["text"]}}
    assert sdk_conformance.problems("client", ok) == []
    stray = {"type": "response.create", "response": {"output_modalities": ["text"], "modalities": ["text"]}}
    assert sdk_conformance.problems("client", stray) == ["response.create: unknown key response.modalities"]
    wrong = {"type": "input_audio_buffer.commit", "event_id": 7}
    assert sdk_conformance.problems("client", wrong)
    assert sdk_conformance.problems("client", {"type": "session.nonsense"})
    assert sdk_conformance.problems("server", {"type": "input_audio_buffer.cleared"})  # event_id required
    created = {"type": "session.created", "event_id": "e", "session": {
        "type": "realtime", "object": "realtime.session", "id": "sess_1", "expires_at": 1, "model": "gpt-realtime"}}
    assert sdk_conformance.problems("server", created) == []  # the allow-listed identity fields
    created["session"]["voice"] = "marin"  # beta-era shape
    assert sdk_conformance.problems("server", created) == ["session.created: unknown key session.voice"]


def test_recording_keeps_bounded_samples_per_shape() -> None:
    saved = {side: dict(shapes) for side, shapes in sdk_conformance._samples.items()}
    try:
        for side in sdk_conformance._samples:
            sdk_conformance._samples[side] = {}
        for i in range(100):
            sdk_conformance.record("client", '{"type": "input_audio_buffer.append", "audio": "%s"}' % ("A" * i))
        (group,) = sdk_conformance._samples["client"].values()
        assert len(group) == sdk_conformance.SAMPLES_PER_SHAPE
        sdk_conformance.record("client", '{"type": "engine.test_hook", "action": "stall"}')  # not protocol
        assert len(sdk_conformance._samples["client"]) == 1
    finally:
        sdk_conformance._samples.update(saved)


# --- the gateway, relaying to the local engine -------------------------------------------------------------
@needs_audio
@pytest.mark.django_db(transaction=True)
async def test_gateway_session_events_conform(gateway, token_for) -> None:
    """A text turn, a spoken turn and a barge-in through the gateway: both sides conform."""
    from tests.live import VoiceClient, read_wav

    with tapped() as (sent, emitted):
        client = await VoiceClient.open(gateway.ws_url, token=token_for())
        await client.wait_for("gateway.session.ready")
        await client.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}})
        await client.send({"type": "response.create"})
        await client.wait_for("response.done", timeout=20)
        await client.stream_pcm(read_wav(AUDIO / "en_broiler_water.wav"), pace=0.01)
        delta = await client.wait_for("response.output_audio.delta", timeout=20)
        await client.send({"type": "conversation.item.truncate", "item_id": delta["item_id"], "content_index": 0,
                           "audio_end_ms": 100})
        await client.wait_for("response.done", timeout=20)
        await client.close()
    kinds = {event["type"] for event in emitted}
    assert {"session.created", "session.updated", "response.done", "input_audio_buffer.committed"} <= kinds
    assert len(sent) > 10
    assert all_problems(sent, emitted) == []


# --- the SDK's own client against the local engine's server ------------------------------------------------
@needs_audio
async def test_sdk_client_drives_the_local_engine_through_a_text_and_an_audio_turn() -> None:
    from openai import AsyncOpenAI

    from voice.realtime.engine.server import start_engine_server

    server, port = await start_engine_server(config=cfg(script=["How much water does a broiler drink?"]))
    client = AsyncOpenAI(api_key="sk-local-test", websocket_base_url=f"ws://127.0.0.1:{port}/v1")
    try:
        with tapped() as (_, emitted):
            async with client.realtime.connect(model="gpt-realtime-mini") as connection:
                created = await connection.recv()
                assert created.type == "session.created" and created.session.model == "gpt-realtime-mini"
                await connection.session.update(session={
                    "type": "realtime", "output_modalities": ["audio"], "audio": {"input": {
                        "transcription": {"model": "gpt-realtime-whisper", "delay": "low"},
                        "turn_detection": {"type": "server_vad", "create_response": True}}}})
                updated = await _until(connection, "session.updated")
                assert updated.session.audio.input.transcription.model == "gpt-realtime-whisper"

                # Text turn.
                await connection.conversation.item.create(item={
                    "type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]})
                await connection.response.create()
                done = await _until(connection, "response.done")
                assert done.response.status == "completed" and done.response.usage.output_tokens > 0

                # Audio turn: the engine's VAD ends it, the transcript streams while the user speaks.
                for frame in wav_frames("en_broiler_water.wav"):
                    await connection.input_audio_buffer.append(audio=frame)
                seen: list[str] = []
                while True:
                    event = await connection.recv()
                    seen.append(event.type)
                    if event.type == "response.done":
                        break
                assert seen.index("conversation.item.input_audio_transcription.delta") < seen.index(
                    "input_audio_buffer.speech_stopped")
                assert "conversation.item.input_audio_transcription.completed" in seen
                assert event.response.status == "completed"
                assert "response.output_audio.delta" in seen
        assert all_problems([], emitted) == []
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def _until(connection: Any, kind: str) -> Any:
    while True:
        event = await connection.recv()
        assert event.type != "error", event
        if event.type == kind:
            return event

