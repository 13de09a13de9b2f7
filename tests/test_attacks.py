"""Issue 8 (attack surface): fuzzed client frames, JWT attacks, floods."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.live import VoiceClient
from voice.realtime.client_events import ClientEventError, parse_client_frame

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_UPSTREAM = {
    "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "conversation.item.create", "conversation.item.truncate", "response.cancel", "response.create",
    "gateway.feedback",
}
EVENT_TYPES = st.sampled_from(sorted(ALLOWED_UPSTREAM | {
    "session.update", "conversation.item.delete", "response.create", "transcription_session.update",
    "engine.test_hook", "x", "", "input_audio_buffer.append\x00"}))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


def _event_strategy():
    audio = st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
                      st.text(max_size=40), st.integers(), st.none())
    content = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["input_text", "input_audio", "x"]),
                                              "text": st.text(max_size=30), "audio": audio}), max_size=3)
    return st.fixed_dictionaries(
        {"type": EVENT_TYPES},
        optional={"audio": audio, "event_id": st.text(max_size=80) | st.integers(),
                  "item": st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                 "type": st.sampled_from(["message", "function_call"]),
                                                 "content": content | JSON}) | JSON,
                  "item_id": st.text(max_size=70) | JSON, "audio_end_ms": st.integers(-5, 10**9) | JSON,
                  "response": st.dictionaries(st.sampled_from(["instructions", "tools", "output_modalities",
                                                               "metadata", "voice"]), JSON, max_size=3) | JSON,
                  "session": JSON},
    )


FRAMES = st.one_of(
    _event_strategy().map(json.dumps),
    JSON.map(json.dumps),
    st.text(max_size=200),
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 3000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
)


@hsettings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FRAMES)
def test_fuzzed_frames_never_crash_and_only_allowlisted_events_pass(frame: str) -> None:
    try:
        event = parse_client_frame(frame)
    except ClientEventError as exc:
        assert exc.code in ("invalid_event", "event_not_allowed")
        assert exc.event()["type"] == "gateway.error"
        return
    assert event.type in ALLOWED_UPSTREAM
    if event.text is not None:  # what would be forwarded upstream
        forwarded = json.loads(event.text)
        assert forwarded["type"] in ALLOWED_UPSTREAM - {"gateway.feedback"}
        assert "instructions" not in event.text or event.type == "input_audio_buffer.append"
    if event.type == "conversation.item.create":
        assert event.data["item"]["role"] == "user"
        assert {p["type"] for p in event.data["item"]["content"]} <= {"input_text", "input_audio"}
    if event.type == "response.create":
        assert not set(event.data) - {"output_modalities"}


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
@pytest.mark.django_db(transaction=True)
async def test_fuzzed_frames_through_the_gateway(gateway, token_for, engine_spy) -> None:
    client = await VoiceClient.open(gateway.ws_url, token=token_for())
    await client.wait_for("gateway.session.ready")
    frames = [FRAMES.example() for _ in range(300)]
    for n, frame in enumerate(frames, 1):
        await client.send_raw(frame)
        if n % 40 == 0:
            await asyncio.sleep(0.45)
    await asyncio.sleep(0.5)
    assert {e["type"] for e in engine_spy} <= ALLOWED_UPSTREAM | {"session.update", "conversation.item.delete",
                                                                  "response.cancel"}
    assert sum(e["type"] == "session.update" for e in engine_spy) == 1  # only the gateway's own
    # Still usable (or closed with a documented code).
    if client.close_code is None:
        await client.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Biosecurity?"}]}})
        await client.send({"type": "response.create"})
        await client.wait_for("response.done", timeout=20)
    else:
        assert client.close_code in (1000, 4008, 4009, 1009)


@pytest.mark.django_db(transaction=True)
async def test_flood_is_cut_and_others_stay_responsive(gateway, token_for) -> None:
    victim = await VoiceClient.open(gateway.ws_url, token=token_for())
    await victim.wait_for("gateway.session.ready")
    flooder = await VoiceClient.open(gateway.ws_url, token=token_for())
    await flooder.wait_for("gateway.session.ready")
    frame = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0" * 1920).decode()})
    started = time.monotonic()
    try:
        for _ in range(3000):
            await flooder.send_raw(frame)
    except Exception:
        pass
    assert await flooder.wait_closed(5) == 4008
    assert (flooder.seen("gateway.error") or [{}])[-1].get("code") == "frame_rate_exceeded"
    await victim.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Lighting program?"}]}})
    await victim.send({"type": "response.create"})
    await victim.wait_for("response.created", timeout=5)
    assert time.monotonic() - started < 10
    await victim.close()


RSA_SNIPPET = r"""
import os, json, time, jwt
os.environ["DJANGO_SETTINGS_MODULE"] = "intelia_voice.settings"
import django; django.setup()
from voice.services.auth import identity_from_jwt, AuthError
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives import serialization
private = open(os.environ["PRIV_PATH"], "rb").read()
public = os.environ["JWT_VERIFYING_KEY"]
now = int(time.time())
claims = {"token_type": "access", "user_id": "u1", "jti": "j", "exp": now + 60, "iat": now,
          "aud": "intelia-voice", "iss": "intelia-expert"}
cases = {
    "valid_rs256": jwt.encode(claims, private, algorithm="RS256"),
    "hs256_with_public_key": jwt.api_jws.encode(json.dumps(claims).encode(), public.encode(), algorithm="HS256"),
    "wrong_audience": jwt.encode({**claims, "aud": "other"}, private, algorithm="RS256"),
    "wrong_issuer": jwt.encode({**claims, "iss": "evil"}, private, algorithm="RS256"),
    "no_audience": jwt.encode({k: v for k, v in claims.items() if k != "aud"}, private, algorithm="RS256"),
    "expired": jwt.encode({**claims, "exp": now - 5}, private, algorithm="RS256"),
}
out = {}
for name, token in cases.items():
    try:
        identity_from_jwt(token)
        out[name] = "accepted"
    except AuthError:
        out[name] = "refused"
print(json.dumps(out))
"""


def test_rs256_key_confusion_audience_and_issuer(tmp_path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    (tmp_path / "priv.pem").write_bytes(private)
    env = {**os.environ, "PRIV_PATH": str(tmp_path / "priv.pem"), "JWT_VERIFYING_KEY": public,
           "JWT_SIGNING_KEY": private.decode(), "JWT_AUDIENCE": "intelia-voice", "JWT_ISSUER": "intelia-expert"}
    # PyJWT refuses to HMAC-sign with a PEM key; the attacker's token is built by hand instead.
    snippet = RSA_SNIPPET.replace(
        'jwt.api_jws.encode(json.dumps(claims).encode(), public.encode(), algorithm="HS256")',
        '__import__("tests.test_attacks", fromlist=["x"]).hs256_forge(claims, public)')
    out = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"valid_rs256": "accepted", "hs256_with_public_key": "refused", "wrong_audience": "refused",
                      "wrong_issuer": "refused", "no_audience": "refused", "expired": "refused"}


def hs256_forge(claims: dict, secret: str) -> str:
    """An HS256 token signed with the RS256 public key as the HMAC secret (the classic confusion attack)."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)
