"""Observability: error tracking (Sentry), structured logs, and their one-call setup from settings."""

from __future__ import annotations

from typing import Any


def setup(namespace: dict[str, Any]) -> None:
    """Called once at the end of settings.py with its globals(): configure logs, then Sentry."""
    from voice.observability.logs import configure_logging
    from voice.observability.sentry import init_sentry

    configure_logging(namespace)
    init_sentry(
        dsn=namespace.get("SENTRY_DSN", ""),
        environment=namespace.get("SENTRY_ENVIRONMENT", "production"),
        release=namespace.get("APP_VERSION", ""),
        traces_sample_rate=namespace.get("SENTRY_TRACES_SAMPLE_RATE", 0.0),
        profiles_sample_rate=namespace.get("SENTRY_PROFILES_SAMPLE_RATE", 0.0),
    )
