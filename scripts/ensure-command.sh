#!/usr/bin/env bash
# ensure-command.sh COMMAND PACKAGE: make COMMAND available, installing the Debian PACKAGE when apt-get
# is usable (root); exits non-zero when COMMAND is still missing, so callers can warn and carry on.
set -u
command -v "$1" >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq "$2" >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$2" >/dev/null 2>&1))
fi
command -v "$1" >/dev/null 2>&1
