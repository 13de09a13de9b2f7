"""Loaded first (pytest -p tests._env): test defaults set before Django settings are imported.

A developer's .env or shell must not change what the tests see; explicit CI overrides (DATABASE_URL
for the PostgreSQL run) still win because these are defaults.
"""

import os

os.environ.setdefault("ENABLE_VOICE_REALTIME", "true")
os.environ.setdefault("VOICE_UPSTREAM", "local")
os.environ["OPENAI_API_KEY"] = ""
os.environ.setdefault("RAG_BACKEND", "local")
os.environ["SENTRY_DSN"] = ""
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("DEBUG", "false")
os.environ.setdefault("LOG_FORMAT", "console")
