"""``metrics``: serve Prometheus metrics for a store until stopped, even while the store is down."""

from __future__ import annotations

import signal
import threading
import types
from collections.abc import Callable
from typing import Annotated, Final

import typer

from ..config import CLI_DEFAULT_URL, METRICS_PORT, masked_url
from ..errors import ConfigurationError, StateError
from ..manager import StateManager
from .exit_codes import CommandError
from .options import DebugOption, UrlOption
from .session import Session

__all__ = ["METRICS_PORT", "ListeningJsonOption", "metrics"]

_STOP_SIGNALS: Final = (signal.SIGTERM,)

#: ``--json`` of the commands that serve (``metrics``, ``serve``).
ListeningJsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Once listening, print where as one line of JSON on stdout (url, host, port, endpoint).",
    ),
]


def _serve_until_stopped(stop: threading.Event) -> None:
    """Block until ``stop`` is set (SIGTERM) or Ctrl-C; tests replace it."""
    while not stop.wait(0.5):
        pass


def metrics(
    port: Annotated[
        int,
        typer.Option("--port", "-p", min=0, max=65535, metavar="PORT", help="TCP port (0: any free port)."),
    ] = METRICS_PORT,
    host: Annotated[
        str,
        typer.Option("--host", metavar="HOST", help="Address to listen on (0.0.0.0 for every interface)."),
    ] = "127.0.0.1",
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: ListeningJsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Serve Prometheus metrics for the store on http://HOST:PORT/metrics until stopped.

    Gauges: iron_state_agents{status}, iron_state_budget_spent, iron_state_pii_detections,
    iron_state_audit_records, per budget scope iron_state_scope_spent/limit/held and
    iron_state_scope_period_start_seconds{scope}, iron_state_up,
    iron_state_scrape_duration_seconds. Counters read from the audit trail as it grows:
    iron_state_spends_refused_total, iron_state_reservations_refused_total,
    iron_state_overspent_total, iron_state_budget_resets_total, iron_state_holds_expired_total,
    iron_state_threshold_crossings_total (label scope); from the spend ledger
    iron_state_spend_total, iron_state_spend_calls_total (label model) and
    iron_state_spend_tokens_total (labels model, kind). A store that is down, at start-up or
    later, scrapes as iron_state_up 0 until it answers again; the command keeps serving.
    """
    session = Session(url, json_output)
    # Without the extra: a one-line MissingDependency.
    from ..metrics import TrailCounters, follow_trail, lazy_manager, serve_metrics

    source = lazy_manager(_first_open(session))
    counters = TrailCounters()
    try:
        server, thread = serve_metrics(source, port, host, counters=counters)
    except OSError as exc:
        _close(source)
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    stop = threading.Event()
    follower = threading.Thread(
        target=follow_trail, args=(source, counters, stop), name="iron-state-follow", daemon=True
    )
    follower.start()
    try:
        _serve(session, server.server_port, host, stop)
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        follower.join(timeout=5)
        _close(source)
    session.note("stopped")


def _first_open(session: Session) -> Callable[[], StateManager]:
    """An opener of the store that fails now on a bad URL or a missing extra, but not on a store
    that is down: that one scrapes as ``iron_state_up 0`` and is opened again at each scrape."""
    opened: list[StateManager] = []
    try:
        opened.append(session.open())
    except ConfigurationError:
        raise
    except StateError as exc:
        session.note(f"the store is down ({exc}); serving iron_state_up 0 until it answers")

    def open_store() -> StateManager:
        return opened.pop() if opened else session.open()

    return open_store


def _close(source: Callable[[], StateManager]) -> None:
    try:
        manager = source()
    except StateError:
        return  # never opened
    manager.close()


def _serve(session: Session, port: int, host: str, stop: threading.Event) -> None:
    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        stop.set()

    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, on_signal)
    shown_host = f"[{host}]" if ":" in host else host
    endpoint = f"http://{shown_host}:{port}/metrics"
    url = masked_url(session.url)
    if session.json:
        session.emit_line({"url": url, "host": host, "port": port, "endpoint": endpoint})
    session.note(f"serving metrics for {url} on {endpoint} (Ctrl-C to stop)")
    try:
        _serve_until_stopped(stop)
    except KeyboardInterrupt:
        pass
    finally:
        if in_main_thread:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
