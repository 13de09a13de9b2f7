"""`manage.py voice_health`: check the gateway's dependencies from the shell (deploy checks, debugging).

Required: the database, Redis (when REDIS_ENABLED) and the upstream (for VOICE_UPSTREAM=openai: a TCP
connection to the OPENAI_REALTIME_URL host and an API key configured). Optional: the knowledge backend
(sessions continue without retrieval), reported as a warning unless --strict. Never prints secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connection

from voice.realtime.models_catalog import realtime_model_problem, shutdown_warning, transcription_model_problem
from voice.services.stats import format_table, run_with_state
from voice.services.users import plan_policies
from voice.views.health import health_report

TIMEOUT_S = 3.0
OK, DOWN, WARN, SKIP = "ok", "down", "warn", "skipped"


def check_database() -> dict[str, Any]:
    """A trivial query on the default database."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        return {"status": DOWN, "detail": type(exc).__name__}
    return {"status": OK, "detail": connection.vendor}


async def check_upstream() -> dict[str, Any]:
    """The realtime upstream: local engine always OK; OpenAI: key configured and host reachable (TCP)."""
    if settings.VOICE_UPSTREAM != "openai":
        return {"status": OK, "detail": f"{settings.VOICE_UPSTREAM} engine (in process); {local_speech()}"}
    url = urlparse(settings.OPENAI_REALTIME_URL)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme in ("wss", "https") else 80)
    if not settings.OPENAI_API_KEY:
        return {"status": DOWN, "detail": "OPENAI_API_KEY is not set"}
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        return {"status": DOWN, "detail": f"{host}:{port} unreachable ({type(exc).__name__})"}
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return {"status": OK, "detail": f"{host}:{port} reachable"}


def local_speech() -> str:
    """What the local engine does with spoken turns (offline recognition is optional)."""
    from voice.realtime.engine.stt import unavailable_reason

    if settings.LOCAL_ENGINE_STT == "off":
        return "speech recognition off (LOCAL_ENGINE_STT)"
    reason = unavailable_reason("en")
    return "English speech recognised offline" if reason is None else f"speech not recognised: {reason}"


async def check_knowledge() -> dict[str, Any]:
    """The RAG backend's own health (guarded: the rag package may be absent or misconfigured)."""
    if settings.RAG_BACKEND == "off":
        return {"status": SKIP, "detail": "RAG_BACKEND=off"}
    try:
        from voice.rag import close_retriever, get_retriever
    except ImportError:
        return {"status": WARN, "detail": "voice.rag not available"}
    try:
        retriever = get_retriever()
        if retriever is None:
            return {"status": SKIP, "detail": "no retriever configured"}
        report = await asyncio.wait_for(retriever.health(), TIMEOUT_S * 2)
    except Exception as exc:  # noqa: BLE001 - a broken optional backend is reported, not raised
        return {"status": WARN, "detail": f"{settings.RAG_BACKEND}: {type(exc).__name__}"}
    finally:
        with contextlib.suppress(Exception):
            await close_retriever()
    status = OK if report.get("reachable") else WARN
    return {"status": status, "detail": f"{report.get('backend', settings.RAG_BACKEND)}, "
                                         f"documents={report.get('documents')}"}


def check_models() -> dict[str, Any]:
    """The OpenAI models each plan uses (its own or the environment default): DOWN when one has no price
    row, WARN when one shuts down within VOICE_MODEL_SHUTDOWN_WARN_DAYS (VOICE_MODEL_SHUTDOWNS)."""
    plans, problems, warnings = [], [], []
    for policy in sorted(plan_policies().values(), key=lambda p: p.code):
        profile = policy.realtime
        plans.append({"plan": policy.code, "voice_enabled": policy.voice_enabled, "model": profile.model,
                      "transcription_model": profile.transcription_model, "voice": profile.voice,
                      "vad": profile.vad_type})
        problems += [f"plan {policy.code}: {p}" for p in (realtime_model_problem(profile.model),
                                                          transcription_model_problem(profile.transcription_model))
                     if p]
        warnings += [w for w in (shutdown_warning(profile.model), shutdown_warning(profile.transcription_model))
                     if w and w not in warnings]
    if problems:
        status, detail = DOWN, "; ".join(problems)
    elif warnings:
        status, detail = WARN, "; ".join(warnings)
    else:
        status, detail = OK, f"{len({p['model'] for p in plans})} realtime model(s) in use, none near shutdown"
    return {"status": status, "detail": detail, "plans": plans}


class Command(BaseCommand):
    help = (
        "Check the database, Redis, the realtime upstream and the knowledge backend. Exit status 1 when a "
        "required dependency is down (with --strict, also when the knowledge backend is)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Called by Django to declare the command line."""
        parser.add_argument("--json", action="store_true", help="Print the checks as JSON.")
        parser.add_argument("--strict", action="store_true", help="Fail on warnings too.")

    def handle(self, *args, **options) -> None:
        """Called by Django with the parsed options; raises CommandError (exit status 1) on failure."""
        checks = {"database": check_database()}
        try:
            checks["models"] = check_models()
        except DatabaseError as exc:
            checks["models"] = {"status": DOWN, "detail": f"plans unreadable ({type(exc).__name__})", "plans": []}

        async def probe(_state: Any) -> dict[str, Any]:
            report, upstream, knowledge = await asyncio.gather(health_report(), check_upstream(),
                                                               check_knowledge())
            return {"report": report, "upstream": upstream, "knowledge": knowledge}

        result = run_with_state(probe)
        redis = result["report"]["redis"]
        if not redis["redis_enabled"]:
            checks["redis"] = {"status": SKIP, "detail": "REDIS_ENABLED=false (single instance only)"}
        elif redis["redis_available"]:
            master = f", master {redis['redis_master']}" if redis.get("redis_master") else ""  # sentinel mode
            switches = redis.get("master_switches") or []
            switched = f", last switch {switches[-1]['from']} → {switches[-1]['to']}" if switches else ""
            checks["redis"] = {"status": OK,
                               "detail": f"{redis['redis_url']} (v{redis['redis_version']}{master}{switched})"}
        else:
            checks["redis"] = {"status": DOWN, "detail": f"{redis['redis_url']} unreachable"}
        checks["upstream"] = result["upstream"]
        checks["knowledge"] = result["knowledge"]
        failed = [name for name, check in checks.items() if check["status"] == DOWN]
        if options["strict"]:
            failed += [name for name, check in checks.items() if check["status"] == WARN]
        if options["json"]:
            self.stdout.write(json.dumps({"checks": checks, "ok": not failed,
                                          "feature_enabled": settings.ENABLE_VOICE_REALTIME,
                                          "version": settings.APP_VERSION}, indent=2))
        else:
            for name, check in checks.items():
                style = {OK: self.style.SUCCESS, DOWN: self.style.ERROR, WARN: self.style.WARNING}.get(
                    check["status"], str)
                self.stdout.write(f"{name:<10} {style(check['status'].upper()):<8} {check['detail']}")
            if not settings.ENABLE_VOICE_REALTIME:
                self.stdout.write(self.style.WARNING("ENABLE_VOICE_REALTIME is off: voice is disabled."))
            self._models_table(checks["models"]["plans"])
        if failed:
            raise CommandError(f"unhealthy: {', '.join(failed)}")

    def _models_table(self, plans: list[dict[str, Any]]) -> None:
        rows = [("PLAN", "VOICE", "MODEL", "TRANSCRIPTION", "VOICE NAME", "VAD")]
        rows += [(p["plan"], "on" if p["voice_enabled"] else "off", p["model"], p["transcription_model"],
                  p["voice"], p["vad"]) for p in plans]
        self.stdout.write("\nModels per plan (empty plan fields use the environment defaults):")
        self.stdout.write(format_table(rows))
