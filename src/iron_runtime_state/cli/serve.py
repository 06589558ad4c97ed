"""``serve``: the web dashboard of a store, until stopped (needs the ``dashboard`` extra)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..config import CLI_DEFAULT_URL, DASHBOARD_PORT, ENV_AUDIT_KEY, ENV_DASHBOARD_TOKEN, masked_url
from ..errors import ConfigurationError, StateError
from .metrics import ListeningJsonOption
from .options import DebugOption, UrlOption
from .session import Session, sqlite_path

if TYPE_CHECKING:
    from ..aio import AsyncStateManager

__all__ = ["serve"]


def _opener(session: Session) -> Callable[[], AsyncStateManager]:
    """Opens the store for the dashboard: never creates a SQLite file; fails now on a bad URL or a
    missing extra, but not on a store that is down (the dashboard shows it down, and retries)."""
    from ..aio import AsyncStateManager

    options: dict[str, Any] = {"create": False} if sqlite_path(session.url) is not None else {}
    key = os.environ.get(ENV_AUDIT_KEY) or None

    def open_store() -> AsyncStateManager:
        return AsyncStateManager.from_url(session.url, audit_key=key, **options)

    first: list[AsyncStateManager] = []
    try:
        first.append(open_store())
    except ConfigurationError:
        raise
    except StateError as exc:
        session.note(f"the store is down ({exc}); serving anyway, and trying again")

    def opener() -> AsyncStateManager:
        return first.pop() if first else open_store()

    return opener


def serve(
    host: Annotated[
        str,
        typer.Option(
            "--host", metavar="HOST", help="Address to listen on; beyond loopback it needs --token."
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option("--port", "-p", min=0, max=65535, metavar="PORT", help="TCP port (0: any free port)."),
    ] = DASHBOARD_PORT,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            metavar="TOKEN",
            envvar=ENV_DASHBOARD_TOKEN,
            show_envvar=True,
            help="Bearer token every request must carry (browsers: open /?token=TOKEN once). "
            "At least 16 characters; prefer the environment variable to the command line.",
        ),
    ] = None,
    refresh: Annotated[
        float,
        typer.Option(
            "--refresh", min=0.05, metavar="SECONDS", help="Seconds between two reads of the totals."
        ),
    ] = 1.0,
    verify_every: Annotated[
        float,
        typer.Option(
            "--verify-every",
            min=0.0,
            metavar="SECONDS",
            help="Seconds between two checks of the whole audit chain (0: never).",
        ),
    ] = 300.0,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: ListeningJsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Serve a read-only web dashboard of the store on http://HOST:PORT/ until stopped.

    Totals, budget scopes with their period usage, spend over time, the agents table (sorted and
    filtered by status and labels on the server), each agent's state, holds and events, a live
    audit feed and the chain's verification status; /metrics (Prometheus) and /healthz on the
    same port. It keeps serving while the store is down, and says so. It listens on loopback
    only, unless --token is given. Guide: docs/dashboard.md
    """
    session = Session(url, json_output)
    # Without the extra: a one-line MissingDependency naming it.
    from ..dashboard import DashboardServer, DashboardSettings, check_bind

    check_bind(host, token)
    settings = DashboardSettings(
        _opener(session), masked_url(url), token=token, refresh=refresh, verify_every=verify_every
    )
    server = DashboardServer(settings, host, port)
    if session.json:
        session.emit_line({"url": masked_url(url), "host": host, "port": server.port, "endpoint": server.url})
    session.note(f"serving the dashboard of {masked_url(url)} on {server.url} (Ctrl-C to stop)")
    server.serve()
    session.note("stopped")
