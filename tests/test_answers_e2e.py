"""Issue 16 acceptance: a typed question through the real gateway, local engine and local RAG gets a
grounded answer in its own language, spoken with the voice of that language."""

from __future__ import annotations

import asyncio

import pytest

from tests.live import LiveServer, VoiceClient
from tests.test_answers import EN_QUESTION, FR_DOC, FR_QUESTION
from voice.realtime.engine import tts
from voice.realtime.engine.language import detect_language

pytestmark = pytest.mark.django_db(transaction=True)

EN_DOC = "Brooding temperature for broiler chicks by age"


@pytest.fixture
def local_rag(settings, tmp_path):
    """The bundled knowledge base in a fresh local index (seeded on first use)."""
    settings.RAG_LOCAL_INDEX = str(tmp_path / "knowledge.sqlite3")
    from voice.rag import reset_retrievers

    reset_retrievers()
    yield
    reset_retrievers()


async def _typed_turn(client: VoiceClient, text: str) -> tuple[dict, str]:
    """Send a typed question as the demo page does; returns (gateway.rag.context, spoken answer)."""
    await client.send(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
        }
    )
    await client.send({"type": "response.create"})
    context = await client.wait_for("gateway.rag.context", timeout=20)
    done = await client.wait_for("response.done", timeout=60)
    assert done["response"]["status"] == "completed", done["response"]
    content = done["response"]["output"][0]["content"][0]
    return context, content.get("transcript") or content.get("text") or ""


@pytest.mark.parametrize(
    ("question", "language", "document"),
    [
        (FR_QUESTION, "fr", FR_DOC),
        (EN_QUESTION, "en", EN_DOC),
    ],
)
async def test_typed_question_gets_the_day_one_temperature_in_its_language(
    live_db, local_rag, token_for, question: str, language: str, document: str
) -> None:
    server = LiveServer().start()
    try:
        client = await VoiceClient.open(server.ws_url, token=token_for())
        await client.wait_for("gateway.session.ready")
        context, answer = await _typed_turn(client, question)
        assert context["injected"] is True and context["sources"][0]["title"] == document
        assert "32–33 °C" in answer, answer  # day-one row / practice sentence of that document
        assert detect_language(answer) == language, answer
        assert not answer.startswith("Here is what I found"), answer
        if tts.espeak_path() is not None:  # the engine (in this process) spoke it with that language's voice
            assert any(key[0] == answer and key[2] == tts.espeak_voice(language) for key in list(tts._cache))
        await client.close()
        await asyncio.sleep(0.2)
    finally:
        server.stop()
