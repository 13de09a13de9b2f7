"""`make run`'s demo URL carries the dev token in its fragment; the demo page signs in with it.

The browser part reuses test_browser.py's Chromium fixtures (skipped with their reason without Chromium).
"""

from __future__ import annotations

import io
import re

from django.core.management import call_command

from tests.test_answers import FR_QUESTION
from tests.test_answers_e2e import local_rag  # noqa: F401 - fixture
from tests.test_browser import (  # noqa: F401 - fixtures
    _wait_ready,
    browser_page,
    demo_server,
    demo_settings,
    needs_chromium,
)
from voice.services.auth import identity_from_jwt

DEMO_URL = re.compile(r"(http://\S+/voice/demo/)#token=(\S+)")


def test_demo_setup_prints_a_url_with_the_token_in_its_fragment(db) -> None:
    from tests.conftest import seed_plans

    seed_plans()
    out = io.StringIO()
    call_command("voice_demo_setup", "--host", "127.0.0.1", "--port", "8123", stdout=out)
    match = DEMO_URL.search(out.getvalue())
    assert match, out.getvalue()
    assert match.group(1) == "http://127.0.0.1:8123/voice/demo/"
    identity = identity_from_jwt(match.group(2))
    assert identity.user_id == "demo-user" and identity.plan == "elite"


@needs_chromium
def test_demo_url_with_the_token_signs_in_and_answers(local_rag, demo_server, browser_page, token_for) -> None:  # noqa: F811
    page = browser_page
    token = token_for()
    page.page.goto(f"{demo_server.http_url}/voice/demo/#token={token}")
    _wait_ready(page)
    assert token not in page.page.url and "#" not in page.page.url  # replaceState: gone from bar and history
    # The first click works: a typed question gets the knowledge base's answer, in French.
    page.page.get_by_label("Type a question").fill(FR_QUESTION)
    page.page.get_by_role("button", name="Send").click()
    page.wait_js(
        "[...document.querySelectorAll('#conversation .turn.assistant .text')]"
        ".some(p => p.textContent.includes('32–33 °C') && p.textContent.includes('poussins'))",
        30,
        "French answer with the day-one temperature",
    )
    page.page.get_by_role("button", name="Start talking").click()
    page.wait_js("window.voiceDemo.snapshot().micActive", 10, "microphone started")
    assert not page.errors, page.errors
    assert not page.csp_violations(), page.csp_violations()
