"""LocalUpstream: the gateway's `Upstream` backed by an in-process EngineSession (same event loop)."""

from __future__ import annotations

from voice.realtime.upstream import Upstream, UpstreamClosed, UpstreamConnectError

from .config import EngineConfig
from .session import EngineClosed, EngineSession


class LocalUpstream(Upstream):
    """Speaks the GA protocol with no network: send() feeds the session, recv() drains its queue."""

    kind = "local"

    def __init__(self, config: EngineConfig | None = None, *, model: str | None = None) -> None:
        self.config = config or EngineConfig()
        self.model = model  # the `?model=` of a real handshake; None: the config's
        self.session: EngineSession | None = None
        self._closed: UpstreamClosed | None = None  # set once; every later recv/send raises it

    async def connect(self) -> None:
        """Called once before send/recv; `fail_with="invalid_api_key"` simulates a refused handshake."""
        if self.config.fail_with == "invalid_api_key":
            raise UpstreamConnectError("local engine: simulated 401 invalid_api_key", fatal=True)
        self.session = EngineSession(self.config, model=self.model)
        self.session.start()

    async def send(self, text: str) -> None:
        """Called for every client event; raises UpstreamClosed once the session is gone."""
        if self._closed is not None:
            raise self._closed
        if self.session is None:
            raise UpstreamClosed(None, "not connected")
        if self.session.closed_with is not None:  # the engine hung up; like a socket, sending now fails
            raise UpstreamClosed(self.session.closed_with.code, self.session.closed_with.reason)
        self.session.receive(text)

    async def recv(self) -> str:
        """Called by the gateway's reader loop; returns the next server event text."""
        if self._closed is not None:
            raise self._closed
        if self.session is None:
            raise UpstreamClosed(None, "not connected")
        item = await self.session.out.get()
        if self._closed is not None:  # closed/crashed while we waited
            raise self._closed
        if isinstance(item, EngineClosed):
            self._closed = UpstreamClosed(item.code, item.reason)
            raise self._closed
        return item

    async def close(self) -> None:
        """Called when the gateway is done with this upstream; idempotent."""
        self._terminate(UpstreamClosed(1000, "closed by client"))

    def crash(self) -> None:
        """Test hook: the connection drops abnormally; recv raises UpstreamClosed(1006)."""
        self._terminate(UpstreamClosed(1006, "simulated crash"))

    def inject(self, action: str, code: str | None = None, close_code: int | None = None) -> None:
        """Test hook: simulate a server-side fault (see EngineSession.inject)."""
        if self.session is not None:
            self.session.inject(action, code, close_code)

    def _terminate(self, exc: UpstreamClosed) -> None:
        if self._closed is not None:
            return
        self._closed = exc
        if self.session is not None:
            self.session.shutdown()
            self.session.out.put_nowait(EngineClosed(exc.code or 1000, exc.reason))  # wakes a pending recv
