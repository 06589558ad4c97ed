"""``metrics``: serve Prometheus metrics for a store until stopped."""

from __future__ import annotations

import signal
import threading
import types
from typing import Annotated, Final

import typer

from ..config import CLI_DEFAULT_URL, METRICS_PORT
from .exit_codes import CommandError
from .options import DebugOption, UrlOption
from .session import Session

__all__ = ["METRICS_PORT", "metrics"]

_STOP_SIGNALS: Final = (signal.SIGTERM,)


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
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Once listening, print where as one line of JSON on stdout (url, host, port, endpoint).",
        ),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Serve Prometheus metrics for the store on http://HOST:PORT/metrics until stopped.

    Gauges: iron_state_agents{status}, iron_state_budget_spent, iron_state_pii_detections,
    iron_state_audit_records, iron_state_up, iron_state_scrape_duration_seconds.
    """
    session = Session(url, json_output)
    from ..metrics import serve_metrics  # without the extra: a one-line MissingDependency

    with session.open() as manager:
        manager.stats()  # fail now, with a clear message, if the store cannot be reached
        try:
            server, thread = serve_metrics(manager, port, host)
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        stop = threading.Event()
        previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}

        def on_signal(signum: int, frame: types.FrameType | None) -> None:
            stop.set()

        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            for sig in _STOP_SIGNALS:
                signal.signal(sig, on_signal)
        shown_host = f"[{host}]" if ":" in host else host
        endpoint = f"http://{shown_host}:{server.server_port}/metrics"
        if session.json:
            session.emit_line(
                {"url": manager.url, "host": host, "port": server.server_port, "endpoint": endpoint}
            )
        session.note(f"serving metrics for {manager.url} on {endpoint} (Ctrl-C to stop)")
        try:
            _serve_until_stopped(stop)
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            if in_main_thread:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        session.note("stopped")
