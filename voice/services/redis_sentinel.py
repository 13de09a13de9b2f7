"""Redis Sentinel: the shared state and the channel layer follow one master name through its failovers.

With `REDIS_SENTINELS` set, the gateway never holds a Redis address: it asks the sentinels which server is
the master of `REDIS_SENTINEL_MASTER`, and asks again whenever a connection breaks or a write lands on a
demoted master (READONLY). This module has no Django import at load time: settings.py uses it to build the
channel layer's host entry.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

logger = logging.getLogger(__name__)

MAX_SWITCHES_KEPT = 10


@dataclass(frozen=True)
class SentinelConfig:
    """Where the sentinels are, which master they watch, and the two passwords (sentinels, data nodes)."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    sentinel_password: str = field(default="", repr=False)
    master_password: str = field(default="", repr=False)
    db: int = 0

    def describe(self) -> str:
        """A password-free name for logs and health: sentinel://host:port,…/master/db."""
        hosts = ",".join(_address(pair) for pair in self.sentinels)
        return f"sentinel://{hosts}/{self.master_name}/{self.db}"

    def sentinel_kwargs(self, socket_timeout: float) -> dict[str, Any]:
        """Connection options for the sentinels themselves: one is asked after another, so a dead one must
        fail at once (redis-py's default retries a refused connection 10 times with backoff: ~4 s each)."""
        options: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout,
                                   "retry": Retry(NoBackoff(), 0)}
        if self.sentinel_password:
            options["password"] = self.sentinel_password
        return options

    def master_kwargs(self) -> dict[str, Any]:
        """Connection options for the master (database number, password)."""
        options: dict[str, Any] = {"db": self.db}
        if self.master_password:
            options["password"] = self.master_password
        return options


def parse_sentinels(entries: list[str]) -> tuple[tuple[str, int], ...]:
    """`host:port` entries (IPv6 as `[::1]:26379`; port 26379 when omitted) as (host, port) pairs."""
    pairs = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest.lstrip(":") or "26379"
        else:
            host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "26379")
        pairs.append((host, int(port)))
    return tuple(pairs)


def sentinel_config(sentinels: list[str], master_name: str, *, sentinel_password: str = "",
                    master_password: str = "", db: int = 0) -> SentinelConfig | None:
    """Called by settings.py: the Sentinel configuration, or None when no sentinel is listed (URL mode)."""
    pairs = parse_sentinels(sentinels)
    if not pairs:
        return None
    return SentinelConfig(pairs, master_name, sentinel_password, master_password, db)


def channel_layer_host(config: SentinelConfig, socket_timeout: float) -> dict[str, Any]:
    """Called by settings.py: channels-redis' host entry for the same master (channels_redis.utils.create_pool).

    No socket_timeout on the master connections: the layer's receive blocks on BZPOPMIN for seconds.
    """
    return {
        "sentinels": [list(pair) for pair in config.sentinels],
        "master_name": config.master_name,
        "sentinel_kwargs": config.sentinel_kwargs(socket_timeout),
        "socket_connect_timeout": socket_timeout,
        **config.master_kwargs(),
    }


class MasterPool(SentinelConnectionPool, BlockingConnectionPool):
    """A bounded pool of connections to whichever server the sentinels name master, recording switches.

    redis-py's sentinel pool asks the sentinels on every new connection and drops idle connections when
    the answer changes; connections in use at that moment would go back to the pool still pointing at the
    former master (a demoted one answers reads and PING, and refuses writes): they are dropped on release.
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self.switches: list[dict[str, Any]] = []

    async def get_master_address(self) -> tuple[str, int]:
        """Called before each new connection (and by the recovery probe): the master the sentinels name."""
        address = tuple(await self.sentinel_manager.discover_master(self.service_name))
        if self.master_address is not None and tuple(self.master_address) != address:
            # Compared and assigned with no await between: concurrent connects record one switch.
            previous = _address(self.master_address)
            self.switches = [*self.switches, {"from": previous, "to": _address(address),
                                              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
            self.switches = self.switches[-MAX_SWITCHES_KEPT:]
            logger.warning("Redis master of %s switched from %s to %s", self.service_name, previous,
                           _address(address))
        if self.master_address != address:
            self.master_address = address
            await self.disconnect(inuse_connections=False)  # idle connections to the former master
        return address  # type: ignore[return-value]

    async def release(self, connection: Any) -> None:
        """Called when a command is done: a connection left on a former master is closed, not kept."""
        master = self.master_address
        if master is not None and connection.is_connected and (connection.host, connection.port) != tuple(master):
            await connection.disconnect()
        await super().release(connection)

    def current_master(self) -> str | None:
        """Called by health: host:port of the master last named by the sentinels."""
        return _address(self.master_address) if self.master_address else None


def _address(pair: Any) -> str:
    """host:port, IPv6 hosts in brackets."""
    host, port = pair[0], pair[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def master_pool(config: SentinelConfig, *, max_connections: int, timeout: float, socket_timeout: float,
                **connection_kwargs: Any) -> MasterPool:
    """Called by SharedState: the master's bounded pool (the same options the URL mode uses)."""
    sentinel = Sentinel(list(config.sentinels), sentinel_kwargs=config.sentinel_kwargs(socket_timeout))
    return MasterPool(
        config.master_name, sentinel, max_connections=max_connections, timeout=timeout,
        socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, **config.master_kwargs(),
        **connection_kwargs,
    )
