"""The whole-suite secret scan (tests/secret_scan.py) catches a leak in each recording, and its recorders
are wired: Django responses, Sentry envelopes (after scrubbing) and VoiceClient events reach the files."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import sentry_sdk
from django.http import HttpResponse, StreamingHttpResponse
from django.test import RequestFactory
from sentry_sdk.envelope import Envelope

from tests import secret_scan, test_ops_sentry
from tests.test_ops_sentry import JWT, SK

capture = test_ops_sentry.capture  # the Sentry fixture (a capturing transport), shared


def _lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def test_scan_catches_a_leak_in_each_source(tmp_path):
    suite, sentry, responses = tmp_path / "suite.log", tmp_path / "sentry.jsonl", tmp_path / "responses.log"
    suite.write_text("INFO voice.consumers session started\nWARNING redis://:hunter2@127.0.0.1:6379/0 down\n")

    envelope = Envelope()
    envelope.add_event({"event_id": "0" * 32, "message": "clean", "extra": {"auth": f"Bearer {JWT}"}})
    secret_scan.record_envelope(envelope, path=sentry)

    request = RequestFactory().get("/v1/voice/stats", {"token": JWT})  # a secret in the request: not recorded
    secret_scan.record_http(request, HttpResponse('{"status": "ok"}', content_type="application/json"),
                            path=responses)
    assert secret_scan.scan(responses)[1] == []
    secret_scan.record_http(request, StreamingHttpResponse(iter([JWT])), path=responses)  # body skipped
    assert secret_scan.scan(responses)[1] == []
    leaky = HttpResponse("{}")
    leaky["Location"] = f"/next?token={JWT}"
    secret_scan.record_http(request, leaky, path=responses)
    secret_scan.record_ws("<-", json.dumps({"type": "gateway.error", "message": f"upstream refused {SK}"}),
                          path=responses)

    assert secret_scan.scan(suite) == (2, [f"suite.log:2: {_lines(suite)[1]}"])
    lines, hits = secret_scan.scan(sentry)
    assert lines >= 3 and len(hits) == 1 and hits[0].startswith("sentry.jsonl:") and JWT in hits[0]
    lines, hits = secret_scan.scan(responses)
    assert [hit.split(":")[0] for hit in hits] == ["responses.log", "responses.log"]
    assert "Location: /next?token=" in hits[0] and SK in hits[1]
    assert "stats?token" not in responses.read_text()  # the request's query string is never written


def test_report_fails_the_run_and_names_file_and_line(tmp_path, capsys):
    leak = tmp_path / "responses.log"
    leak.write_text("=== http 200 GET /x\nclean\n" + JWT + "\n")

    no_reporter = SimpleNamespace(get_plugin=lambda name: None)  # falls back to print
    session = SimpleNamespace(exitstatus=0, config=SimpleNamespace(pluginmanager=no_reporter))
    secret_scan.report(session, [leak])
    out = capsys.readouterr().out
    assert session.exitstatus == 1
    assert "SECRET SCAN FAILED" in out and "responses.log:3:" in out
    assert "secret scan: responses.log 3 lines" in out


def test_django_responses_are_recorded(client, db):
    before = len(_lines(secret_scan.recording(secret_scan.RESPONSES)))
    client.get("/v1/voice/health", {"token": JWT})
    recorded = _lines(secret_scan.recording(secret_scan.RESPONSES))[before:]
    assert recorded[0] == "=== http 200 GET /v1/voice/health"
    assert any(line.startswith("Content-Type: application/json") for line in recorded)
    assert JWT not in "\n".join(recorded)


async def test_async_django_responses_are_recorded(async_client, db):
    before = len(_lines(secret_scan.recording(secret_scan.RESPONSES)))
    await async_client.post("/v1/voice/ticket", headers={"Authorization": f"Bearer {JWT}"})
    assert _lines(secret_scan.recording(secret_scan.RESPONSES))[before] == "=== http 401 POST /v1/voice/ticket"


def test_sentry_envelopes_are_recorded_after_scrubbing(capture):
    before = len(_lines(secret_scan.recording(secret_scan.SENTRY)))
    logging.getLogger("voice.consumers").error("secret-scan probe: upstream refused %s for %s", SK, JWT)
    sentry_sdk.flush()
    assert capture.envelopes  # the test's own transport still receives everything
    recorded = "\n".join(_lines(secret_scan.recording(secret_scan.SENTRY))[before:])
    assert "secret-scan probe: upstream refused" in recorded
    assert "sk-***" in recorded and SK not in recorded and JWT not in recorded  # the scrubbed event


async def test_voice_client_events_are_recorded(gateway):
    from tests.live import VoiceClient

    before = len(_lines(secret_scan.recording(secret_scan.RESPONSES)))
    client = await VoiceClient.open(gateway.ws_url, token="not-a-jwt")
    assert (await client.wait_for("gateway.error"))["code"] == "unauthorized"
    code = await client.wait_closed()
    recorded = _lines(secret_scan.recording(secret_scan.RESPONSES))[before:]
    assert any(line.startswith("ws <- ") and '"unauthorized"' in line for line in recorded)
    assert any(line.startswith(f"ws close {code} ") for line in recorded)


def test_an_api_key_is_matched_where_it_starts_a_token_never_inside_a_signature(tmp_path):
    # stop 25's CI: a resume token whose Django signature happened to contain "sk-" and 8 more URL-safe
    # characters failed the run; the designed credential stays scanned, a real key is still caught
    responses = tmp_path / "responses.log"
    signed = "eyJzIjoiMTcyN2JmMGQifQ:1xZUUY:RJ5nQwsk-Tq3vXz0aB9cD8eF7gH6iJ5kL4mN3oP2q"
    secret_scan.record_ws("<-", json.dumps({"type": "gateway.session.ready", "resume_token": signed}),
                          path=responses)
    assert secret_scan.scan(responses)[1] == []
    for leak in (SK, f"key={SK}", f'"{SK}"', f"Bearer {SK}", f"/{SK}"):
        secret_scan.record_ws("<-", json.dumps({"type": "gateway.error", "message": leak}), path=responses)
    assert len(secret_scan.scan(responses)[1]) == 5
