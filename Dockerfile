# Multi-stage, slim, non-root. Build: docker build -t intelia-voice .
# Run:   docker run -p 8000:8000 --env-file .env intelia-voice
# Offline speech for the local engine (what answers without OPENAI_API_KEY): pocketsphinx (English
# recognition, its model inside the wheel) and espeak-ng (French and English voices). Images that always run
# with OpenAI upstream can leave both out: --build-arg SPEECH=0.
ARG SPEECH=1

FROM python:3.11-slim AS build
ARG SPEECH
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY requirements/ requirements/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install -r requirements/production.txt \
 && if [ "$SPEECH" = "1" ]; then /opt/venv/bin/pip install -r requirements/speech.txt; fi

FROM python:3.11-slim AS runtime
ARG SPEECH
RUN if [ "$SPEECH" = "1" ]; then \
      apt-get update && apt-get install -y --no-install-recommends espeak-ng && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=intelia_voice.settings \
    STATIC_ROOT=/app/var/static
RUN groupadd --system voice && useradd --system --gid voice --home-dir /app --shell /usr/sbin/nologin voice
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --chown=voice:voice . .
RUN mkdir -p var/static var/spool \
 && SECRET_KEY=build-only python manage.py collectstatic --noinput -v 0 \
 && chown -R voice:voice var
USER voice
EXPOSE 8000
# Migrations run as a release step (python manage.py migrate), not at container start.
# SIGTERM drains live voice sessions (gateway.session.draining, close 4012) before exiting.
STOPSIGNAL SIGTERM
CMD ["python", "manage.py", "voice_serve", "--host", "0.0.0.0", "--port", "8000", "--loop", "uvloop"]
