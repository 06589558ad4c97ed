"""The dashboard as an ASGI application, and the server that ``iron-state serve`` runs.

::

    from iron_runtime_state.dashboard import DashboardServer, DashboardSettings

    settings = DashboardSettings.for_url("sqlite:///state.db")
    DashboardServer(settings, "127.0.0.1", 8080).serve()   # until Ctrl-C or SIGTERM

:func:`create_app` gives the Starlette application alone, to mount in an ASGI server of your
own; it starts the hub's background tasks in its lifespan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from ..aio import AsyncStateManager
from ..config import DASHBOARD_PORT, masked_url
from ..errors import ConfigurationError
from .hub import Hub
from .link import StoreLink
from .routes import ROUTES
from .security import Guard, check_bind, check_token

__all__ = ["DashboardServer", "DashboardSettings", "create_app"]

STATIC: Final = Path(__file__).with_name("static")


@dataclass(frozen=True)
class DashboardSettings:
    """How a dashboard reaches its store and how often it refreshes.

    ``opener`` builds the :class:`~iron_runtime_state.AsyncStateManager` (called again after
    it failed, so a store that is down at start-up is opened when it comes up); ``url`` is what
    the pages show (masked). ``token`` is the bearer token (``None``: loopback only). The
    totals are read every ``refresh`` seconds, the chain verified every ``verify_every``
    (``0``: never), each read waits at most ``timeout`` seconds, and the live feed keeps the
    newest ``feed_size`` records for browsers that reconnect.
    """

    opener: Callable[[], AsyncStateManager]
    url: str = ""
    token: str | None = None
    refresh: float = 1.0
    verify_every: float = 300.0
    timeout: float = 5.0
    feed_size: int = 1000
    hosts: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        check_token(self.token)
        for name, low in (("refresh", 0.05), ("timeout", 0.1), ("verify_every", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
            if value < low:
                raise ConfigurationError(f"{name} must be at least {low} seconds, got {value!r}")
        if isinstance(self.feed_size, bool) or not isinstance(self.feed_size, int) or self.feed_size < 10:
            raise ConfigurationError(f"feed_size must be an int of at least 10, got {self.feed_size!r}")

    @classmethod
    def for_url(cls, url: str, *, audit_key: bytes | str | None = None, **settings: Any) -> DashboardSettings:
        """Settings for the store at ``url`` (``audit_key``: the chain's HMAC key, if it has one)."""

        def opener() -> AsyncStateManager:
            return AsyncStateManager.from_url(url, audit_key=audit_key)

        return cls(opener, masked_url(url), **settings)


def create_app(settings: DashboardSettings) -> Starlette:
    """The dashboard's ASGI application (its lifespan starts and stops the hub)."""
    link = StoreLink(settings.opener, url=settings.url, timeout=settings.timeout)
    hub = Hub(
        link, refresh=settings.refresh, verify_every=settings.verify_every, feed_size=settings.feed_size
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub.start()
        try:
            yield
        finally:
            await hub.stop()

    app = Starlette(
        routes=[*ROUTES, Mount("/static", StaticFiles(directory=STATIC), name="static")],
        middleware=[Middleware(Guard, token=settings.token, hosts=settings.hosts)],
        lifespan=lifespan,
    )
    app.state.hub = hub
    app.state.settings = settings
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, ending the dashboard's event streams first when it stops (an open
    stream would otherwise hold the shutdown until its grace period ran out)."""

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.hub.close_streams()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM stop the server, and that is all: uvicorn's own version raises the
        signal again once stopped, which would end ``iron-state serve`` as killed rather than
        with status 0, as ``iron-state metrics`` ends."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (``ConfigurationError`` when that fails)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {host[:64]!r}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host[:64]}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


class DashboardServer:
    """The dashboard on ``host``:``port`` (``port=0``: any free port, see :attr:`port`).

    The socket is bound when the server is made, so :attr:`port` and a listening error are
    known before it serves. :meth:`serve` blocks (Ctrl-C and SIGTERM stop it);
    :meth:`start` and :meth:`stop` run it in a thread (tests, embedding).
    """

    def __init__(
        self, settings: DashboardSettings, host: str = "127.0.0.1", port: int = DASHBOARD_PORT
    ) -> None:
        check_bind(host, settings.token)
        if host not in settings.hosts:  # the Host header may name the address listened on
            settings = dataclasses.replace(settings, hosts=(*settings.hosts, host))
        self.app = create_app(settings)
        self.host = host
        self._socket = _listen(host, port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self._server = _Server(config, self.app.state.hub)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The dashboard's address."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/"

    def serve(self) -> None:
        """Serve until stopped (Ctrl-C, SIGTERM, or :meth:`stop` from another thread)."""
        self._server.run(sockets=[self._socket])

    def start(self) -> None:
        """Serve in a thread; returns once the server answers."""
        self._thread = threading.Thread(target=self.serve, name="iron-state-dashboard", daemon=True)
        self._thread.start()
        for _ in range(500):
            if self._server.started:
                return
            if not self._thread.is_alive():
                raise ConfigurationError("the dashboard server stopped while starting; see the log")
            threading.Event().wait(0.01)
        raise ConfigurationError("the dashboard server did not start within 5 seconds")

    def stop(self) -> None:
        """Stop serving (from another thread) and wait for the server to end."""
        self._server.should_exit = True
        thread = self._thread
        if thread is not None:
            thread.join(timeout=15)
        self._socket.close()
