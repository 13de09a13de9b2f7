"""Bench only: the gateway with Channels' stock `dispatch` (a DB-hygiene thread hop before every message).

`uvicorn bench.stock_dispatch_asgi:application` serves exactly the production app, except that
VoiceConsumer.dispatch is Channels' AsyncConsumer.dispatch again, which awaits aclose_old_connections()
(sync_to_async onto the one thread-sensitive executor) before each handler. bench/relay.py's
`uvicorn-stock` target compares it with the production consumer in the same run.
"""

from channels.consumer import AsyncConsumer

from intelia_voice.asgi import application  # noqa: F401 - re-exported for uvicorn
from voice.consumers import VoiceConsumer

VoiceConsumer.dispatch = AsyncConsumer.dispatch  # type: ignore[method-assign]
