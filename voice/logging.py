"""Log redaction: secrets (JWTs, API keys, Redis passwords, auth query parameters) never reach a log line."""

from __future__ import annotations

import logging
import re

# ?token=…, &ticket=…, &resume=… in any URL or access-log line.
_QUERY_SECRET = re.compile(r"(?i)([?&](?:token|ticket|resume|access_token|key)=)[^&\s\"']+")
# Anything shaped like a JWT (three base64url segments, header starting with eyJ).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
# OpenAI-style API keys.
_API_KEY = re.compile(r"sk-[A-Za-z0-9_-]{8,}")
# Passwords in URLs: scheme://user:password@host
_URL_PASSWORD = re.compile(r"(\w+://[^:/\s@]*:)[^@\s/]+(@)")
# Bearer credentials in headers.
_BEARER = re.compile(r"(?i)(bearer[ .])[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """Return `text` with every secret-looking substring replaced by ***."""
    if not text:
        return text
    text = _QUERY_SECRET.sub(r"\1***", text)
    text = _JWT.sub("***", text)
    text = _API_KEY.sub("sk-***", text)
    text = _URL_PASSWORD.sub(r"\1***\2", text)
    return _BEARER.sub(r"\1***", text)


def mask_url_password(url: str) -> str:
    """Return `url` with its password (if any) replaced by ***, for health output."""
    return _URL_PASSWORD.sub(r"\1***\2", url)


class RedactSecretsFilter(logging.Filter):
    """Rewrites each record's message (with its args applied) through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not drop the record
            message = str(record.msg)
        try:
            cleaned = redact(message)
        except Exception:  # noqa: BLE001 - interpreter shutdown: drop the record rather than risk it
            return False
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True
