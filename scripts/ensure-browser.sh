#!/usr/bin/env bash
# Real-browser tests need Debian's chromium (Playwright drives it; no browser download).
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1))
fi
command -v chromium >/dev/null 2>&1
