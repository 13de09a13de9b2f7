"""Local realtime engine: an in-process implementation of the OpenAI Realtime GA server protocol.

It lets the product run, be tested and be benchmarked offline. It is honest about what it is: it
detects turns with an energy VAD and recognises English speech when `requirements/speech.txt` is
installed (`stt/`, `recognition.py`: partial transcripts while the user speaks, the final after commit);
otherwise, for French, or when a script is set (`EngineConfig.script`, which wins), spoken turns get
their transcript from the script or a placeholder. Answers come from injected context, a
configured `answerer`, `voice.rag` when present, or a short fallback. Response audio is espeak-ng
when installed, else a speech-like tone (the default in tests).

Entry points:
- `LocalUpstream(config)`: the gateway `Upstream` (kind "local"), same event loop, no network.
- `EngineSession(config)`: the protocol state machine (`receive(text)` in, `out` queue of JSON out, or
  its `deliver` callback).
- `server.start_engine_server(host, port=0, config)` / `server.serve(...)` / `EngineServerThread`:
  the same over a real WebSocket (`manage.py realtime_engine`; picows, one `transport.EngineConnection`
  per connection).

Fault injection (for tests):
- `EngineConfig(fail_with=CODE)`: the next `response.create` fails (one shot). CODE is
  `server_error` (error event + response.done failed), `insufficient_quota` (response.done failed
  only), `session_expired` (error + close 1001), `beta_api_shape_disabled` (error + close 4000),
  `invalid_api_key` (LocalUpstream.connect raises a fatal UpstreamConnectError; the server answers
  HTTP 401), `close_mid_response` (first audio delta, then abnormal close 1006),
  `stall_mid_response` (first audio delta, then silence forever), `malformed` (a non-JSON event
  before the deltas), or any other code (error event + response failed).
- `EngineConfig(test_hooks=True)` enables the client event
  `{"type": "engine.test_hook", "action": A, "code": C, "close_code": N}` with A one of
  `error` (emit error C now; closes for session_expired 1001 / beta_api_shape_disabled 4000 /
  invalid_api_key 1008, or with close_code), `fail_next_response` (arm C as above), `close`
  (close with close_code, default 1011), `stall` (emit nothing more), `malformed` (one non-JSON
  event). Without the flag the event is rejected as unknown. The same actions are available in
  Python as `EngineSession.inject(...)` / `LocalUpstream.inject(...)`.
- `LocalUpstream.crash()`: recv raises UpstreamClosed(1006) at once.
- `EngineConfig(max_session_seconds=S)`: session_expired + close 1001 after S seconds.
"""

from __future__ import annotations

from .config import PLACEHOLDER_TRANSCRIPT, EngineConfig
from .session import EngineClosed, EngineSession
from .upstream import LocalUpstream

__all__ = ["PLACEHOLDER_TRANSCRIPT", "EngineClosed", "EngineConfig", "EngineSession", "LocalUpstream"]
