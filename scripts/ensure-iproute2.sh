#!/usr/bin/env bash
# The link-fault tests (tests/test_netfaults.py) build network namespaces with iproute2's `ip`.
set -u
command -v ip >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq iproute2 >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq iproute2 >/dev/null 2>&1))
fi
command -v ip >/dev/null 2>&1
