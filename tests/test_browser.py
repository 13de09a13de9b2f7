"""The chat UI's voice client in a real browser: Chromium (Debian package) driven by Playwright.

The demo page (/voice/demo/) and voice-client.js run against a real gateway (uvicorn LiveServer, local
realtime engine) with DEBUG off, static files served by WhiteNoise. Chromium's fake capture device plays
a recorded question as the microphone (looped), so the whole path is exercised: getUserMedia →
AudioWorklet resampling → 40 ms pcm16 frames → server VAD → answer audio → jitter-buffered playback.

Sync Playwright in sync tests: the LiveServer runs in its own thread, and no ORM call happens while
Playwright's loop is alive (the fixtures tear the browser down before the database is flushed).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AUDIO

CHROMIUM = Path("/usr/bin/chromium")
FAKE_MIC_WAV = AUDIO / "en_brooding_temperature.wav"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.browser
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() or not AUDIO.is_dir(),
    reason="needs Chromium at /usr/bin/chromium (scripts/ensure-browser.sh installs the Debian package)"
    " and ../shared/audio (the microphone recording)",
)


def _manifest_transcript(name: str) -> str:
    manifest = json.loads((AUDIO / "manifest.json").read_text(encoding="utf-8"))
    return next(f["transcript"] for f in manifest["files"] if f["file"] == name)


@pytest.fixture
def demo_settings(settings, tmp_path):
    """Settings the server must see before it starts: demo on, DEBUG off, scripted transcripts."""
    script = tmp_path / "engine-script.json"
    script.write_text(json.dumps([_manifest_transcript(FAKE_MIC_WAV.name)]), encoding="utf-8")
    settings.DEBUG = False
    settings.VOICE_DEMO_ENABLED = True
    settings.LOCAL_ENGINE_SCRIPT = str(script)
    return settings


@pytest.fixture
def demo_server(demo_settings, live_db):
    from tests.live import LiveServer

    server = LiveServer().start()
    yield server
    server.stop()


class BrowserPage:
    """A Chromium page plus what it logged (console errors, CSP violations, page errors)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.console: list[str] = []
        self.errors: list[str] = []
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def snapshot(self) -> dict[str, Any]:
        return self.page.evaluate("window.voiceDemo.snapshot()")

    def events(self) -> list[str]:
        return self.page.evaluate("window.voiceDemo.events.slice()")

    def wait_js(self, expression: str, timeout: float = 15, what: str = "") -> None:
        """Poll a JS expression until truthy. (Not wait_for_function: the page's CSP forbids the eval
        it relies on, while page.evaluate goes through the DevTools protocol.)"""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.page.evaluate(expression):
                    return
            except Exception as exc:
                last = repr(exc)
            else:
                last = "falsy"
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what or expression} ({last})\nsnapshot={self._safe_snapshot()}\n"
                    f"events={self._safe_events()[-40:]}\nconsole={self.console[-20:]}\nerrors={self.errors}"
                )
            self.page.wait_for_timeout(100)

    def _safe_snapshot(self) -> Any:
        try:
            return self.snapshot()
        except Exception as exc:
            return repr(exc)

    def _safe_events(self) -> list[str]:
        try:
            return self.events()
        except Exception:
            return []

    def dataset(self, key: str) -> str | None:
        return self.page.evaluate(f"document.getElementById('voice-demo').dataset.{key} ?? null")

    def csp_violations(self) -> list[str]:
        return [line for line in self.console if "Content Security Policy" in line]


@contextlib.contextmanager
def open_browser_page(server, microphone_wav: Path) -> Iterator[BrowserPage]:
    """A fresh phone-sized Chromium page whose microphone plays `microphone_wav` (looped)."""
    from playwright.sync_api import sync_playwright

    args = [
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={microphone_wav}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args, headless=True)
        try:
            origin = server.http_url
            context = browser.new_context(viewport={"width": 390, "height": 844},  # a phone-sized screen
                                          permissions=["microphone"])
            context.grant_permissions(["microphone"], origin=origin)
            page = BrowserPage(context.new_page())
            page.page.set_default_timeout(15_000)
            yield page
            context.close()
        finally:
            browser.close()


@pytest.fixture
def browser_page(demo_server) -> Iterator[BrowserPage]:
    """A fresh Chromium whose microphone is the recorded question (torn down before the DB flush)."""
    with open_browser_page(demo_server, FAKE_MIC_WAV) as page:
        yield page


def _demo_url(server, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{server.http_url}/voice/demo/" + (f"?{query}" if query else "")


def _wait_ready(page: BrowserPage, timeout: float = 15) -> None:
    page.wait_js("document.getElementById('voice-demo').dataset.state === 'ready'", timeout, "session ready")


def test_demo_is_404_when_disabled(db, settings, client) -> None:
    settings.DEBUG = False
    settings.VOICE_DEMO_ENABLED = False
    assert client.get("/voice/demo/").status_code == 404
    settings.VOICE_DEMO_ENABLED = True
    response = client.get("/voice/demo/")
    assert response.status_code == 200
    assert "script-src 'self'" in response["Content-Security-Policy"]
    assert b"<script>" not in response.content  # no inline script: config is in data- attributes


@needs_chromium
def test_spoken_turn_in_the_browser(demo_server, browser_page, token_for) -> None:
    page = browser_page
    token = token_for()
    page.page.goto(_demo_url(demo_server, token=token))
    # Static files (ES modules, worklet, CSS) load through WhiteNoise with DEBUG off.
    page.wait_js("document.getElementById('voice-demo').dataset.loaded === 'true'", 10, "demo.js loaded")
    _wait_ready(page)
    assert "token=" not in page.page.url  # removed from the address bar (and the history entry)
    assert page.page.get_by_role("status").first.inner_text() in ("Connected", "Connected, preparing the session…")

    page.page.get_by_role("button", name="Start talking").click()
    page.wait_js("window.voiceDemo.snapshot().micActive", 10, "microphone started")
    page.wait_js("window.voiceDemo.events.includes('input_audio_buffer.speech_started')", 15, "speech_started")
    page.wait_js("window.voiceDemo.events.includes('input_audio_buffer.speech_stopped')", 15, "speech_stopped")
    # The scripted transcript (the engine cannot recognise speech) shows as the user's words.
    page.wait_js(
        "[...document.querySelectorAll('#conversation .turn.user .text')]"
        ".some(p => p.textContent.includes('ideal brooding temperature'))", 15, "user transcript",
    )
    page.wait_js("window.voiceDemo.snapshot().counters.audioChunksReceived > 0", 15, "answer audio received")
    page.wait_js("window.voiceDemo.snapshot().counters.audioMsPlayed > 150", 15, "answer audio played")
    page.wait_js("document.querySelectorAll('#latency li').length > 0", 5, "turn latency shown")
    page.wait_js(
        "[...document.querySelectorAll('#conversation .turn.assistant .text')].some(p => p.textContent.length > 10)",
        15, "assistant transcript",
    )

    page.wait_js("window.voiceDemo.events.includes('response.done')", 15, "answer complete")

    snap = page.snapshot()
    counters = snap["counters"]
    assert counters["framesSent"] > 50, counters  # 40 ms frames for several seconds of speech
    assert counters["audioMsReceived"] >= counters["audioMsPlayed"] > 0, counters
    assert snap["sessionId"] == page.dataset("sessionId")
    latency = page.page.locator("#latency li").first.inner_text()
    assert re.fullmatch(r"\d+ ms", latency), latency
    assert int(latency.split()[0]) < 5000
    level = float(page.page.locator("#level").get_attribute("value") or 0)
    assert 0 <= level <= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.page.screenshot(path=str(ARTIFACTS / "browser-demo.png"), full_page=True)
    assert not page.errors, page.errors
    assert not page.csp_violations(), page.csp_violations()


@needs_chromium
def test_refusals_show_their_message(demo_settings, demo_server, browser_page, token_for) -> None:
    demo_settings.MAX_SESSIONS_PER_USER_PER_HOUR = 1
    from voice.services.users import plan_cache_clear

    plan_cache_clear()
    page = browser_page
    user = f"browser-rate-{time.time_ns()}"
    page.page.goto(_demo_url(demo_server))
    page.wait_js("document.getElementById('voice-demo').dataset.loaded === 'true'", 10, "demo.js loaded")

    # First session (ticket auth): uses the hourly quota of 1, then ends with a rating over HTTP.
    page.page.get_by_label("Access token (JWT)").fill(token_for(user_id=user))
    page.page.get_by_label("How the token is sent").select_option("ticket")
    page.page.get_by_role("button", name="Connect").click()
    _wait_ready(page)
    page.page.get_by_role("button", name="End session").click()
    feedback = page.page.locator("#feedback")
    feedback.wait_for(state="visible")
    feedback.locator("label[for=star-4]").click()
    page.page.get_by_label("Comment (optional)").fill("Clear answers")
    page.page.get_by_role("button", name="Send feedback").click()
    page.wait_js("document.getElementById('feedback-status').textContent.includes('Thank you')", 10, "feedback sent")
    page.page.get_by_role("button", name="Start a new session").click()

    # Second session within the hour: refused with the rate-limit message, no automatic retry.
    page.page.get_by_role("button", name="Connect").click()
    alert = page.page.get_by_role("alert").filter(has_text="limit")
    alert.wait_for(state="visible")
    assert re.search(r"try again in \d+ min", alert.inner_text()), alert.inner_text()
    assert page.dataset("refusal") == "rate_limited"
    time.sleep(1.0)
    assert page.snapshot()["counters"]["reconnects"] == 0
    assert page.page.get_by_role("button", name="Connect").is_visible()

    # A plan without voice.
    page.page.get_by_label("Access token (JWT)").fill(token_for(plan="pro"))
    page.page.get_by_label("How the token is sent").select_option("subprotocol")
    page.page.get_by_role("button", name="Connect").click()
    page.page.get_by_role("alert").filter(has_text="Voice is reserved for the Elite and Intelia plans").wait_for()
    assert page.dataset("refusal") == "plan_not_allowed"
    assert not page.errors, page.errors


@needs_chromium
def test_server_restart_is_resumed_without_user_action(demo_server, browser_page, token_for) -> None:
    from tests.live import LiveServer

    page = browser_page
    page.page.goto(_demo_url(demo_server, token=token_for()))
    _wait_ready(page)
    session_id = page.dataset("sessionId")
    page.page.get_by_role("button", name="Start talking").click()
    page.wait_js("window.voiceDemo.snapshot().counters.framesSent > 10", 10, "audio streaming")

    port = demo_server.port
    demo_server.stop()  # graceful: gateway.session.draining, then close 4012
    page.wait_js("window.voiceDemo.events.includes('gateway.session.draining')", 5, "draining event")
    restarted = LiveServer(port=port).start()
    try:
        page.wait_js(
            f"(() => {{ const d = document.getElementById('voice-demo').dataset;"
            f" return d.state === 'ready' && d.resumed === 'true' && d.sessionId === '{session_id}'; }})()",
            20, "resumed session",
        )
        snap = page.snapshot()
        assert snap["sessionId"] == session_id and snap["resumed"] is True
        assert snap["counters"]["reconnects"] >= 1
        assert page.page.locator("#resumed").inner_text() == "yes"
        # Capture was active: it restarts by itself and audio flows to the new server.
        frames = snap["counters"]["framesSent"]
        page.wait_js(
            f"(s => s.micActive && s.counters.framesSent > {frames + 10})(window.voiceDemo.snapshot())",
            10, "capture restarted after resume",
        )
        assert not page.page.locator("#alert").is_visible()
        assert not page.errors, page.errors
    finally:
        restarted.stop()
