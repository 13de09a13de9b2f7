"""Shared state in Redis with an in-memory fallback that takes over during an outage and hands back after.

Everything the gateway keeps across instances (rate-limit windows, concurrent-session slots, session
metadata for resume, tickets, live-session counts) goes through `SharedState`. When Redis is disabled or
unreachable, the same operations run against process memory: the instance keeps serving, health reports
`using_fallback`, and a background probe switches back as soon as Redis answers again, then runs the
registered resync hooks (e.g. live sessions re-publish their slots).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from django.conf import settings
from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from voice.logging import mask_url_password
from voice.services.redis_sentinel import MasterPool, SentinelConfig, master_pool

logger = logging.getLogger(__name__)
T = TypeVar("T")

KEY_PREFIX = "intelia_voice:"

# An admission in one round trip: refuse (0) when the user's hourly window is full; else drop the slot set's
# expired members and admit `member` (1) if fewer than `limit` remain (or it is already in), and once
# admitted it also joins the unlimited slot sets KEYS[3..] (the live sessions); else refuse (2). The window
# is the `limits` library's moving window (a list of hit timestamps, newest first, trimmed to the limit;
# SharedState.rate_hit writes it through the library): full when its limit-th entry is still inside the
# window, which is the library's own test (tests/test_access_e2e.py pins this against it). ARGV[6] empty: no
# window check (a resume, or a slot alone).
_ADMIT = """
if ARGV[6] ~= '' then
  local entry = redis.call('LINDEX', KEYS[1], tonumber(ARGV[6]) - 1)
  if entry and tonumber(entry) >= tonumber(ARGV[7]) then
    return 0
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[2], ARGV[3]) or redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[4]) then
  for i = 2, #KEYS do
    redis.call('ZADD', KEYS[i], ARGV[2], ARGV[3])
    redis.call('EXPIRE', KEYS[i], ARGV[5])
  end
  return 1
end
return 2
"""
ADMITTED, RATE_LIMITED, NO_SLOT = "admitted", "rate_limited", "no_slot"
_ADMIT_OUTCOMES = {0: RATE_LIMITED, 1: ADMITTED, 2: NO_SLOT}

# Store a JSON document unless the stored one names another owner in field ARGV[3] ("" or missing: no owner).
_SET_UNLESS_OWNED = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' then
    local owner = doc[ARGV[3]]
    if type(owner) == 'string' and owner ~= '' and owner ~= ARGV[4] then
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def _owned_by_another(raw: str | None, field: str, owner: str) -> bool:
    try:
        stored = json.loads(raw) if raw else None
    except ValueError:
        return False
    other = stored.get(field) if isinstance(stored, dict) else None
    return isinstance(other, str) and other not in ("", owner)


class _MemoryBackend:
    """Process-local stand-in for the few Redis structures we use (strings with TTL, scored sets)."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[str, float]] = {}
        self.zsets: dict[str, dict[str, float]] = {}

    def get(self, key: str) -> str | None:
        item = self.values.get(key)
        if item is None or item[1] < time.time():
            self.values.pop(key, None)
            return None
        return item[0]

    def set(self, key: str, value: str, ttl: float) -> None:
        self.values[key] = (value, time.time() + ttl)

    def zset(self, key: str) -> dict[str, float]:
        members = self.zsets.setdefault(key, {})
        now = time.time()
        for member in [m for m, score in members.items() if score <= now]:
            del members[member]
        return members


class SharedState:
    """Redis-or-memory state for one event loop (redis.asyncio clients are bound to their loop).

    Redis is one URL, or (with `sentinel`) whichever server the sentinels name master: see
    voice/services/redis_sentinel.py.
    """

    def __init__(self, url: str, enabled: bool, sentinel: SentinelConfig | None = None) -> None:
        self.url = url
        self.sentinel = sentinel
        self.enabled = enabled
        self.using_fallback = not enabled
        self.memory = _MemoryBackend()
        self.memory_limiter = MovingWindowRateLimiter(MemoryStorage())
        self._resync_hooks: list[Callable[[], Awaitable[None]]] = []
        self._probe_task: asyncio.Task[None] | None = None
        self.client: aioredis.Redis | None = None
        self.redis_limiter: MovingWindowRateLimiter | None = None
        if enabled:
            # A bounded pool: a burst of session ends (hundreds of slot releases at once) would otherwise
            # open as many connections, each costing several round trips of set-up on the event loop. A
            # wait for a free connection longer than REDIS_POOL_TIMEOUT counts as an outage (fallback).
            options: dict[str, Any] = {
                "retry_on_timeout": False,
                "decode_responses": True,
                # Cluster maintenance notifications (Redis Enterprise/Cloud) cost a round trip per connection.
                "maint_notifications_config": MaintNotificationsConfig(enabled=False),
            }
            limits: dict[str, Any] = {"max_connections": settings.REDIS_MAX_CONNECTIONS,
                                      "timeout": settings.REDIS_POOL_TIMEOUT}
            if sentinel is not None:
                pool: aioredis.ConnectionPool = master_pool(
                    sentinel, socket_timeout=settings.REDIS_SOCKET_TIMEOUT, **limits, **options)
            else:
                pool = aioredis.BlockingConnectionPool.from_url(
                    url, socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
                    socket_connect_timeout=settings.REDIS_SOCKET_TIMEOUT, **limits, **options)
            self.client = aioredis.Redis.from_pool(pool)
            storage = RedisStorage(
                # With a pool given, the URI only selects the implementation (its address is unused).
                "async+" + (url if sentinel is None else "redis://sentinel-managed:6379"),
                implementation="redispy",
                connection_pool=self.client.connection_pool,
                key_prefix=KEY_PREFIX + "limits",
            )
            self.redis_limiter = MovingWindowRateLimiter(storage)
            self._admit_script = self.client.register_script(_ADMIT)
            self._set_unless_owned_script = self.client.register_script(_SET_UNLESS_OWNED)

    # --- availability ------------------------------------------------------------------------------
    def add_resync_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Called by long-lived owners of state (live sessions) to re-publish it after an outage."""
        self._resync_hooks.append(hook)

    def remove_resync_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Called when that owner goes away."""
        if hook in self._resync_hooks:
            self._resync_hooks.remove(hook)

    def _mark_down(self, exc: BaseException) -> None:
        if not self.using_fallback:
            # Logged once per outage; the exception text can carry the URL, so only its type is logged.
            logger.warning(
                "Redis unreachable (%s), serving from the in-memory fallback", type(exc).__name__
            )
            self.using_fallback = True
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while self.using_fallback:
            await asyncio.sleep(settings.REDIS_PROBE_INTERVAL)
            try:
                await self._answering_master()
            except (RedisError, OSError):
                continue
            await self._mark_up()

    async def _answering_master(self) -> None:
        """PING the master; with Sentinel, ask the sentinels first, which drops connections to a former one."""
        assert self.client is not None
        pool = self.client.connection_pool
        if isinstance(pool, MasterPool):
            await pool.get_master_address()
        await self.client.ping()

    async def _mark_up(self) -> None:
        if not self.using_fallback:
            return
        self.using_fallback = False
        logger.warning("Redis is reachable again, leaving the in-memory fallback")
        for hook in list(self._resync_hooks):
            try:
                await hook()
            except Exception:  # one owner's failure must not stop the others
                logger.exception("state resync hook failed")

    async def _run(
        self,
        on_redis: Callable[[aioredis.Redis], Awaitable[T]],
        on_memory: Callable[[_MemoryBackend], T],
    ) -> T:
        if not self.using_fallback and self.client is not None:
            try:
                return await on_redis(self.client)
            except (RedisError, OSError) as exc:
                self._mark_down(exc)
        return on_memory(self.memory)

    async def ping(self) -> bool:
        """Called by health checks: True when Redis answers (never raises)."""
        if self.client is None:
            return False
        try:
            await self._answering_master()
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            return False
        await self._mark_up()  # a successful health probe ends the outage at once
        return True

    async def info(self) -> dict[str, Any]:
        """Called by health checks: version, clients and memory of the Redis server ({} when down)."""
        if self.client is None or self.using_fallback:
            return {}
        try:
            server = await self.client.info()
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            return {}
        return {
            "redis_version": server.get("redis_version"),
            "connected_clients": server.get("connected_clients"),
            "used_memory_human": server.get("used_memory_human"),
        }

    def describe(self) -> dict[str, Any]:
        """Called by health checks: the static part of the Redis report (no password, ever)."""
        report: dict[str, Any] = {"redis_enabled": self.enabled, "using_fallback": self.using_fallback}
        if self.sentinel is None:
            return {**report, "redis_mode": "url", "redis_url": mask_url_password(self.url)}
        pool = self.client.connection_pool if self.client is not None else None
        return {
            **report,
            "redis_mode": "sentinel",
            "redis_url": self.sentinel.describe(),
            "sentinel_master": self.sentinel.master_name,
            "redis_master": pool.current_master() if isinstance(pool, MasterPool) else None,
            "master_switches": list(pool.switches) if isinstance(pool, MasterPool) else [],
        }

    # --- key/value ----------------------------------------------------------------------------------
    async def get_json(self, key: str) -> Any:
        """Called to read a JSON document (None when missing or expired)."""
        key = KEY_PREFIX + key
        raw = await self._run(lambda r: r.get(key), lambda m: m.get(key))
        return json.loads(raw) if raw else None

    async def set_json(self, key: str, value: Any, ttl: float) -> None:
        """Called to store a JSON document with a time to live in seconds."""
        key, raw = KEY_PREFIX + key, json.dumps(value, separators=(",", ":"))
        await self._run(lambda r: r.set(key, raw, ex=max(1, int(ttl))), lambda m: m.set(key, raw, ttl))

    async def set_json_unless_owned(self, key: str, value: Any, ttl: float, *, field: str, owner: str) -> bool:
        """Called by a session's connection to store its resume document, unless another connection has taken
        the document over since (its `field` names another owner): True when stored."""
        key, raw = KEY_PREFIX + key, json.dumps(value, separators=(",", ":"))

        async def on_redis(r: aioredis.Redis) -> bool:
            return bool(await self._set_unless_owned_script(keys=[key], args=[raw, max(1, int(ttl)), field, owner]))

        def on_memory(m: _MemoryBackend) -> bool:
            if _owned_by_another(m.get(key), field, owner):
                return False
            m.set(key, raw, ttl)
            return True

        return await self._run(on_redis, on_memory)

    async def set_json_and_hit(self, key: str, value: Any, ttl: float, item: RateLimitItem, rate_key: str) -> None:
        """Called when a session is ready: its resume document stored and the session counted in its user's
        window (as `rate_hit` does) in one round trip. The window's entries are written as the `limits`
        library's moving window keeps them (newest first, trimmed to the limit), so the library reads them."""
        key, raw = KEY_PREFIX + key, json.dumps(value, separators=(",", ":"))
        if not self.using_fallback and self.client is not None and self.redis_limiter is not None:
            window = self._window_key(item, rate_key)
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.set(key, raw, ex=max(1, int(ttl)))
                    pipe.lpush(window, time.time())
                    pipe.ltrim(window, 0, item.amount - 1)
                    pipe.expire(window, item.get_expiry())
                    await pipe.execute()
                return
            except (RedisError, OSError) as exc:
                self._mark_down(exc)
        self.memory.set(key, raw, ttl)
        await self.memory_limiter.hit(item, rate_key)

    async def pop_json(self, key: str) -> Any:
        """Called to read and delete a document atomically (single-use tickets)."""
        key = KEY_PREFIX + key
        raw = await self._run(lambda r: r.getdel(key), lambda m: (m.values.pop(key, (None, 0))[0]))
        return json.loads(raw) if raw else None

    async def delete(self, key: str) -> None:
        """Called to drop a key."""
        key = KEY_PREFIX + key
        await self._run(lambda r: r.delete(key), lambda m: m.values.pop(key, None))

    # --- slots: members with a heartbeat expiry (concurrent sessions, live sessions) -----------------
    async def slot_acquire(
        self, key: str, member: str, *, limit: int, ttl: float, also: tuple[str, ...] = ()
    ) -> bool:
        """Called when a session is admitted: take one of `limit` slots under `key` (True when taken); once
        taken, the member also holds a slot in each unlimited set of `also`, in the same round trip."""
        return await self.admit(rate=None, slot_key=key, member=member, limit=limit, ttl=ttl, also=also) == ADMITTED

    async def slot_refresh(self, key: str, member: str, *, ttl: float) -> None:
        """Called by a live session to keep its slot (a crashed instance's slots expire)."""
        await self.slots_refresh([(key, member)], ttl=ttl)

    async def slots_refresh(self, slots: list[tuple[str, str]], *, ttl: float) -> None:
        """Called every second by the sessions' supervisor with every (key, member) slot due: one round trip
        for all of them (a burst of sessions admitted together refreshes together)."""
        expiry = time.time() + ttl
        members: dict[str, dict[str, float]] = {}
        for key, member in slots:
            members.setdefault(KEY_PREFIX + key, {})[member] = expiry

        async def on_redis(r: aioredis.Redis) -> None:
            async with r.pipeline(transaction=False) as pipe:
                for key, scored in members.items():
                    pipe.zadd(key, scored)
                    pipe.expire(key, int(ttl) + 1)
                await pipe.execute()

        def on_memory(m: _MemoryBackend) -> None:
            for key, scored in members.items():
                m.zset(key).update(scored)

        await self._run(on_redis, on_memory)

    async def slot_release(self, key: str, member: str) -> None:
        """Called when a session ends."""
        await self.slots_release([(key, member)])

    async def slots_release(self, slots: list[tuple[str, str]]) -> None:
        """Called when a session ends or is refused: every (key, member) slot given back in one round trip."""
        keyed = [(KEY_PREFIX + key, member) for key, member in slots]

        async def on_redis(r: aioredis.Redis) -> None:
            if len(keyed) == 1:
                await r.zrem(*keyed[0])
                return
            async with r.pipeline(transaction=False) as pipe:
                for key, member in keyed:
                    pipe.zrem(key, member)
                await pipe.execute()

        def on_memory(m: _MemoryBackend) -> None:
            for key, member in keyed:
                m.zset(key).pop(member, None)

        await self._run(on_redis, on_memory)

    async def slot_members(self, key: str) -> list[str]:
        """Called by stats and operators: the live members under `key`."""
        key, now = KEY_PREFIX + key, time.time()
        return list(
            await self._run(
                lambda r: r.zrangebyscore(key, now, "+inf"),
                lambda m: list(m.zset(key)),
            )
        )

    async def slot_live(self, key: str, member: str) -> bool:
        """Called on a resume: whether `member` still holds its slot under `key` (refreshed, not expired)."""
        key, now = KEY_PREFIX + key, time.time()
        expiry = await self._run(lambda r: r.zscore(key, member), lambda m: m.zset(key).get(member))
        return expiry is not None and float(expiry) > now

    async def admit(
        self, *, rate: tuple[RateLimitItem, str] | None, slot_key: str, member: str, limit: int, ttl: float,
        also: tuple[str, ...] = (),
    ) -> str:
        """Called by the access decision: the hourly window (unless `rate` is None) and the slot as
        `rate_check` then a slot taken under `slot_key` would decide them, in one round trip. ADMITTED (the
        slot and the `also` slots taken), RATE_LIMITED (nothing taken) or NO_SLOT."""
        now = time.time()
        keys = [KEY_PREFIX + k for k in (slot_key, *also)]
        if not self.using_fallback and self.client is not None and self.redis_limiter is not None:
            window_key, window_args = keys[0], ["", ""]  # the key is unused without a window
            if rate is not None:
                window_key, window_args = self._window_key(*rate), [rate[0].amount, now - rate[0].get_expiry()]
            try:
                outcome = await self._admit_script(keys=[window_key, *keys],
                                                   args=[now, now + ttl, member, limit, int(ttl) + 1, *window_args])
                return _ADMIT_OUTCOMES[int(outcome)]
            except (RedisError, OSError) as exc:
                self._mark_down(exc)
        if rate is not None and not (await _window(self.memory_limiter, *rate))[0]:
            return RATE_LIMITED
        members = self.memory.zset(keys[0])
        if member in members or len(members) < limit:
            for k in keys:
                self.memory.zset(k)[member] = now + ttl
            return ADMITTED
        return NO_SLOT

    def _window_key(self, item: RateLimitItem, key: str) -> str:
        """The Redis key of a `limits` moving window, as the library names it (prefix included)."""
        assert self.redis_limiter is not None
        return self.redis_limiter.storage.bridge.prefixed_key(item.key_for(key))

    # --- rate limits (the `limits` library's moving window) -----------------------------------------
    async def rate_check(self, item: RateLimitItem, key: str) -> tuple[bool, int]:
        """Called by the access decision: (allowed, retry_after seconds) without consuming."""
        if not self.using_fallback and self.redis_limiter is not None:
            try:
                return await _window(self.redis_limiter, item, key)
            except (RedisError, OSError) as exc:
                self._mark_down(exc)
        return await _window(self.memory_limiter, item, key)

    async def rate_hit(self, item: RateLimitItem, key: str) -> None:
        """Called when a session actually starts: count it in the window."""
        if not self.using_fallback and self.redis_limiter is not None:
            try:
                await self.redis_limiter.hit(item, key)
                return
            except (RedisError, OSError) as exc:
                self._mark_down(exc)
        await self.memory_limiter.hit(item, key)

    async def rate_clear(self, item: RateLimitItem, key: str) -> None:
        """Called by operators (voice_reset_ratelimit) to clear a user's window everywhere."""
        await self.memory_limiter.clear(item, key)
        if self.redis_limiter is not None and not self.using_fallback:
            try:
                await self.redis_limiter.clear(item, key)
            except (RedisError, OSError) as exc:
                self._mark_down(exc)

    async def aclose(self) -> None:
        """Called at loop shutdown (tests, commands)."""
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self.client is not None:
            pool = self.client.connection_pool
            await self.client.aclose()
            if isinstance(pool, MasterPool):
                await pool.sentinel_manager.aclose()


async def _window(limiter: MovingWindowRateLimiter, item: RateLimitItem, key: str) -> tuple[bool, int]:
    if await limiter.test(item, key):
        return True, 0
    stats = await limiter.get_window_stats(item, key)
    return False, max(1, int(stats.reset_time - time.time()) + 1)


_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SharedState] = weakref.WeakKeyDictionary()


def get_state() -> SharedState:
    """The SharedState of the running event loop (created on first use)."""
    loop = asyncio.get_running_loop()
    state = _states.get(loop)
    if state is None:
        state = SharedState(settings.REDIS_URL, settings.REDIS_ENABLED, settings.REDIS_SENTINEL)
        _states[loop] = state
    return state


def reset_states() -> None:
    """Forget every loop's state (tests that change REDIS_URL)."""
    _states.clear()
