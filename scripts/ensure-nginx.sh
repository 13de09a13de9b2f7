#!/usr/bin/env bash
# The topology tests run Debian's nginx as a plain foreground process with their own configuration
# (tests/test_topology.py). Installed here when missing; the package's system service is never started.
set -u
has_nginx() { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }
has_nginx && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # policy-rc.d exit 101 forbids service starts during this install (removed after, if we created it).
  created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created=1
  fi
  (apt-get install -y -qq nginx-light >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nginx-light >/dev/null 2>&1))
  [ "$created" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
has_nginx
