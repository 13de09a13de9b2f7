#!/usr/bin/env bash
# Real-browser tests need Debian's chromium (Playwright drives it; no browser download).
exec "$(dirname "$0")/ensure-command.sh" chromium chromium
