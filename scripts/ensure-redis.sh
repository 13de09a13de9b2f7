#!/usr/bin/env bash
# Make sure a Redis answers on 127.0.0.1:6379; start a local redis-server if one is installed.
set -u
ping() { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && timeout 1 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
if ping; then exit 0; fi
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq redis-server >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq redis-server >/dev/null 2>&1)) || true
  fi
fi
if command -v redis-server >/dev/null 2>&1; then
  mkdir -p var
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "$(pwd)/var" --logfile "$(pwd)/var/redis.log" >/dev/null
  for _ in $(seq 1 50); do ping && exit 0; sleep 0.1; done
fi
echo "WARNING: no Redis on 127.0.0.1:6379 and redis-server could not be started;" >&2
echo "         the gateway runs on its in-memory fallback (single instance only)." >&2
exit 0
