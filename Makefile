# Intelia Voice: two commands on a fresh machine — `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQS := requirements/base.txt requirements/local.txt requirements/speech.txt
STAMP := $(VENV)/.installed-$(shell cat $(REQS) | sha1sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8000
export DJANGO_SETTINGS_MODULE := intelia_voice.settings

.PHONY: run test bootstrap redis migrate embedded lint bench clean

$(STAMP): $(REQS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -r requirements/local.txt
	@$(PY) -m pip install -q -r requirements/speech.txt || echo "warning: no offline speech recognition (speech tests will be skipped)"
	@rm -f $(VENV)/.installed-* && touch $@

bootstrap: $(STAMP) redis
	@mkdir -p var

# A Redis on 127.0.0.1:6379: reuse a running one, else start redis-server when installed,
# else carry on with the in-memory fallback (REDIS_ENABLED stays true: health reports degraded).
redis:
	@scripts/ensure-redis.sh

migrate: bootstrap
	@$(PY) manage.py migrate --noinput -v 0

# The local engine's optional extras (espeak-ng, requirements/speech.txt when present): see the script.
embedded: bootstrap
	@scripts/ensure-embedded.sh

run: migrate embedded
	@ENABLE_VOICE_REALTIME=$${ENABLE_VOICE_REALTIME:-true} DEBUG=$${DEBUG:-true} $(PY) manage.py voice_demo_setup --host $(HOST) --port $(PORT)
	@ENABLE_VOICE_REALTIME=$${ENABLE_VOICE_REALTIME:-true} DEBUG=$${DEBUG:-true} $(PY) manage.py voice_serve --host $(HOST) --port $(PORT)

test: bootstrap
	@scripts/ensure-browser.sh || echo "warning: Chromium unavailable; browser tests will be skipped"
	@scripts/ensure-command.sh espeak-ng espeak-ng || echo "warning: espeak-ng unavailable; espeak tests will be skipped"
	@scripts/ensure-nginx.sh || echo "warning: nginx unavailable; the nginx topology tests will be skipped"
	@scripts/ensure-iproute2.sh || echo "warning: iproute2 unavailable; link-fault tests will be skipped"
	@$(PY) -m pytest -q $(PYTEST_ARGS)

lint: bootstrap
	@$(VENV)/bin/ruff check .

bench: bootstrap
	@$(PY) bench/relay.py --help >/dev/null && echo "see docs/BENCHMARKS.md for the bench commands"

clean:
	rm -rf $(VENV) var
