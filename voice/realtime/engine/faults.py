"""Fault injection for tests: simulated errors, closes, stalls and malformed events (see package docs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .protocol import error_event

if TYPE_CHECKING:
    from .response import ResponseState
    from .session import EngineSession

# Codes after which a real server closes the socket, with its close code.
CLOSE_CODES = {"session_expired": 1001, "beta_api_shape_disabled": 4000, "invalid_api_key": 1008}
ERROR_TYPES = {"server_error": "server_error", "insufficient_quota": "insufficient_quota"}
HOOK_ACTIONS = ("error", "fail_next_response", "close", "stall", "malformed")
MID_RESPONSE = ("close_mid_response", "stall_mid_response")  # act after the first audio delta
IN_STREAM = (*MID_RESPONSE, "malformed")  # faults the response runner applies while streaming
MESSAGES = {
    "session_expired": "Your session hit the maximum duration of 60 minutes.",
    "beta_api_shape_disabled": "The beta Realtime API shape is no longer supported; use the GA API.",
    "insufficient_quota": "You exceeded your current quota, please check your plan and billing details.",
    "invalid_api_key": "Incorrect API key provided.",
    "server_error": "The server had an error while processing your request. Sorry about that!",
}


def inject(s: EngineSession, action: str, code: str | None = None, close_code: int | None = None) -> None:
    """Apply one test-hook action to a session right now."""
    if action == "error":
        code = code or "server_error"
        message = MESSAGES.get(code, f"Simulated error: {code}.")
        s.emit(error_event(code, message, kind=ERROR_TYPES.get(code, "invalid_request_error")))
        if code in CLOSE_CODES or close_code:
            s.close(close_code or CLOSE_CODES[code], code)
    elif action == "fail_next_response":
        s.pending_fail = code or "server_error"
    elif action == "close":
        s.close(close_code or 1011, "simulated close")
    elif action == "stall":
        s.stalled = True
    elif action == "malformed":
        s.emit_raw("{this is not json")
    else:
        raise ValueError(f"unknown fault action {action!r}")


def fail_response(s: EngineSession, r: ResponseState, code: str) -> None:
    """Make a just-created response fail with `code`; session-fatal codes close the session instead."""
    from .response import finish  # late import: response imports this module

    if code in CLOSE_CODES:
        inject(s, "error", code)
        return
    message = MESSAGES.get(code, f"Simulated failure: {code}.")
    error = {"type": ERROR_TYPES.get(code, "invalid_request_error"), "code": code, "message": message}
    if code != "insufficient_quota":  # quota failures arrive only as a failed response.done
        s.emit(error_event(code, message, kind=error["type"]))
    finish(s, r, "failed", {"type": "failed", "error": error})
