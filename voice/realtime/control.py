"""Control messages for this process's live sessions (kill switch, operator terminate, a resume on another
instance that supersedes a connection): one channel-layer channel and one listener task per event loop.

A channel, a receive loop and channels_redis' two helper tasks per session were 3 of a live session's 7
asyncio tasks, and cancelling that receive at every session end (it is usually parked in a blocking Redis
read) threw the Redis connection away: the next session opened a new one (connect + handshake round trips)
and the cancelled read left a cycle of garbage (task, timeout, exception, frames). Now the process's channel
joins the broadcast group once. Every control message goes to that group, and one meant for one session names
it (`session_id`): the process holding that session acts, the others ignore it. Operators end a session
rarely; a group per session cost two Redis round trips at every admission (and a key kept for a day).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from voice.realtime import registry

logger = logging.getLogger(__name__)
LAYER_TIMEOUT_SECONDS = 1.0  # a channel-layer call (join, send) on a Redis that does not answer
# Control message type -> the live consumer's handler (as Channels derives it). A terminate without a
# session id (the kill switch) is for every session; a supersede always names its session.
HANDLERS = {"session.terminate": "session_terminate", "session.supersede": "session_supersede"}


class ControlChannel:
    """This event loop's channel on the channel layer and the task that receives its messages."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.name: str | None = None
        self.broadcast_joined = False
        self.generation = 0  # bumped when the listener fails: sessions joined before must join again
        self._listener: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._naming = asyncio.Lock()  # sessions admitted together must all join the same channel, once

    async def join(self) -> int | None:
        """Called by a live session's presence refresh until it succeeds: put this process's channel in the
        broadcast group (once per generation); the generation joined, or None when the layer is down."""
        from voice.services.rollout import BROADCAST_GROUP

        try:
            if self.name is None or not self.broadcast_joined:
                async with self._naming:  # sessions admitted together: one of them names and joins
                    if self.name is None:
                        self.name = await self.layer.new_channel()
                    if not self.broadcast_joined:
                        await asyncio.wait_for(self.layer.group_add(BROADCAST_GROUP, self.name),
                                               LAYER_TIMEOUT_SECONDS)
                        self.broadcast_joined = True
        except Exception:  # noqa: BLE001 - the layer's Redis is down: the kill switch is also polled
            logger.warning("channel layer unavailable; control messages paused until it returns")
            return None
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        return self.generation

    async def _listen(self) -> None:
        """Receive control messages until the layer fails (Redis outage): then every session joins again on
        its next presence refresh, which starts a new listener."""
        assert self.name is not None
        while True:
            try:
                message = await self.layer.receive(self.name)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                self.broadcast_joined = False
                self.generation += 1
                return
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind not in HANDLERS:
            return
        session_id = message.get("session_id")
        if session_id is None and (kind != "session.terminate" or message.get("code") != "feature_disabled"):
            # A per-session message from a sender that does not name the session (an older version): its
            # target cannot be told apart from the other sessions of this process.
            logger.warning("control message without a session id ignored (code %s)", message.get("code"))
            return
        for consumer in registry.live_sessions():
            if session_id is None or consumer.session_id == session_id:
                task = asyncio.get_running_loop().create_task(getattr(consumer, HANDLERS[kind])(message))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)

    def close(self) -> None:
        """Called when the event loop's server stops (tests run several in one process)."""
        if self._listener is not None:
            self._listener.cancel()


_channels: dict[asyncio.AbstractEventLoop, ControlChannel] = {}


async def control_broadcast(message: dict[str, Any]) -> bool:
    """Send a control message to every process's control channel; False when there is no channel layer or
    its Redis is down."""
    from channels.layers import get_channel_layer

    from voice.services.rollout import BROADCAST_GROUP

    layer = get_channel_layer()
    if layer is None:
        return False
    try:
        await asyncio.wait_for(layer.group_send(BROADCAST_GROUP, message), LAYER_TIMEOUT_SECONDS)
    except Exception:  # noqa: BLE001 - the layer's Redis is down
        return False
    return True


def control_channel(layer: Any) -> ControlChannel:
    """The running event loop's control channel on `layer` (created on first use)."""
    loop = asyncio.get_running_loop()
    channel = _channels.get(loop)
    if channel is None or channel.layer is not layer:
        if channel is not None:
            channel.close()
        channel = _channels[loop] = ControlChannel(layer)
    return channel


def control_channel_close() -> None:
    """Called as a server's event loop shuts down: stop its listener and forget the channel."""
    channel = _channels.pop(asyncio.get_running_loop(), None)
    if channel is not None:
        channel.close()
