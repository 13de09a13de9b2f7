"""Django settings for Intelia Voice, read from the environment (django-environ).

Every variable is documented in `.env.example` with its default and meaning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# A .env file is read when present; real environment variables win over it.
if (BASE_DIR / ".env").is_file():
    env.read_env(str(BASE_DIR / ".env"), overwrite=False)

# --- Django core -------------------------------------------------------------------------------
SECRET_KEY = env.str("SECRET_KEY", default="dev-insecure-change-me-0123456789abcdef0123456789abcdef")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
APP_VERSION = env.str("APP_VERSION", default="0.1.0")
INSTANCE_ID = env.str("INSTANCE_ID", default="")  # empty: hostname:pid, see voice.services.instance

INSTALLED_APPS = [
    "daphne",  # provides the ASGI `runserver`
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "voice",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "intelia_voice.urls"
ASGI_APPLICATION = "intelia_voice.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ----------------------------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'var' / 'db.sqlite3'}")}
# Under ASGI every request/consumer runs in its own thread context: persistent connections leak.
DATABASES["default"]["CONN_MAX_AGE"] = 0
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL + a busy timeout let the relay's metrics writes and the admin coexist.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        # IMMEDIATE: a transaction that reads then writes would otherwise fail at once with
        # "database is locked" (no busy wait on a read→write upgrade) when instances write together.
        {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE"}
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file (not in-memory) test database: live-server threads and subprocess servers share it.
    # One per test process, so concurrent test runs never share (and destroy) each other's database.
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / "var" / f"test_db_{os.getpid()}.sqlite3")}
(BASE_DIR / "var").mkdir(exist_ok=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / env.str("STATIC_ROOT", default="var/static")  # relative paths: under the project
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns about a missing root on every start
# WhiteNoise serves static files in every mode, so any ASGI server works without nginx. Its file
# responses iterate synchronously, which Django's ASGI handler warns about on every file: harmless.
warnings.filterwarnings("ignore", message="StreamingHttpResponse must consume synchronous iterators")
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# --- Redis, channel layer ----------------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
REDIS_ENABLED = env.bool("REDIS_ENABLED", default=True)
REDIS_PROBE_INTERVAL = env.float("REDIS_PROBE_INTERVAL", default=2.0)  # seconds between recovery probes
REDIS_SOCKET_TIMEOUT = env.float("REDIS_SOCKET_TIMEOUT", default=0.5)
REDIS_MAX_CONNECTIONS = env.int("REDIS_MAX_CONNECTIONS", default=64)  # per process: shared state (not channels)
REDIS_POOL_TIMEOUT = env.float("REDIS_POOL_TIMEOUT", default=5.0)  # waiting longer for a free connection = outage
RETRY_BACKOFF_FACTOR = env.float("RETRY_BACKOFF_FACTOR", default=2)
RETRY_MAX_ATTEMPTS = env.int("RETRY_MAX_ATTEMPTS", default=3)
RETRY_BASE_DELAY = env.float("RETRY_BASE_DELAY", default=0.25)  # seconds before the 2nd attempt

# Redis Sentinel (high availability): when sentinels are listed, REDIS_URL is not used; the shared state and
# the channel layer both follow the master the sentinels name (voice/services/redis_sentinel.py).
from voice.services.redis_sentinel import channel_layer_host, sentinel_config  # noqa: E402

REDIS_SENTINEL = sentinel_config(
    env.list("REDIS_SENTINELS", default=[]),
    env.str("REDIS_SENTINEL_MASTER", default="intelia-voice"),
    sentinel_password=env.str("REDIS_SENTINEL_PASSWORD", default=""),
    master_password=env.str("REDIS_MASTER_PASSWORD", default=""),
    db=env.int("REDIS_SENTINEL_DB", default=0),
)

if REDIS_ENABLED:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_URL if REDIS_SENTINEL is None else channel_layer_host(REDIS_SENTINEL,
                                                                                       REDIS_SOCKET_TIMEOUT)],
                "prefix": "intelia_voice", "capacity": 500, "expiry": 30,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Voice feature -----------------------------------------------------------------------------
ENABLE_VOICE_REALTIME = env.bool("ENABLE_VOICE_REALTIME", default=False)
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
OPENAI_REALTIME_URL = env.str("OPENAI_REALTIME_URL", default="wss://api.openai.com/v1/realtime")
OPENAI_REALTIME_MODEL = env.str("OPENAI_REALTIME_MODEL", default="gpt-realtime")
# Empty values (as in .env.example) mean "use the default", for every setting below that derives one.
VOICE_UPSTREAM = env.str("VOICE_UPSTREAM", default="") or ("openai" if OPENAI_API_KEY else "local")
VOICE_NAME = env.str("VOICE_NAME", default="marin")
VOICE_INPUT_LANGUAGE = env.str("VOICE_INPUT_LANGUAGE", default="")  # "" = let the model detect
# gpt-realtime-whisper streams deltas while the user speaks (inline early transcripts, docs/DEPLOYMENT.md).
VOICE_TRANSCRIPTION_MODEL = env.str("VOICE_TRANSCRIPTION_MODEL", default="gpt-realtime-whisper")
# gpt-realtime-whisper only: how long it waits before emitting text (minimal|low|medium|high|xhigh; "" = OpenAI's).
VOICE_TRANSCRIPTION_DELAY = env.str("VOICE_TRANSCRIPTION_DELAY", default="")
VOICE_PROMPT_FILE = str(BASE_DIR / env.str("VOICE_PROMPT_FILE", default="voice/prompts/system.md"))
VOICE_INSTRUCTIONS = env.str("VOICE_INSTRUCTIONS", default="")  # overrides the prompt file when set
VOICE_VAD_TYPE = env.str("VOICE_VAD_TYPE", default="server_vad")  # server_vad | semantic_vad (plans override)
VOICE_VAD_EAGERNESS = env.str("VOICE_VAD_EAGERNESS", default="auto")  # semantic_vad: auto | low | medium | high
VOICE_VAD_THRESHOLD = env.float("VOICE_VAD_THRESHOLD", default=0.5)
VOICE_VAD_SILENCE_MS = env.int("VOICE_VAD_SILENCE_MS", default=500)
VOICE_VAD_PREFIX_MS = env.int("VOICE_VAD_PREFIX_MS", default=300)
VOICE_ALLOWED_ORIGINS = env.list("VOICE_ALLOWED_ORIGINS", default=[])  # empty: ALLOWED_HOSTS rules
VOICE_MAX_FRAME_BYTES = env.int("VOICE_MAX_FRAME_BYTES", default=1024 * 1024)
VOICE_MAX_FRAMES_PER_SECOND = env.int("VOICE_MAX_FRAMES_PER_SECOND", default=100)
# Connections admitted at once (JWT through the access decision); more wait their turn (voice/realtime/admission.py).
VOICE_ADMISSION_CONCURRENCY = env.int("VOICE_ADMISSION_CONCURRENCY", default=16)
# New connections whose handshake runs per turn of the event loop (voice/handshake_pacing.py).
VOICE_HANDSHAKES_PER_TURN = env.int("VOICE_HANDSHAKES_PER_TURN", default=16)
# Event-loop stalls longer than this get the loop thread's stack sampled and logged
# (voice/observability/stall_sampler.py); 0: off.
VOICE_STALL_SAMPLER_MS = env.int("VOICE_STALL_SAMPLER_MS", default=30)
VOICE_UPSTREAM_CONNECT_TIMEOUT = env.float("VOICE_UPSTREAM_CONNECT_TIMEOUT", default=10.0)
VOICE_UPSTREAM_STALL_SECONDS = env.float("VOICE_UPSTREAM_STALL_SECONDS", default=30.0)
VOICE_UPSTREAM_RECYCLE_SECONDS = env.int("VOICE_UPSTREAM_RECYCLE_SECONDS", default=55 * 60)
VOICE_AUDIO_QUEUE_MAX_BYTES = env.int("VOICE_AUDIO_QUEUE_MAX_BYTES", default=2 * 1024 * 1024)
VOICE_DEMO_ENABLED = env.bool("VOICE_DEMO_ENABLED", default=False)
MAX_SESSION_DURATION = env.int("MAX_SESSION_DURATION", default=600)
SESSION_WARNING_SECONDS = env.int("SESSION_WARNING_SECONDS", default=30)
MAX_SESSIONS_PER_USER_PER_HOUR = env.int("MAX_SESSIONS_PER_USER_PER_HOUR", default=5)
MAX_CONCURRENT_SESSIONS_PER_USER = env.int("MAX_CONCURRENT_SESSIONS_PER_USER", default=1)
SESSION_TTL = env.int("SESSION_TTL", default=3600)
# How long a resume waits for the session's previous connection (here or on another instance) to let go and
# save its state; past it the resume goes on from the state saved after the last turn.
VOICE_SUPERSEDE_WAIT_SECONDS = env.float("VOICE_SUPERSEDE_WAIT_SECONDS", default=5.0)
VOICE_TICKET_TTL = env.int("VOICE_TICKET_TTL", default=30)
VOICE_DRAIN_GRACE_SECONDS = env.float("VOICE_DRAIN_GRACE_SECONDS", default=2.0)
# WebSocket keepalive with the client: a ping every INTERVAL s, the link declared dead (session ended, slot
# released) when its pong is TIMEOUT s late. Chosen with bench/netfaults.py (docs/RELIABILITY.md).
VOICE_WS_PING_INTERVAL_SECONDS = env.float("VOICE_WS_PING_INTERVAL_SECONDS", default=10.0)
VOICE_WS_PING_TIMEOUT_SECONDS = env.float("VOICE_WS_PING_TIMEOUT_SECONDS", default=10.0)
# Cap on TCP's retransmission timeout for client connections (Linux >= 6.15, min 1000; 0: kernel default,
# 120 s): audio held up by a link blackout is resent within this long of the link's return.
VOICE_TCP_RTO_MAX_MS = env.int("VOICE_TCP_RTO_MAX_MS", default=1000)
# Seconds between returns of free heap pages to the OS (glibc malloc_trim; 0: never). See voice/server.py.
VOICE_MALLOC_TRIM_SECONDS = env.float("VOICE_MALLOC_TRIM_SECONDS", default=60.0)
# Full garbage collections only when no session is live, or at the latest this long after the previous one
# (voice/gc_policy.py); 0 leaves CPython's own policy.
VOICE_GC_FULL_MAX_SECONDS = env.float("VOICE_GC_FULL_MAX_SECONDS", default=600.0)

# Local realtime engine knobs (benchmarks reproduce OpenAI timing with them).
LOCAL_ENGINE_FIRST_AUDIO_MS = env.int("LOCAL_ENGINE_FIRST_AUDIO_MS", default=0)
LOCAL_ENGINE_TRANSCRIPT_DELAY_MS = env.int("LOCAL_ENGINE_TRANSCRIPT_DELAY_MS", default=0)
LOCAL_ENGINE_SCRIPT = env.str("LOCAL_ENGINE_SCRIPT", default="")  # path to a JSON list of transcripts
LOCAL_ENGINE_SPEED = env.float("LOCAL_ENGINE_SPEED", default=8.0)  # audio streamed N× real time
LOCAL_ENGINE_TTS = env.str("LOCAL_ENGINE_TTS", default="auto")  # auto | espeak | tone
# Scripted transcript deltas during speech; unset: only when the session's transcription model streams (as OpenAI).
LOCAL_ENGINE_PARTIAL_TRANSCRIPTS = env.bool("LOCAL_ENGINE_PARTIAL_TRANSCRIPTS", default=None)
# Offline speech recognition of spoken turns (requirements/speech.txt): auto | off. The domain language
# model lives in LOCAL_ENGINE_STT_MODEL_DIR, rebuilt by voice_ingest (built from voice/knowledge if absent).
LOCAL_ENGINE_STT = env.str("LOCAL_ENGINE_STT", default="auto")
LOCAL_ENGINE_STT_MODEL_DIR = str(BASE_DIR / env.str("LOCAL_ENGINE_STT_MODEL_DIR", default="var/speech"))
LOCAL_ENGINE_STT_MAX_STREAMS = env.int("LOCAL_ENGINE_STT_MAX_STREAMS", default=8)  # utterances at once
LOCAL_ENGINE_STT_MAX_LAG_MS = env.int("LOCAL_ENGINE_STT_MAX_LAG_MS", default=2000)  # then: placeholder

# --- Auth (JWT) --------------------------------------------------------------------------------
JWT_SIGNING_KEY = env.str("JWT_SIGNING_KEY", default="") or SECRET_KEY
JWT_VERIFYING_KEY = env.str("JWT_VERIFYING_KEY", default="")  # PEM: switches to RS256
JWT_ALGORITHM = env.str("JWT_ALGORITHM", default="") or ("RS256" if JWT_VERIFYING_KEY else "HS256")
JWT_AUDIENCE = env.str("JWT_AUDIENCE", default="") or None
JWT_ISSUER = env.str("JWT_ISSUER", default="") or None
JWT_MAX_TOKEN_BYTES = env.int("JWT_MAX_TOKEN_BYTES", default=8192)

SIMPLE_JWT = {
    "ALGORITHM": JWT_ALGORITHM,
    "SIGNING_KEY": JWT_SIGNING_KEY,
    "VERIFYING_KEY": JWT_VERIFYING_KEY or None,
    "AUDIENCE": JWT_AUDIENCE,
    "ISSUER": JWT_ISSUER,
    "USER_ID_CLAIM": "user_id",
    "USER_ID_FIELD": "username",
    "TOKEN_TYPE_CLAIM": "token_type",
    "LEEWAY": 0,
    "UPDATE_LAST_LOGIN": False,
}

# --- Knowledge (RAG) ---------------------------------------------------------------------------
RAG_BACKEND = env.str("RAG_BACKEND", default="local")  # local | weaviate | off
RAG_LOCAL_INDEX = str(BASE_DIR / env.str("RAG_LOCAL_INDEX", default="var/knowledge.sqlite3"))
RAG_LOCAL_DELAY_MS = env.int("RAG_LOCAL_DELAY_MS", default=0)
RAG_PREFETCH_MIN_WORDS = env.int("RAG_PREFETCH_MIN_WORDS", default=5)
RAG_WAIT_TIMEOUT_MS = env.int("RAG_WAIT_TIMEOUT_MS", default=200)
RAG_REQUERY_DEBOUNCE_MS = env.int("RAG_REQUERY_DEBOUNCE_MS", default=150)
RAG_TOP_K = env.int("RAG_TOP_K", default=3)
RAG_QUERY_TIMEOUT_S = env.float("RAG_QUERY_TIMEOUT_S", default=2.0)
# auto: inline when the session's transcription model streams (gpt-realtime-whisper), else off;
# inline: the conversation session's own transcript deltas; openai: a second, transcription-only session.
EARLY_TRANSCRIPTION = env.str("EARLY_TRANSCRIPTION", default="auto")  # auto | inline | openai | off
EARLY_TRANSCRIPTION_SLICE_MS = env.int("EARLY_TRANSCRIPTION_SLICE_MS", default=600)
WEAVIATE_URL = env.str("WEAVIATE_URL", default="")
WEAVIATE_API_KEY = env.str("WEAVIATE_API_KEY", default="")
WEAVIATE_COLLECTION = env.str("WEAVIATE_COLLECTION", default="InteliaKnowledge")

# --- Cost: USD per 1M tokens, per model (prices change: keep them here, not in code) ------------
# A model without a row is refused (system check voice.E001 at start-up, validation error on a plan save).
# Rows checked 2026-12-03 against openai.com/api/pricing as reported by public sources for late 2026 and the
# OpenAI Python SDK 3.60.0 model list. ESTIMATE marks a row whose prices were not published in what we could
# read: it copies its closest sibling's row and must be corrected from the pricing page before relying on it.
_REALTIME = {"text_in": 4.00, "text_cached": 0.40, "text_out": 16.00,
             "audio_in": 32.00, "audio_cached": 0.40, "audio_out": 64.00}
_REALTIME_MINI = {"text_in": 0.60, "text_cached": 0.30, "text_out": 2.40,
                  "audio_in": 10.00, "audio_cached": 0.30, "audio_out": 20.00}
_REALTIME_2 = {**_REALTIME, "text_out": 24.00}  # gpt-realtime-2 (7 May 2026): text output $24/1M
_PREVIEW = {"text_in": 5.00, "text_cached": 2.50, "text_out": 20.00,
            "audio_in": 40.00, "audio_cached": 2.50, "audio_out": 80.00}
VOICE_PRICES = {
    "gpt-realtime": _REALTIME,
    "gpt-realtime-2025-08-28": _REALTIME,
    "gpt-realtime-1.5": _REALTIME,
    "gpt-realtime-2": _REALTIME_2,
    "gpt-realtime-2.1": _REALTIME_2,  # ESTIMATE: gpt-realtime-2's row
    "gpt-realtime-mini": _REALTIME_MINI,
    "gpt-realtime-mini-2025-10-06": _REALTIME_MINI,
    "gpt-realtime-mini-2025-12-15": _REALTIME_MINI,
    "gpt-realtime-2.1-mini": _REALTIME_MINI,  # ESTIMATE: gpt-realtime-mini's row
    "gpt-4o-realtime-preview": _PREVIEW,
    "gpt-4o-mini-realtime-preview": _REALTIME_MINI,
}
# Input transcription, USD per 1M tokens (audio in, text in, text out) and per minute (duration-billed).
VOICE_TRANSCRIPTION_PRICES = {
    "gpt-4o-transcribe": {"audio_in": 6.00, "text_in": 2.50, "text_out": 10.00, "per_minute": 0.006},
    "gpt-4o-mini-transcribe": {"audio_in": 3.00, "text_in": 1.25, "text_out": 5.00, "per_minute": 0.003},
    "whisper-1": {"audio_in": 0.0, "text_in": 0.0, "text_out": 0.0, "per_minute": 0.006},
    # ESTIMATE: gpt-4o-transcribe's row (streams deltas during speech inside the conversation session).
    "gpt-realtime-whisper": {"audio_in": 6.00, "text_in": 2.50, "text_out": 10.00, "per_minute": 0.006},
}
# Announced shutdown dates (source: the deprecation notes in the OpenAI Python SDK 3.60.0 realtime types,
# checked 2026-12-03; the legacy preview models per the public deprecations page as reported for late 2026).
# `voice_health` warns for a configured model within VOICE_MODEL_SHUTDOWN_WARN_DAYS of its date.
VOICE_MODEL_SHUTDOWNS = {
    **dict.fromkeys(("gpt-realtime", "gpt-realtime-2025-08-28", "gpt-realtime-mini",
                     "gpt-realtime-mini-2025-12-15", "gpt-4o-realtime-preview", "gpt-4o-mini-realtime-preview",
                     "gpt-audio-mini", "gpt-audio-mini-2025-12-15"), "2027-01-20"),
    **dict.fromkeys(("whisper-1", "gpt-4o-mini-transcribe", "gpt-4o-mini-transcribe-2025-12-15",
                     "gpt-4o-transcribe", "gpt-4o-transcribe-diarize"), "2027-02-26"),
}
VOICE_MODEL_SHUTDOWN_WARN_DAYS = env.int("VOICE_MODEL_SHUTDOWN_WARN_DAYS", default=60)

# --- Rollout KPI gate thresholds -------------------------------------------------------------------
VOICE_KPI_FIRST_AUDIO_P95_MS = env.float("VOICE_KPI_FIRST_AUDIO_P95_MS", default=800)
VOICE_KPI_MAX_ERROR_RATE = env.float("VOICE_KPI_MAX_ERROR_RATE", default=0.02)
VOICE_KPI_MIN_ADOPTION = env.float("VOICE_KPI_MIN_ADOPTION", default=0.10)
VOICE_KPI_MIN_SATISFACTION = env.float("VOICE_KPI_MIN_SATISFACTION", default=4.0)

# --- Observability -----------------------------------------------------------------------------
SENTRY_DSN = env.str("SENTRY_DSN", default="")
SENTRY_ENVIRONMENT = env.str("SENTRY_ENVIRONMENT", default="") or ("development" if DEBUG else "production")
SENTRY_TRACES_SAMPLE_RATE = env.float("SENTRY_TRACES_SAMPLE_RATE", default=0.1)
SENTRY_PROFILES_SAMPLE_RATE = env.float("SENTRY_PROFILES_SAMPLE_RATE", default=0.1)
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOG_FORMAT = env.str("LOG_FORMAT", default="console" if DEBUG else "json")  # json | console
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
METRICS_ALLOWED_NETWORKS = env.list("METRICS_ALLOWED_NETWORKS", default=["127.0.0.1/32", "::1/128"])
METRICS_SPOOL_DIR = str(BASE_DIR / env.str("METRICS_SPOOL_DIR", default="var/spool"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "voice.logging.RedactSecretsFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["redact"]},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Access logs carry request paths; the redact filter strips ?token=/ticket=/resume=.
        "uvicorn.access": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "django.channels.server": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "daphne": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}

# --- Observability setup: structured redacted logs, then Sentry (keep this last) -----------------
from voice.observability import setup as _observability_setup  # noqa: E402

_observability_setup(globals())
