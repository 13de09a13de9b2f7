"""Whole-suite secret scan: nothing the gateway emits during the tests may carry a credential.

Three recordings are made during the session and searched at its end (tests/conftest.py wires the
hooks); any secret-shaped line fails the run:

- suite.log: every log line, through a copy of the project's own console handler (same filters and
  formatter);
- sentry.jsonl: every Sentry envelope, in its wire format (JSON lines), as the client hands it to its
  transport, i.e. after `before_send` scrubbing: exactly what would leave the process;
- responses.log: every HTTP response Django serves (Django test client and the live servers, sync and
  async: headers, cookies and body; streaming bodies are skipped), and every WebSocket event, close
  reason and refused handshake the gateway sends to tests.live.VoiceClient.

Tests deliberately send JWTs, API keys and Redis passwords in requests (query strings, subprotocols,
headers, bodies); requests are never recorded, only what the server emits.

Each session records into its own var/test-logs/.run-<pid>/ (two pytest runs in one checkout must not
truncate each other's files); after the scan the files are moved to var/test-logs/.

Credentials issued by design: POST /v1/voice/ticket returns a single-use ticket to the authenticated
caller, and the WebSocket's gateway.session.ready carries the session's resume token. Neither matches a
pattern (an opaque `token_urlsafe` value; a Django-signed `eyJ…:…:…` value, one JSON segment, not a
JWT; an API key is only matched where it starts a token, since a signature's URL-safe characters may
spell `sk-…`), so nothing is excluded and both stay fully scanned. Should a pattern ever match such a designed
value, exclude that one field of that one endpoint here, with its reason, and keep everything else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

LOG_DIR = Path(__file__).resolve().parent.parent / "var" / "test-logs"
SUITE, SENTRY, RESPONSES = "suite.log", "sentry.jsonl", "responses.log"

SECRET_PATTERNS = [
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # a JWT
    # an API key; never the middle of a longer token: a Django signature or a token_urlsafe value may
    # hold "sk-" followed by 8 URL-safe characters (about 1 resume token in 3,000 does)
    re.compile(r"(?<![A-Za-z0-9_-])sk-(?!\*\*\*)[A-Za-z0-9_-]{8,}"),
    re.compile(r"topsecret|hunter2"),  # the Redis passwords tests use
    re.compile(r"[?&](?:token|ticket|resume)=(?!\*\*\*)[A-Za-z0-9._~-]{16,}"),
]
SCANNED_LOGGERS = ("", "uvicorn.access", "uvicorn.error", "django.channels.server", "daphne", "websockets")

_lock = threading.Lock()  # live servers record from their own threads
_run_dir: Path | None = None  # this session's private recordings; None outside a session: nothing recorded
_log_handler: logging.Handler | None = None


def recording(name: str) -> Path | None:
    """This session's recording file `name` (SUITE, SENTRY or RESPONSES)."""
    return _run_dir / name if _run_dir is not None else None


def append(path: Path | None, text: str) -> None:
    if path is None:
        return
    # FileNotFoundError: a straggling server thread racing the session's finish; nothing is scanned any more
    with _lock, contextlib.suppress(FileNotFoundError), path.open("a", encoding="utf-8", errors="replace") as out:
        out.write(text if text.endswith("\n") else text + "\n")


# --- recorders ---------------------------------------------------------------------------------------
def record_http(request: Any, response: Any, path: Path | None = None) -> None:
    """One Django response: status line (path without its query string: that is request data), headers,
    cookies, body."""
    lines = [f"=== http {response.status_code} {request.method} {request.path}"]
    lines += [f"{name}: {value}" for name, value in response.items()]
    lines += [f"Set-Cookie: {morsel.OutputString()}" for morsel in response.cookies.values()]
    if getattr(response, "streaming", False):
        lines.append("<streaming body not recorded>")
    else:
        lines.append(bytes(response.content).decode("utf-8", errors="replace"))
    append(path or recording(RESPONSES), "\n".join(lines))


def record_ws(kind: str, data: str | bytes, path: Path | None = None) -> None:
    """One thing the gateway sent a WebSocket client: an event (`<-`) or its close (`close`)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    append(path or recording(RESPONSES), f"ws {kind} {text}")


def record_refused_handshake(response: Any, path: Path | None = None) -> None:
    """A WebSocket handshake the server answered with an HTTP error (websockets' Response)."""
    lines = [f"=== ws handshake {response.status_code}"]
    lines += [f"{name}: {value}" for name, value in response.headers.raw_items()]
    lines.append((response.body or b"").decode("utf-8", errors="replace"))
    append(path or recording(RESPONSES), "\n".join(lines))


def record_envelope(envelope: Any, path: Path | None = None) -> None:
    """One Sentry envelope as it would be sent: envelope header, then item headers and payloads."""
    append(path or recording(SENTRY), envelope.serialize().decode("utf-8", errors="replace"))


# --- installation (session start) -------------------------------------------------------------------
def _install_http_recorder() -> None:
    """Wrap BaseHandler.get_response(_async): every Django handler (test clients, ASGI) goes through them."""
    from django.core.handlers.base import BaseHandler

    if getattr(BaseHandler.get_response, "_secret_scan", False):
        return
    sync_get, async_get = BaseHandler.get_response, BaseHandler.get_response_async

    def get_response(self, request):
        response = sync_get(self, request)
        record_http(request, response)
        return response

    async def get_response_async(self, request):
        response = await async_get(self, request)
        record_http(request, response)
        return response

    get_response._secret_scan = get_response_async._secret_scan = True
    BaseHandler.get_response, BaseHandler.get_response_async = get_response, get_response_async


def _install_sentry_recorder() -> None:
    """Wrap the transport of every Sentry client created during the suite (whatever transport a test
    passes): the client calls transport.capture_envelope only after before_send has scrubbed the event."""
    import sentry_sdk.client

    make_transport = sentry_sdk.client.make_transport  # AttributeError: the SDK moved it, adapt here
    if getattr(make_transport, "_secret_scan", False):
        return

    def recording_make_transport(options):
        transport = make_transport(options)
        if transport is not None and not getattr(transport, "_secret_scan", False):
            send = transport.capture_envelope

            def capture_envelope(envelope):
                record_envelope(envelope)
                return send(envelope)

            transport.capture_envelope = capture_envelope
            transport._secret_scan = True
        return transport

    recording_make_transport._secret_scan = True
    sentry_sdk.client.make_transport = recording_make_transport


def _remove_abandoned_runs() -> None:
    """Private directories of sessions that were killed before their finish."""
    for run in LOG_DIR.glob(".run-*"):
        pid = run.name.removeprefix(".run-")
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(run, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def start() -> None:
    """pytest_sessionstart: a private, empty recording directory, and the recorders installed."""
    global _run_dir, _log_handler
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_runs()
    _run_dir = LOG_DIR / f".run-{os.getpid()}"
    _run_dir.mkdir(exist_ok=True)
    for name in (SUITE, SENTRY, RESPONSES):
        (_run_dir / name).write_text("")
    # Append mode: Django's logging setup closes existing handlers; an "a" handler reopens on next use.
    _log_handler = logging.FileHandler(_run_dir / SUITE, mode="a", encoding="utf-8")
    _log_handler.setLevel(logging.DEBUG)
    _install_http_recorder()
    _install_sentry_recorder()


def attach_log_handler() -> None:
    """(Re)attach the log handler before each test: Django's setup re-applies LOGGING, which drops it."""
    if _log_handler is None:
        return
    import intelia_voice.asgi  # noqa: F401 - its django.setup() re-applies LOGGING: do it before attaching

    template = next((h for h in logging.getLogger().handlers if getattr(h, "name", "") == "console"), None)
    if template is not None:
        _log_handler.filters = list(template.filters)
        _log_handler.setFormatter(template.formatter)
    for name in SCANNED_LOGGERS:
        logger = logging.getLogger(name)
        if _log_handler not in logger.handlers:
            logger.addHandler(_log_handler)


# --- scan (session finish) --------------------------------------------------------------------------
def scan(path: Path) -> tuple[int, list[str]]:
    """(lines scanned, hits as `file:line: text`)."""
    count, hits = 0, []
    if not path.exists():
        return 0, []
    with path.open(encoding="utf-8", errors="replace") as recorded:
        for count, line in enumerate(recorded, 1):
            if any(pattern.search(line) for pattern in SECRET_PATTERNS):
                hits.append(f"{path.name}:{count}: {line.strip()[:300]}")
    return count, hits


def report(session: Any, paths: list[Path]) -> None:
    """Scan `paths`, print one summary line (lines per file), and on any hit name file and line and set
    the session's exit status to 1."""
    counts, hits = [], []
    for path in paths:
        lines, found = scan(path)
        counts.append(f"{path.name} {lines} lines")
        hits += found
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter is not None else print
    write("")
    if hits:
        write(f"SECRET SCAN FAILED: secret-shaped text in {LOG_DIR} ({len(hits)} lines):")
        for hit in hits[:30]:
            write(f"  {hit}")
        session.exitstatus = 1
    write(f"secret scan: {', '.join(counts)}: {len(hits)} secret-shaped lines")


def finish(session: Any) -> None:
    """pytest_sessionfinish: stop recording logs, scan the three recordings, move them to var/test-logs/."""
    global _log_handler, _run_dir
    if _log_handler is None or _run_dir is None:
        return
    for name in SCANNED_LOGGERS:
        logging.getLogger(name).removeHandler(_log_handler)
    _log_handler.close()
    _log_handler = None
    run_dir, _run_dir = _run_dir, None
    names = (SUITE, SENTRY, RESPONSES)
    report(session, [run_dir / name for name in names])
    for name in names:
        os.replace(run_dir / name, LOG_DIR / name)
    shutil.rmtree(run_dir, ignore_errors=True)
