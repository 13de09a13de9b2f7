"""Structured logs: JSON (LOG_FORMAT=json) or readable console lines, redacted, with session context.

Every log record (the project's stdlib loggers, structlog loggers, uvicorn/daphne access logs) goes
through the handlers declared in settings.LOGGING: the `redact` filter (voice.logging.RedactSecretsFilter)
first, then `structured_formatter`, which adds the time, level, logger name and the session context bound
with `bind_session()`, redacts every string field once more (exception tracebacks included) and renders.

Session context uses contextvars: `bind_session()` in a connection's task applies to every log line of
that task and of the tasks it starts afterwards; other connections are not affected.
"""

from __future__ import annotations

import logging
import logging.config
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from structlog.contextvars import bind_contextvars, merge_contextvars, unbind_contextvars

from voice.logging import redact

SESSION_KEYS = ("session_id", "user_id", "plan")
_DROPPED_KEYS = ("color_message",)  # uvicorn's ANSI duplicate of the message


def _redact_event(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in _DROPPED_KEYS:
        event_dict.pop(key, None)
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact(value)
        elif value is not None and not isinstance(value, int | float | bool):
            event_dict[key] = redact(str(value))
    return event_dict


def structured_formatter(fmt: str = "json") -> logging.Formatter:
    """Called by logging.config (the "structured" formatter of settings.LOGGING)."""
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
    )


def structured_logging_config(config: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Called by configure_logging: LOGGING with the structured formatter and the redact filter on every
    handler (the dict is changed in place and returned)."""
    config.setdefault("formatters", {})["structured"] = {
        "()": "voice.observability.logs.structured_formatter",
        "fmt": "json" if str(fmt).lower() == "json" else "console",
    }
    config.setdefault("filters", {}).setdefault("redact", {"()": "voice.logging.RedactSecretsFilter"})
    for handler in config.get("handlers", {}).values():
        if handler.get("formatter") in (None, "plain"):
            handler["formatter"] = "structured"
        filters = handler.setdefault("filters", [])
        if "redact" not in filters:
            filters.append("redact")
    return config


def configure_logging(namespace: dict[str, Any]) -> None:
    """Called once from settings (voice.observability.setup): structured handlers + structlog."""
    config = namespace.get("LOGGING")
    if not isinstance(config, dict):
        return
    structured_logging_config(config, namespace.get("LOG_FORMAT", "json"))
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.render_to_log_kwargs,  # the stdlib handlers (filter, formatter) do the rest
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # Applied now so that log lines emitted while Django starts are already structured and redacted;
    # Django applies the same LOGGING again during setup (idempotent).
    logging.config.dictConfig(config)


def bind_session(session_id: str, user_id: str, plan: str) -> None:
    """Called by the consumer once a session is admitted: later log lines in this task carry the ids."""
    bind_contextvars(session_id=session_id, user_id=user_id, plan=plan)


def clear_session() -> None:
    """Called by the consumer when the connection ends: drop the ids bound by bind_session()."""
    unbind_contextvars(*SESSION_KEYS)


@contextmanager
def session_context(session_id: str, user_id: str, plan: str) -> Iterator[None]:
    """Called around a block that handles one session (tests, background jobs): bind, then clear."""
    bind_session(session_id, user_id, plan)
    try:
        yield
    finally:
        clear_session()
