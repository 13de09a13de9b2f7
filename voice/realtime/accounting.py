"""Per-session and per-turn counters, and cost from `response.done` usage (prices in settings)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from voice.realtime.models_catalog import realtime_price_row, transcription_price_row


def cost_from_usage(usage: dict[str, Any] | None, model: str) -> float:
    """USD cost of one response's usage at `model`'s own price row (UnpricedModel without one); cached input
    tokens are priced as cached."""
    if not usage:
        return 0.0
    prices = realtime_price_row(model)
    tokens = usage_tokens(usage)
    total = (
        (tokens["input_text_tokens"] - tokens["cached_text_tokens"]) * prices["text_in"]
        + tokens["cached_text_tokens"] * prices["text_cached"]
        + (tokens["input_audio_tokens"] - tokens["cached_audio_tokens"]) * prices["audio_in"]
        + tokens["cached_audio_tokens"] * prices["audio_cached"]
        + tokens["output_text_tokens"] * prices["text_out"]
        + tokens["output_audio_tokens"] * prices["audio_out"]
    )
    return total / 1_000_000


def transcription_cost(usage: dict[str, Any] | None, model: str) -> float:
    """USD cost of one input transcription (the `usage` of `…input_audio_transcription.completed`): tokens,
    or seconds for duration-billed models, at `model`'s own row (UnpricedModel without one)."""
    if not usage:
        return 0.0
    prices = transcription_price_row(model)
    if usage.get("type") == "duration":
        return float(usage.get("seconds") or 0) / 60 * prices["per_minute"]
    details = usage.get("input_token_details") or {}
    return (
        int(details.get("audio_tokens") or 0) * prices["audio_in"]
        + int(details.get("text_tokens") or 0) * prices["text_in"]
        + int(usage.get("output_tokens") or 0) * prices["text_out"]
    ) / 1_000_000


def usage_tokens(usage: dict[str, Any]) -> dict[str, int]:
    """Flatten GA usage into the token columns of VoiceSession."""
    inp = usage.get("input_token_details") or {}
    out = usage.get("output_token_details") or {}
    cached = inp.get("cached_tokens_details") or {}
    input_text = int(inp.get("text_tokens") or 0)
    input_audio = int(inp.get("audio_tokens") or 0)
    cached_text = min(int(cached.get("text_tokens") or 0), input_text)
    cached_audio = min(int(cached.get("audio_tokens") or 0), input_audio)
    return {
        "input_text_tokens": input_text,
        "input_audio_tokens": input_audio,
        "cached_text_tokens": cached_text,
        "cached_audio_tokens": cached_audio,
        "output_text_tokens": int(out.get("text_tokens") or 0),
        "output_audio_tokens": int(out.get("audio_tokens") or 0),
    }


@dataclass(slots=True, eq=False)
class TurnStats:
    """One user turn, from speech start (or a text message) to the end of the answer.

    Its VoiceTurn row is written once it is answered (again if it is interrupted later); a session only
    keeps the turns whose latest state has no row yet. Slotted, and its texts are released once they are in
    the history: live sessions hold thousands of them.
    """

    index: int
    started_at: float = field(default_factory=time.time)  # epoch seconds
    speech_start_mono: float | None = None
    speech_end_mono: float | None = None
    speech_ms: int | None = None
    retrieval_used: bool = False
    retrieval_started_ms: int | None = None
    retrieval_latency_ms: float | None = None
    retrieval_waited_ms: float | None = None
    rag_injected: bool = False
    first_audio_ms: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    interrupted: bool = False
    response_status: str = ""
    user_text: str = ""
    assistant_text: str = ""

    def row(self) -> dict[str, Any]:
        """The VoiceTurn columns."""
        data = asdict(self)
        for transient in ("speech_start_mono", "speech_end_mono", "user_text", "assistant_text"):
            data.pop(transient)
        return data


@dataclass
class SessionStats:
    """Counters for one connection of a session (a resumed session adds a new set to the same row)."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    interruptions: int = 0
    rag_queries: int = 0
    rag_hits: int = 0
    cost_usd: float = 0.0
    tokens: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "input_text_tokens",
                "input_audio_tokens",
                "cached_text_tokens",
                "cached_audio_tokens",
                "output_text_tokens",
                "output_audio_tokens",
            ),
            0,
        )
    )
    turn_count: int = 0  # turns started on this connection
    unsaved_turns: list[TurnStats] = field(default_factory=list)  # their latest state has no VoiceTurn row yet

    def turn_changed(self, turn: TurnStats) -> None:
        """Called when a turn starts, is answered, or is interrupted after its answer: its row is (re)due."""
        if turn not in self.unsaved_turns:
            self.unsaved_turns.append(turn)

    def turns_saved(self, written: list[tuple[TurnStats, dict[str, Any]]]) -> None:
        """Called once the rows in `written` are in the database: forget those turns, unless they changed
        while the write was in flight (their new state is still due)."""
        rows = {id(turn): row for turn, row in written}
        self.unsaved_turns = [turn for turn in self.unsaved_turns if rows.get(id(turn)) != turn.row()]

    def add_usage(self, usage: dict[str, Any] | None, model: str) -> tuple[int, int, float]:
        """Called on each `response.done`: returns (input tokens, output tokens, cost) of it."""
        if not usage:
            return 0, 0, 0.0
        for key, value in usage_tokens(usage).items():
            self.tokens[key] += value
        cost = cost_from_usage(usage, model)
        self.cost_usd += cost
        return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0), cost

    def add_transcription(self, usage: dict[str, Any] | None, model: str) -> float:
        """Called on each completed input transcription (conversation session, and the second session of
        early transcription "openai"): its cost goes to the session, not to a turn (turns cost responses)."""
        cost = transcription_cost(usage, model)
        self.cost_usd += cost
        return cost
