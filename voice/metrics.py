"""Prometheus metrics of the gateway (exposed at /metrics). Updating them is O(1) and lock-light."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ACTIVE_SESSIONS = Gauge("voice_active_sessions", "Live voice sessions on this instance")
SESSIONS = Counter("voice_sessions_total", "Voice sessions ended, by outcome", ["outcome"])
REFUSALS = Counter("voice_refusals_total", "Connections refused by policy, by code", ["code"])
FIRST_AUDIO = Histogram(
    "voice_first_audio_seconds",
    "User speech end to first assistant audio sent to the client",
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0),
)
RETRIEVAL_LATENCY = Histogram(
    "voice_retrieval_seconds",
    "Knowledge retrieval latency",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0),
)
FRAMES = Counter("voice_frames_total", "WebSocket frames relayed", ["direction"])
BYTES = Counter("voice_bytes_total", "WebSocket bytes relayed", ["direction"])
UPSTREAM_ERRORS = Counter("voice_upstream_errors_total", "Upstream error events, by code", ["code"])
REDIS_FALLBACK = Gauge("voice_redis_fallback", "1 when this instance serves from the in-memory fallback")
EVENT_LOOP_TASKS = Gauge(
    "voice_event_loop_tasks",
    "asyncio tasks alive on the serving event loop: each live session owns a few; an idle instance returns to "
    "its baseline, so steady growth is a task leak",
)
COST = Counter("voice_cost_usd_total", "Estimated OpenAI cost in USD", ["plan"])
ADMISSION_PHASE = Histogram(
    "voice_admission_phase_seconds",
    "Each step of an admission, from the accepted socket to gateway.session.ready: handshake (the HTTP "
    "upgrade, until the app takes the connection), gate (queued at the admission "
    "gate), authenticate (JWT or ticket, resume token), access (the access decision), upstream (upstream "
    "handshake until the session is configured), ready (resume state saved, ready sent)",
    ["phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
LOOP_LAG = Histogram(
    "voice_event_loop_lag_seconds",
    "How late a 10 ms timer fires on the event loop: the delay every session's audio saw at that moment",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
GC_PAUSE = Histogram(
    "voice_gc_pause_seconds",
    "Cyclic garbage collections: each one stalls the event loop, and so every live session's audio",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
)


def record_refusal(code: str) -> None:
    """Called for each policy refusal."""
    REFUSALS.labels(code=code).inc()


def record_session_end(
    *, outcome: str, frames_in: int, frames_out: int, bytes_in: int, bytes_out: int, plan: str, cost: float
) -> None:
    """Called once per connection end: counters are added in bulk, not per frame (hot path stays lean)."""
    SESSIONS.labels(outcome=outcome).inc()
    FRAMES.labels(direction="in").inc(frames_in)
    FRAMES.labels(direction="out").inc(frames_out)
    BYTES.labels(direction="in").inc(bytes_in)
    BYTES.labels(direction="out").inc(bytes_out)
    if cost:
        COST.labels(plan=plan).inc(cost)
