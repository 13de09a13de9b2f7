"""The OpenAI Python SDK's generated realtime types as a test oracle for both sides of the protocol.

Every event the gateway sends upstream and every event the local engine emits during the test session is
recorded through voice.realtime.protocol_tap (tests/conftest.py wires it for the whole suite) and, at the
end of the session, validated against `openai.types.realtime.RealtimeClientEvent` /
`RealtimeServerEvent` (discriminated by `type`): a pydantic validation error or a key the SDK's model does
not declare fails the run, unless the key is on ALLOWED_UNKNOWN below with its reason.

Recording is bounded: events are grouped by their shape (event type and the recursive structure of keys
and value types) and at most SAMPLES_PER_SHAPE of each shape are kept, long strings (audio) truncated.
Without the `openai` package (a test dependency, requirements/local.txt) nothing is recorded or checked.
"""

from __future__ import annotations

import json
import threading
from typing import Any

SAMPLES_PER_SHAPE = 20
MAX_STRING = 256  # audio payloads are truncated in the samples: the SDK types them as plain strings

# Keys the SDK's models do not declare but the GA server really sends or accepts, as "<event type>:<path>"
# (list indices dropped). Each needs a reason; keep it short and revisit when the SDK is upgraded.
ALLOWED_UNKNOWN: dict[str, str] = {
    # GA `session.created/updated` carry the session object's identity and expiry: OpenAI sends them (the
    # 60-minute cap is read from `expires_at`), but the SDK types the session as the create *request*.
    "session.created:session.object": "server-side session identity; SDK types the request shape",
    "session.created:session.id": "server-side session identity; SDK types the request shape",
    "session.created:session.expires_at": "the 60-minute cap; SDK types the request shape",
    "session.updated:session.object": "server-side session identity; SDK types the request shape",
    "session.updated:session.id": "server-side session identity; SDK types the request shape",
    "session.updated:session.expires_at": "the 60-minute cap; SDK types the request shape",
}
# Event types that are not protocol events: the engine's test-only fault hook (never sent by the gateway).
NOT_PROTOCOL = frozenset({"engine.test_hook"})

_lock = threading.Lock()
_samples: dict[str, dict[str, list[dict[str, Any]]]] = {"client": {}, "server": {}}
_recording = False


def sdk_available() -> bool:
    """True when the `openai` package (and its realtime types) can be imported."""
    try:
        import openai.types.realtime  # noqa: F401
    except ImportError:
        return False
    return True


def _shape(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_shape(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + "|".join(sorted({_shape(v) for v in value})) + "]"
    if isinstance(value, str):
        return "s"
    return type(value).__name__


def _trimmed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _trimmed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_trimmed(v) for v in value]
    if isinstance(value, str) and len(value) > MAX_STRING:
        return value[:MAX_STRING]
    return value


def record(side: str, event: Any) -> None:
    """Keep `event` (a dict, or JSON text/bytes) as a sample of its shape; side is "client" or "server"."""
    if isinstance(event, bytes | str):
        try:
            event = json.loads(event)
        except ValueError:
            event = {"type": "<not JSON>", "text": str(event)[:80]}
    if not isinstance(event, dict) or event.get("type") in NOT_PROTOCOL:
        return
    shape = _shape(event)
    with _lock:
        samples = _samples[side].setdefault(shape, [])
        if len(samples) < SAMPLES_PER_SHAPE:
            samples.append(_trimmed(event))  # a copy: the engine mutates some items after emitting them


def unknown_keys(model: Any, path: str = "") -> list[str]:
    """Dotted paths of every key the validated SDK model (recursively) holds as an undeclared extra."""
    from pydantic import BaseModel

    found: list[str] = []
    if isinstance(model, BaseModel):
        found += [f"{path}.{key}".lstrip(".") for key in (model.__pydantic_extra__ or {})]
        for name in type(model).model_fields:
            found += unknown_keys(getattr(model, name, None), f"{path}.{name}")
    elif isinstance(model, list | tuple):
        for item in model:
            found += unknown_keys(item, path)
    elif isinstance(model, dict):
        for key, item in model.items():
            found += unknown_keys(item, f"{path}.{key}")
    return found


def problems(side: str, event: dict[str, Any]) -> list[str]:
    """What the SDK's types reject in one event: validation errors and unknown keys not allowed."""
    from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
    from pydantic import TypeAdapter, ValidationError

    adapter = _adapters.get(side)
    if adapter is None:
        adapter = _adapters[side] = TypeAdapter(RealtimeClientEvent if side == "client" else RealtimeServerEvent)
    kind = event.get("type")
    try:
        model = adapter.validate_python(event)
    except ValidationError as exc:
        return [f"{kind}: {err['loc']}: {err['msg']}" for err in exc.errors()[:5]]
    return [f"{kind}: unknown key {path}" for path in unknown_keys(model)
            if f"{kind}:{path}" not in ALLOWED_UNKNOWN]


_adapters: dict[str, Any] = {}


def check_recorded() -> tuple[int, list[str]]:
    """(events checked, problems) over everything recorded so far, each problem named once."""
    with _lock:
        recorded = [(side, event) for side, shapes in _samples.items() for group in shapes.values()
                    for event in group]
    found: dict[str, None] = {}
    for side, event in recorded:
        for problem in problems(side, event):
            found.setdefault(f"{'gateway→upstream' if side == 'client' else 'engine→gateway'} {problem}")
    return len(recorded), list(found)


def start() -> None:
    """pytest_sessionstart: tap the gateway's upstream sends and the engine's emits (when the SDK is here)."""
    global _recording
    if not sdk_available():
        return
    from voice.realtime import protocol_tap

    protocol_tap.gateway_sent = lambda text: record("client", text)
    protocol_tap.engine_emitted = lambda event: record("server", event)
    _recording = True


def finish(session: Any) -> None:
    """pytest_sessionfinish: validate the samples; any problem prints and sets the exit status to 1."""
    global _recording
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter is not None else print
    if not _recording:
        write("SDK conformance: skipped (the openai package is not installed)")
        return
    from voice.realtime import protocol_tap

    protocol_tap.gateway_sent = protocol_tap.engine_emitted = None
    _recording = False
    count, found = check_recorded()
    if found:
        write(f"SDK CONFORMANCE FAILED ({len(found)} problems):")
        for problem in found[:40]:
            write(f"  {problem}")
        session.exitstatus = 1
    shapes = sum(len(shapes) for shapes in _samples.values())
    write(f"SDK conformance: {count} recorded events of {shapes} shapes checked: {len(found)} problems")
