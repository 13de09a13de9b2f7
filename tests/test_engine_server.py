"""Local realtime engine: fault injection hooks, and the standalone WebSocket server (real sockets)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.test_engine import _close_upstreams, ask, cfg, drain, recv, send, start, until
from voice.realtime.engine import EngineClosed, EngineSession, LocalUpstream
from voice.realtime.engine import session as engine_session
from voice.realtime.engine.server import EngineServerThread, start_engine_server
from voice.realtime.upstream import UpstreamClosed, UpstreamConnectError

__all__ = ["_close_upstreams"]  # the autouse fixture, imported so it applies here too
AUTH = {"Authorization": "Bearer sk-local"}


CLOSING = [("session_expired", 1001), ("beta_api_shape_disabled", 4000)]


# --- fault injection ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "error_event"), [("server_error", True), ("insufficient_quota", False)])
async def test_fail_with_fails_the_next_response(code: str, error_event: bool) -> None:
    up = await start(cfg(fail_with=code), create_response=False)
    done, before = await ask(up)
    details = done["response"]["status_details"]
    assert done["response"]["status"] == "failed" and details["error"]["code"] == code
    assert any(e["type"] == "error" for e in before) is error_event
    done, _ = await ask(up)  # one shot: the next response works
    assert done["response"]["status"] == "completed"


@pytest.mark.parametrize(("code", "close_code"), CLOSING)
async def test_fatal_codes_close_the_session(code: str, close_code: int) -> None:
    up = await start(cfg(fail_with=code), create_response=False)
    await send(up, type="response.create")
    err, _ = await until(up, "error")
    assert err["error"]["code"] == code
    with pytest.raises(UpstreamClosed) as closed:
        await until(up, "never")
    assert closed.value.code == close_code


async def test_invalid_api_key_refuses_connect() -> None:
    with pytest.raises(UpstreamConnectError) as exc:
        await LocalUpstream(cfg(fail_with="invalid_api_key")).connect()
    assert exc.value.fatal


async def test_close_and_stall_mid_response_and_malformed() -> None:
    up = await start(cfg(fail_with="close_mid_response"), create_response=False)
    await send(up, type="response.create")
    await until(up, "response.output_audio.delta")
    with pytest.raises(UpstreamClosed) as closed:
        await until(up, "never")
    assert closed.value.code == 1006

    up = await start(cfg(fail_with="stall_mid_response"), create_response=False)
    await send(up, type="response.create")
    await until(up, "response.output_audio.delta")
    assert await drain(up, 0.2) == []

    up = await start(cfg(fail_with="malformed"), create_response=False)
    await send(up, type="response.create")
    texts = [await asyncio.wait_for(up.recv(), 2) for _ in range(5)]
    assert any(not t.endswith("}") for t in texts)


async def test_test_hook_event_and_python_hooks() -> None:
    up = await start(cfg(test_hooks=True))
    await send(up, type="engine.test_hook", action="malformed")
    with pytest.raises(ValueError):
        json.loads(await up.recv())
    await send(up, type="engine.test_hook", action="error", code="server_error")
    assert (await recv(up))["error"]["type"] == "server_error"
    await send(up, type="engine.test_hook", action="error", code="session_expired")
    assert (await recv(up))["error"]["code"] == "session_expired"
    with pytest.raises(UpstreamClosed) as closed:
        await recv(up)
    assert closed.value.code == 1001
    with pytest.raises(UpstreamClosed):  # stays closed
        await up.send("{}")

    up = await start(cfg())
    up.crash()
    with pytest.raises(UpstreamClosed) as closed:
        await recv(up)
    assert closed.value.code == 1006

    up = await start(cfg())
    pending = asyncio.ensure_future(up.recv())
    await asyncio.sleep(0)
    await up.close()
    with pytest.raises(UpstreamClosed):
        await pending
    with pytest.raises(UpstreamClosed):
        await up.recv()


async def test_session_expires_after_max_duration() -> None:
    up = await start(cfg(max_session_seconds=0.05))
    assert (await recv(up))["error"]["code"] == "session_expired"
    with pytest.raises(UpstreamClosed) as closed:
        await recv(up)
    assert closed.value.code == 1001


# --- standalone server ---------------------------------------------------------------------------------
@pytest.fixture
async def server_url() -> Any:
    server, port = await start_engine_server(port=0, config=cfg(test_hooks=True))
    yield f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
    server.close()
    await server.wait_closed()


async def ws_json(ws: Any, timeout: float = 3.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def test_server_requires_bearer_token(server_url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"}):
        with pytest.raises(InvalidStatus) as exc:
            async with connect(server_url, additional_headers=headers):
                pass
        assert exc.value.response.status_code == 401


async def test_server_refuses_beta_header(server_url: str) -> None:
    async with connect(server_url, additional_headers={**AUTH, "OpenAI-Beta": "realtime=v1"}) as ws:
        assert (await ws_json(ws))["error"]["code"] == "beta_api_shape_disabled"
        with pytest.raises(ConnectionClosed) as closed:
            await ws_json(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000


async def test_server_full_text_turn(server_url: str) -> None:
    async with connect(server_url, additional_headers=AUTH) as ws:
        created = await ws_json(ws)
        assert created["type"] == "session.created" and created["session"]["model"] == "gpt-realtime"
        session = {
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {"input": {"turn_detection": {"type": "server_vad", "create_response": False}}},
        }
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        assert (await ws_json(ws))["type"] == "session.updated"
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await ws.send(json.dumps({"type": "response.create"}))
        kinds = []
        while not kinds or kinds[-1] != "response.done":
            kinds.append((await ws_json(ws))["type"])
        assert "response.output_audio.delta" in kinds and "response.output_audio_transcript.done" in kinds


async def test_server_faults_close_the_socket(server_url: str) -> None:
    async with connect(server_url, additional_headers=AUTH) as ws:
        await ws_json(ws)
        await ws.send(json.dumps({"type": "engine.test_hook", "action": "error", "code": "session_expired"}))
        assert (await ws_json(ws))["error"]["code"] == "session_expired"
        with pytest.raises(ConnectionClosed) as closed:
            await ws_json(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    async with connect(server_url, additional_headers=AUTH) as ws:
        await ws_json(ws)
        await ws.send(json.dumps({"type": "engine.test_hook", "action": "close", "close_code": 1006}))
        with pytest.raises(ConnectionClosed) as closed:
            await ws_json(ws)
    assert closed.value.rcvd is None  # abnormal closure: no close frame at all


async def test_server_401_has_the_openai_error_body(server_url: str) -> None:
    with pytest.raises(InvalidStatus) as exc:
        async with connect(server_url):
            pass
    body = json.loads(exc.value.response.body)
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"


async def test_server_forwards_close_codes_and_reasons(server_url: str) -> None:
    async with connect(server_url, additional_headers=AUTH) as ws:
        await ws_json(ws)
        await ws.send(json.dumps({"type": "engine.test_hook", "action": "close", "close_code": 4321}))
        with pytest.raises(ConnectionClosed) as closed:
            await ws_json(ws)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4321, "simulated close")


async def test_server_reassembles_fragments_and_caps_messages(server_url: str) -> None:
    async with connect(server_url, additional_headers=AUTH, max_size=None) as ws:
        await ws_json(ws)
        await ws.send(iter(['{"type": "input_audio_buffer', '.clear"}']))  # one message in two frames
        assert (await ws_json(ws))["type"] == "input_audio_buffer.cleared"
        await ws.send(b'{"type": "input_audio_buffer.clear"}')  # binary JSON is parsed too
        assert (await ws_json(ws))["type"] == "input_audio_buffer.cleared"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.send("x" * (16 * 1024 * 1024 + 1))
            await ws_json(ws, 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_server_close_says_going_away_to_clients() -> None:
    server, port = await start_engine_server(port=0, config=cfg())
    async with connect(f"ws://127.0.0.1:{port}/v1/realtime", additional_headers=AUTH) as ws:
        await ws_json(ws)
        server.close()
        with pytest.raises(ConnectionClosed) as closed:
            await ws_json(ws)
        await server.wait_closed()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_server_fail_with_invalid_api_key_is_401() -> None:
    server, port = await start_engine_server(port=0, config=cfg(fail_with="invalid_api_key"))
    try:
        with pytest.raises(InvalidStatus) as exc:
            async with connect(f"ws://127.0.0.1:{port}/v1/realtime", additional_headers=AUTH):
                pass
        assert exc.value.response.status_code == 401
    finally:
        server.close()
        await server.wait_closed()


async def test_server_thread_for_sync_callers() -> None:
    thread = EngineServerThread(cfg()).start()
    try:
        async with connect(thread.url + "?model=x", additional_headers=AUTH) as ws:
            assert (await ws_json(ws))["session"]["model"] == "x"
    finally:
        await asyncio.to_thread(thread.stop)


def test_management_command_help() -> None:
    from voice.management.commands.realtime_engine import Command

    text = Command().create_parser("manage.py", "realtime_engine").format_help()
    for option in ("--port", "--host", "--first-audio-ms", "--speed", "--script"):
        assert option in text


# --- the append fast path ----------------------------------------------------------------------------------
def _b64_tone(ms: int, amplitude: int) -> str:
    pcm = b"".join(struct.pack("<h", int(amplitude * math.sin(i / 8))) for i in range(ms * 24))
    return base64.b64encode(pcm).decode()


LOUD, QUIET = _b64_tone(40, 12000), _b64_tone(40, 0)
APPENDS = [
    *[f'{{"type":"input_audio_buffer.append","audio":"{LOUD}"}}'] * 8,  # speech starts
    f'{{"type":"input_audio_buffer.append","event_id":"ev_1","audio":"{LOUD}"}}',
    '{"type":"input_audio_buffer.append","event_id":"ev_bad","audio":"abc"}',  # bad base64: the error event
    '{"type":"input_audio_buffer.append","audio":"abc"}',
    '{"type":"input_audio_buffer.append","audio":""}',
    f'{{"type": "input_audio_buffer.append", "audio": "{LOUD}"}}',  # not canonical: the full parser
    f'{{"audio":"{LOUD}","type":"input_audio_buffer.append"}}',
    f'{{"type":"input_audio_buffer.append","event_id":"a\\"b","audio":"{LOUD}"}}',
    f'{{"type":"input_audio_buffer.append","audio":"{LOUD[:8]}\\u{ord(LOUD[8]):04x}{LOUD[9:]}"}}',  # escaped
    f'{{"type":"input_audio_buffer.append","event_id":"e","audio":"{LOUD}","x":1}}',
    '{"type":"input_audio_buffer.append","audio":"AAAA"',  # truncated: invalid JSON
    *[f'{{"type":"input_audio_buffer.append","audio":"{QUIET}"}}'] * 30,  # speech stops: a committed turn
]


def _normalised(events: list[str | EngineClosed]) -> list[Any]:
    """Events without their server ids (a counter, and random object ids), for comparison."""
    out = []
    for item in events:
        event = json.loads(item) if isinstance(item, str) else item
        if isinstance(event, dict):
            for key in ("event_id", "item_id", "previous_item_id", "item", "session"):
                event.pop(key, None)
        out.append(event)
    return out


async def _replay(texts: list[str | bytes]) -> tuple[list[Any], tuple[int, int]]:
    session = EngineSession(cfg(script=["How warm should chicks be?"]))
    sent: list[str | EngineClosed] = []
    session.deliver = sent.append
    session.start()
    session.receive(
        '{"type": "session.update", "session": {"type": "realtime", "audio": {"input": '
        '{"turn_detection": {"type": "server_vad", "create_response": false}}}}}'
    )
    for text in texts:
        session.receive(text)
    session.shutdown()
    return _normalised(sent), (session._clock_bytes, session._buffer_bytes)


async def test_append_fast_path_matches_the_full_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """str events may take the fast path; the same events as bytes always take json.loads: same results."""
    fast = await _replay(APPENDS)
    slow = await _replay([text.encode() for text in APPENDS])
    assert fast == slow
    kinds = [e["type"] for e in fast[0] if isinstance(e, dict)]
    assert "input_audio_buffer.speech_started" in kinds and "input_audio_buffer.committed" in kinds
    errors = [e["error"] for e in fast[0] if isinstance(e, dict) and e["type"] == "error"]
    assert [(e["code"], e["event_id"]) for e in errors] == [
        ("invalid_value", "ev_bad"),
        ("invalid_value", None),
        ("invalid_json", None),
    ]


HEAD = '{"type":"input_audio_buffer.append","audio":"'
EDGES = [
    *[f'{HEAD}{LOUD}"}}'] * 8,  # speech starts
    HEAD + "}",  # head and tail overlap: invalid JSON
    HEAD + '"}',  # empty audio
    f'{HEAD}{LOUD[:40]}"}}{LOUD[40:]}"}}',  # a quote inside: invalid JSON
    f'{HEAD}{LOUD[:40]}  {LOUD[40:]}"}}',  # JSON-legal, not base64 alphabet: b64decode skips spaces
    f'{HEAD}{LOUD[:40]}\\n{LOUD[40:]}"}}',  # a JSON escape (a newline): skipped by b64decode too
    f'{HEAD}{LOUD[:40]}\x01{LOUD[40:]}"}}',  # a raw control character: invalid JSON
    f'{HEAD}{LOUD[:40]}é{LOUD[40:]}"}}',  # non-ASCII: not base64
    f'{HEAD}{LOUD[:-4]}"}}',  # 4 characters short: still whole base64 quanta, 3 bytes less
    f'{HEAD}AAA"}}',  # incorrect padding: the error event
    f'{HEAD}{LOUD}"}} ',  # trailing space: the full parser
    *[f'{HEAD}{QUIET}"}}'] * 30,  # speech stops: a committed turn
]


async def test_append_head_check_matches_the_full_parser() -> None:
    """The regex-free check of the gateway's form gives what json.loads gives, on edge cases too."""
    fast = await _replay(EDGES)
    slow = await _replay([text.encode() for text in EDGES])
    assert fast == slow
    kinds = [e["type"] for e in fast[0] if isinstance(e, dict)]
    assert "input_audio_buffer.speech_started" in kinds and "input_audio_buffer.committed" in kinds
    codes = [e["error"]["code"] for e in fast[0] if isinstance(e, dict) and e["type"] == "error"]
    assert codes == ["invalid_json", "invalid_json", "invalid_json", "invalid_value", "invalid_value"]


def test_append_fast_path_takes_only_canonical_shapes() -> None:
    matched = [engine_session._APPEND.fullmatch(text) is not None for text in APPENDS[8:17]]
    assert matched == [True, True, True, True, False, False, False, False, False]


def test_audio_delta_template_matches_json_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    """emit_audio_delta's pre-built JSON is the text json.dumps makes of the event's dict (ids unique)."""
    from voice.realtime import protocol_tap
    from voice.realtime.engine.response import ResponseState

    session = EngineSession(cfg())
    sent: list[Any] = []
    session.deliver = sent.append
    r = ResponseState(id="resp_1", item_id="item_2", modalities=["audio"], instructions="",
                      in_conversation=True, created_at=0.0)  # fmt: skip
    chunks = [LOUD, QUIET, "", "QUJD+/=="]
    monkeypatch.setattr(protocol_tap, "engine_emitted", None)  # the suite's tap would take the dict path
    for chunk in chunks:
        session.emit_audio_delta(r, chunk)
    tapped: list[dict[str, Any]] = []
    monkeypatch.setattr(protocol_tap, "engine_emitted", tapped.append)
    for chunk in chunks:
        session.emit_audio_delta(r, chunk)
    fast, slow = sent[:4], sent[4:]
    for text, plain, event in zip(fast, slow, tapped, strict=True):
        expected = json.dumps({**event, "event_id": json.loads(text)["event_id"]})
        assert text == expected and plain == json.dumps(event)
    assert len({json.loads(text)["event_id"] for text in sent}) == len(sent)
    session.closed = True
    session.emit_audio_delta(r, LOUD)  # nothing once closed, as emit
    assert len(sent) == 8


def test_vad_compiled_einsum_matches_numpy() -> None:
    """The VAD's direct c_einsum gives np.einsum's float32 energies bit for bit (so the same turns)."""
    import numpy as np

    from voice.realtime.engine import vad

    rng = np.random.default_rng(7)
    for scale in (1, 30, 300, 3000, 30000):
        frames = np.clip(rng.normal(0, scale, (50, vad.FRAME_SAMPLES)), -32768, 32767).astype(np.float32)
        got = vad._einsum("ij,ij->i", frames, frames)
        assert got.tobytes() == np.einsum("ij,ij->i", frames, frames).tobytes()


async def test_partials_setting_follows_session_update() -> None:
    """The cached 'transcript deltas during speech' setting is recomputed by each session.update."""

    def update(model: str | None) -> str:
        transcription = json.dumps({"model": model} if model else None)
        return (
            '{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"transcription": '
            + transcription + ', "turn_detection": {"type": "server_vad", "create_response": false}}}}}'
        )

    session = EngineSession(cfg(script=["one two three four five six seven eight nine ten"] * 3))
    sent: list[Any] = []
    session.deliver = sent.append
    session.start()
    speech = [f'{{"type":"input_audio_buffer.append","audio":"{LOUD}"}}'] * 25
    quiet = [f'{{"type":"input_audio_buffer.append","audio":"{QUIET}"}}'] * 15
    deltas = []
    for model in ("gpt-realtime-whisper", "gpt-4o-transcribe", None, "gpt-realtime-whisper"):
        session.receive(update(model))
        before = len(sent)
        for text in speech:
            session.receive(text)
        early = [t for t in sent[before:] if "input_audio_transcription.delta" in t]  # still in speech
        deltas.append(len(early))
        for text in quiet:
            session.receive(text)
        assert any("speech_stopped" in t for t in sent[before:])
    session.shutdown()
    assert deltas[0] > 2 and deltas[1] == 0 and deltas[2] == 0 and deltas[3] == deltas[0]
