"""Sentry error tracking with secret scrubbing everywhere an event can carry one.

`init_sentry()` is called from settings (through `voice.observability.setup`). Without a DSN nothing is
initialised and one log line says so. Every event and transaction goes through `scrub_event`, which
removes credentials from request headers (Authorization, Cookie, Sec-WebSocket-Protocol with its
`bearer.<jwt>` subprotocol), query strings (`?token=`, `?ticket=`, `?resume=`), and any JWT-shaped or
`sk-…` string anywhere in the event (messages, exception values, breadcrumbs, extra, contexts, spans,
stack-frame variables), reusing `voice.logging.redact`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from voice.logging import redact

logger = logging.getLogger("voice.observability")

FILTERED = "[Filtered]"
# Keys (compared lower-cased, `-` and `_` equivalent) whose values are dropped wholesale.
SENSITIVE_KEYS = frozenset({
    "authorization", "proxy_authorization", "cookie", "cookies", "set_cookie", "sec_websocket_protocol",
    "x_api_key", "api_key", "apikey", "token", "access_token", "refresh_token", "ticket", "resume",
    "resume_token", "password", "secret", "openai_api_key", "weaviate_api_key", "jwt_signing_key",
    "secret_key", "metrics_token", "sentry_dsn",
})
# Probe and scrape endpoints: never traced.
UNTRACED_PATHS = ("/v1/voice/health", "/metrics")
# A voice WebSocket transaction lasts the whole session (minutes) and holds no useful spans: errors are
# reported either way, so these transactions are not sampled at all.
WEBSOCKET_TRACES_SAMPLE_RATE = 0.0
# Breadcrumb categories never kept. The Redis integration adds one per command, and a live voice session issues
# several a second (presence refresh, kill-switch poll, usage counters) on its connection's own scope, which
# keeps the last `max_breadcrumbs` (100) for the whole session: ~0.3 MB per live session, and an error report
# whose trail is Redis noise instead of the log lines that explain it.
DROPPED_BREADCRUMB_CATEGORIES = frozenset({"redis"})

_state: dict[str, Any] = {"initialised": False, "disabled_logged": False, "traces_rate": 0.0}


def _normalise(key: str) -> str:
    # Stack-frame variables arrive as reprs: b'cookie', 'authorization'.
    key = key.strip()
    if key[:2] in ("b'", 'b"'):
        key = key[1:]
    return key.strip("'\"").lower().replace("-", "_")


def _sensitive(key: object) -> bool:
    return isinstance(key, str) and _normalise(key) in SENSITIVE_KEYS


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 20:
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: FILTERED if _sensitive(k) and v else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        # Header lists: [["authorization", "Bearer …"], …]
        if len(value) == 2 and _sensitive(value[0]):
            return [value[0], FILTERED]
        return [_scrub(item, depth + 1) for item in value]
    return value


def scrub_event(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Called by Sentry (before_send / before_send_transaction) for every outgoing event."""
    request = event.get("request")
    if isinstance(request, dict):
        request.pop("cookies", None)
        request.pop("data", None)  # bodies may carry tokens (e.g. a ticket request); never needed
    return _scrub(event)


def filter_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Called by Sentry (before_breadcrumb) for each new breadcrumb: per-command Redis crumbs are dropped."""
    if crumb.get("category") in DROPPED_BREADCRUMB_CATEGORIES:
        return None
    return crumb


def traces_sampler(sampling_context: dict[str, Any]) -> float:
    """Called by Sentry for each new transaction: probes untraced, WebSockets errors-only, else the rate."""
    rate = float(_state["traces_rate"])
    parent = sampling_context.get("parent_sampled")
    if parent is not None:
        return 1.0 if parent else 0.0
    scope = sampling_context.get("asgi_scope") or {}
    context = sampling_context.get("transaction_context") or {}
    if scope.get("type") == "websocket" or str(context.get("op", "")).startswith("websocket"):
        return WEBSOCKET_TRACES_SAMPLE_RATE
    path = scope.get("path") or ""
    if not path and "wsgi_environ" in sampling_context:
        path = sampling_context["wsgi_environ"].get("PATH_INFO", "")
    if path in UNTRACED_PATHS:
        return 0.0
    return rate


def init_sentry(
    *,
    dsn: str,
    environment: str,
    release: str,
    traces_sample_rate: float,
    profiles_sample_rate: float,
    transport: Any = None,
) -> bool:
    """Called at startup (settings) and by tests: initialise the SDK; False when no DSN is configured."""
    if not dsn:
        if not _state["disabled_logged"]:
            _state["disabled_logged"] = True
            logger.info("Sentry DSN not configured, error tracking disabled")
        return False
    import sentry_sdk
    from sentry_sdk.integrations.django import DjangoIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.integrations.redis import RedisIntegration

    options: dict[str, Any] = {
        "dsn": dsn,
        "environment": environment,
        "release": release or None,
        # send_default_pii is left unset, which means False: sentry-sdk ≥ 2.6x deprecates the option (a
        # DeprecationWarning when passed) in favour of data_collection, and treats "unset" as False.
        "traces_sampler": traces_sampler,
        "profiles_sample_rate": profiles_sample_rate,
        "integrations": [
            DjangoIntegration(),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
        "before_send": scrub_event,
        "before_send_transaction": scrub_event,
        "before_breadcrumb": filter_breadcrumb,
        # The Redis integration (on by default when redis is installed) wraps every command: a span, a
        # breadcrumb (dropped above) and scope copies, ~0.5 ms of loop CPU per command profiled, more than the
        # command itself; an admission issues a dozen (bench/storm.py --profile, docs/BENCHMARKS.md).
        "disabled_integrations": [RedisIntegration()],
        "max_request_body_size": "never",
    }
    if transport is not None:
        options["transport"] = transport
    _state["traces_rate"] = traces_sample_rate  # traces_sampler applies it (and wins over the option)
    sentry_sdk.init(**options)
    _state["initialised"] = True
    return True


def sentry_enabled() -> bool:
    """Called by asgi.py: True when init_sentry() initialised the SDK."""
    return _state["initialised"]


def wrap_websocket_app(app: Callable[..., Any]) -> Callable[..., Any]:
    """Called by asgi.py: the WebSocket app with a Sentry scope per connection (unchanged without Sentry).

    Each connection gets its own isolation scope whose events carry the (scrubbed) request data, and an
    exception escaping the consumer is reported; exceptions the consumer handles are logged with
    logger.exception and reported through the LoggingIntegration. Sentry's own ASGI middleware did the same
    plus, per connection, a release-health session, a continued trace and a transaction (never sampled for
    WebSockets: traces_sampler): in a reconnect storm that work, run for hundreds of connections in the same
    loop turns, doubled the live sessions' added latency (docs/BENCHMARKS.md, "Capacity v2").
    """
    if not sentry_enabled():
        return app
    return SentryWebSocketScope(app)


class SentryWebSocketScope:
    """ASGI wrapper: one Sentry isolation scope per WebSocket connection, and its escaping exceptions reported."""

    def __init__(self, app: Callable[..., Any]) -> None:
        from sentry_sdk.integrations.asgi import SentryAsgiMiddleware

        self.app = app
        # Only its event processor is used: it adds the request (URL, headers) to events, as before.
        self._request_data = SentryAsgiMiddleware(app, mechanism_type="asgi.websocket")

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> Any:
        """Called per connection."""
        import sentry_sdk
        from sentry_sdk.utils import event_from_exception

        with sentry_sdk.isolation_scope() as sentry_scope:
            sentry_scope.clear_breadcrumbs()
            sentry_scope.add_event_processor(
                lambda event, hint: self._request_data.event_processor(event, hint, asgi_scope=scope))
            try:
                return await self.app(scope, receive, send)
            except Exception as exc:
                event, hint = event_from_exception(exc, client_options=sentry_sdk.get_client().options,
                                                   mechanism={"type": "asgi.websocket", "handled": False})
                sentry_sdk.capture_event(event, hint=hint)
                raise
