"""The hot path's shortcuts agree with the slow path they bypass: appends, audio deltas, the Inbox."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voice.realtime.client_events import ClientEventError, fast_append_audio_bytes, parse_client_frame
from voice.realtime.inbox import Inbox
from voice.realtime.upstream_events import audio_delta_fields

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _append(audio: str, event_id: str | None = None) -> str:
    head = '{"type":"input_audio_buffer.append",'
    if event_id is not None:
        head += f'"event_id":{json.dumps(event_id, ensure_ascii=False)},'
    return head + f'"audio":{json.dumps(audio, ensure_ascii=False)}' + "}"


def fast(text: str) -> int:
    return fast_append_audio_bytes(text.encode())


def test_canonical_appends_are_recognised() -> None:
    audio = base64.b64encode(bytes(1920)).decode()
    assert fast(_append(audio)) == 1920
    assert fast(_append(audio, "b_1_2")) == 1920
    assert fast(_append(base64.b64encode(b"ab").decode())) == 2  # one '=' of padding
    assert fast(_append("")) == 0


@pytest.mark.parametrize(
    "text",
    [
        _append("AB=A"), _append("A==="), _append("ABC"), _append("AB=="),  # bad padding; an odd byte count
        _append("AAA\u00e9"), _append("AA AA"), _append("AA\\nA"),  # outside the alphabet, escapes
        '{"type":"input_audio_buffer.append","audio":"AAAA","extra":1}',  # another key: the slow path
        '{"audio":"AAAA","type":"input_audio_buffer.append"}',  # another order: the slow path
        '{"type": "input_audio_buffer.append", "audio": "AAAA"}',  # other spacing: the slow path
        _append("AAAA", "x" * 65), _append("AAAA", 'a"b'), _append("AAAA", "a\nb"), _append("AAAA", "é"),
        '{"type":"input_audio_buffer.append","audio":"AAAA"} ',
    ],
)
def test_anything_else_takes_the_slow_path(text: str) -> None:
    assert fast(text) == -1


@settings(max_examples=1500, deadline=None)
@given(
    audio=st.one_of(st.text(alphabet=B64, max_size=40), st.text(max_size=20),
                    st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())),
    event_id=st.one_of(st.none(), st.text(max_size=70)),
)
def test_fast_verdict_never_admits_what_the_parser_refuses(audio: str, event_id: str | None) -> None:
    """Whatever the fast check accepts, the full validator accepts verbatim with the same size."""
    text = _append(audio, event_id)
    size = fast(text)
    if size < 0:
        return
    event = parse_client_frame(text)
    assert event.type == "input_audio_buffer.append" and event.text == text and event.audio_bytes == size


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=120))
def test_fast_check_on_arbitrary_text(text: str) -> None:
    size = fast(text)
    if size >= 0:
        assert parse_client_frame(text).audio_bytes == size
    else:
        try:
            parse_client_frame(text)
        except ClientEventError:
            pass


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
@pytest.mark.parametrize("pcm", [b"", b"\x01\x02", bytes(4800), bytes(4801)])
def test_audio_delta_fields_match_the_parsed_event(separators: tuple[str, str], pcm: bytes) -> None:
    event = {"type": "response.output_audio.delta", "event_id": "event_1", "response_id": "resp_1",
             "item_id": "item_1", "output_index": 0, "content_index": 0, "delta": base64.b64encode(pcm).decode()}
    assert audio_delta_fields(json.dumps(event, separators=separators).encode()) == ("resp_1", "item_1", len(pcm))


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta":"AAAA","x":"y"}',
        '{"type":"response.output_text.delta","response_id":"r","item_id":"i","delta":"AAAA"}',
        '{"response_id":"r","type":"response.output_audio.delta","delta":"AAAA"}',
        '{"type":"response.output_audio.delta","response_id":"r","item_id":"i"}',
        '{"type":"response.output_audio.delta","response_id":"ré","item_id":"i","delta":"AAAA"}',
    ],
)
def test_audio_delta_fields_refuse_other_shapes(text: str) -> None:
    assert audio_delta_fields(text.encode()) is None


async def test_inbox_bypass_only_while_the_reader_is_parked() -> None:
    inbox = Inbox()
    taken: list[bytes] = []
    inbox.bypass = lambda payload: payload.startswith(b"fast") and not taken.append(payload)

    def offer(payload: bytes) -> None:  # what the socket callbacks do
        if not inbox.try_bypass(payload):
            inbox.put_nowait(payload.decode())

    offer(b"fast-before-anyone-waits")  # no reader parked: queued
    assert inbox.qsize() == 1 and taken == []
    assert await inbox.get() == "fast-before-anyone-waits"

    reader = asyncio.get_running_loop().create_task(inbox.get())
    await asyncio.sleep(0)
    assert inbox.parked
    offer(b"fast-1")  # parked and empty: bypassed
    assert taken == [b"fast-1"] and inbox.parked
    offer(b"slow-1")  # declined: wakes the reader
    offer(b"fast-2")  # the reader has not run yet: queued behind slow-1, not bypassed
    assert await reader == "slow-1"
    assert await inbox.get() == "fast-2" and taken == [b"fast-1"]


async def test_inbox_keeps_an_item_delivered_to_a_cancelled_reader() -> None:
    inbox = Inbox()
    reader = asyncio.get_running_loop().create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("item")
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert await inbox.get() == "item"


def test_session_fast_relay_counts_and_skips_cancelled_responses() -> None:
    from voice.realtime.session import GatewaySession

    relayed: list[bytes] = []
    session = GatewaySession(session_id="s", send_client=None, listener=None, upstream_factory=None,  # type: ignore[arg-type]
                             send_client_nowait=lambda payload: relayed.append(payload) or True)

    def delta(response_id: str, pcm: bytes) -> bytes:
        return json.dumps({"type": "response.output_audio.delta", "event_id": "e", "response_id": response_id,
                           "item_id": "item_1", "output_index": 0, "content_index": 0,
                           "delta": base64.b64encode(pcm).decode()}, separators=(",", ":")).encode()

    session.cancelled_responses.add("resp_cancelled")
    assert not session._relay_upstream_nowait(delta("resp_cancelled", bytes(960)))  # the slow path drops it
    assert session._relay_upstream_nowait(delta("resp_live", bytes(960)))
    assert session._relay_upstream_nowait(delta("resp_live", bytes(480)))
    assert not session._relay_upstream_nowait(b'{"type":"response.done","response":{}}')  # not a delta
    assert len(relayed) == 2 and session.stats.frames_out == 2
    assert session.assistant_audio["item_1"] == 1440  # truncation bound: bytes actually sent

    session.send_client_nowait = lambda payload: False  # the socket is backed up or closing
    assert not session._relay_upstream_nowait(delta("resp_live", bytes(480)))
    assert session.stats.frames_out == 2 and session.assistant_audio["item_1"] == 1440  # counted once, later


def test_history_keeps_only_what_the_replay_uses() -> None:
    """A session's history is capped at HISTORY_TURNS turns and at the replay's character budget, so long
    answers do not make every session hold (and save to Redis after each turn) text it will never replay."""
    from voice.realtime.upstream_events import _HISTORY_CHARS, HISTORY_TURNS, history_append

    history: list[dict[str, str]] = []
    entries = [{"user": f"question {n} " * 5, "assistant": f"answer {n} " * 80} for n in range(40)]
    for n, entry in enumerate(entries):
        history_append(history, entry)
        assert history == entries[n + 1 - len(history): n + 1]  # the newest turns
        assert sum(len(e["user"]) + len(e["assistant"]) for e in history) <= _HISTORY_CHARS
    assert 1 < len(history) < HISTORY_TURNS
    short: list[dict[str, str]] = []
    for n in range(40):
        history_append(short, {"user": f"q{n}", "assistant": f"a{n}"})
    assert len(short) == HISTORY_TURNS and short[-1] == {"user": "q39", "assistant": "a39"}
    history_append(short, {"user": "", "assistant": "x" * (2 * _HISTORY_CHARS)})
    assert short == [{"user": "", "assistant": "x" * (2 * _HISTORY_CHARS)}]  # the latest turn always stays


async def test_per_item_bookkeeping_keeps_only_recent_items() -> None:
    """An hour-long session sees thousands of items: only recent ones can still be truncated or completed."""
    from voice.realtime.accounting import TurnStats
    from voice.realtime.session import GatewaySession
    from voice.realtime.upstream_events import RECENT_ITEMS, TURN_ITEMS

    session = GatewaySession(session_id="s", send_client=None, listener=None, upstream_factory=None,  # type: ignore[arg-type]
                             send_client_nowait=lambda payload: True)
    session.answering = TurnStats(index=0)
    for n in range(200):
        session._account_audio_delta(f"item_{n}", 960)
        await session._on_transcript_delta({"item_id": f"user_{n}", "delta": "word "})
    assert len(session.assistant_audio) == len(session.partial_transcripts) == RECENT_ITEMS
    assert list(session.item_turn) == ["item_198", "item_199"] and TURN_ITEMS == 2  # what is playing now
    assert "item_199" in session.assistant_audio and "user_199" in session.partial_transcripts
