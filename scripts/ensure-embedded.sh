#!/usr/bin/env bash
# What the embedded default (the local realtime engine, no OpenAI key) uses when it can have it:
# espeak-ng for spoken answers (French and English voices), and the optional offline speech
# recogniser's Python packages (requirements/speech.txt, when present). Each is optional: without
# it the engine answers with a tone / a placeholder transcript, and this script only warns.
set -u
cd "$(dirname "$0")/.."
scripts/ensure-command.sh espeak-ng espeak-ng \
  || echo "warning: espeak-ng unavailable; the local engine's answers play as a tone" >&2
if [ -f requirements/speech.txt ]; then
  stamp=".venv/.speech-$(sha1sum requirements/speech.txt | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    if .venv/bin/python -m pip install -q -r requirements/speech.txt; then
      rm -f .venv/.speech-* && touch "$stamp"
    else
      echo "warning: requirements/speech.txt could not be installed; speech is not recognised offline" >&2
    fi
  fi
fi
exit 0
