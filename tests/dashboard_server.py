"""A dashboard served in a thread of the test process, over a store the test writes to.

Shared by tests/test_dashboard.py (HTTP) and tests/test_dashboard_browser.py (headless
Chromium). The store is either memory (the test's manager and the dashboard's share one
``MemoryBackend``) or a SQLite file (the test writes through its own manager, as another
process would).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iron_runtime_state import AsyncStateManager, StateManager
from iron_runtime_state._demo import DEMO_PRICES
from iron_runtime_state.backends.memory import MemoryBackend
from iron_runtime_state.dashboard import DashboardServer, DashboardSettings

STORES = ("memory", "sqlite")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Dashboard:
    """A running dashboard and a manager on the same store."""

    server: DashboardServer
    manager: StateManager
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Answer:
        request = urllib.request.Request(
            self.url.rstrip("/") + path, headers={**self.headers, **(headers or {})}, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return Answer(
                    response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
                )
        except urllib.error.HTTPError as error:
            return Answer(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())

    def events(
        self, path: str, want: int, *, timeout: float = 10.0, headers: dict[str, str] | None = None
    ) -> list[tuple[str, Any, str | None]]:
        """Read ``path`` as an event stream until ``want`` audit events came: (event, data, id) each."""
        host, port = self.server.host, self.server.port
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        found: list[tuple[str, Any, str | None]] = []
        audits = 0
        deadline = time.monotonic() + timeout
        try:
            connection.request("GET", path, headers={**self.headers, **(headers or {})})
            response = connection.getresponse()
            assert response.status == 200, response.status
            event, data, event_id = "message", "", None
            while audits < want and time.monotonic() < deadline:
                line = response.fp.readline().decode()
                if not line:
                    break
                line = line.rstrip("\n")
                if line == "":
                    if data:
                        found.append((event, json.loads(data), event_id))
                        audits += event == "audit"
                    event, data, event_id = "message", "", None
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data += line[6:]
                elif line.startswith("id: "):
                    event_id = line[4:]
        except TimeoutError:
            pass
        finally:
            connection.close()
        return found


def open_store(kind: str, folder: Path) -> tuple[StateManager, DashboardSettings]:
    """A manager for the test and the settings of a dashboard over the same store.

    The manager prices the demo's models, so that tests can run the demo fleet (``run_fleet``).
    """
    if kind == "memory":
        backend = MemoryBackend()
        return StateManager(backend, prices=DEMO_PRICES), DashboardSettings(
            lambda: AsyncStateManager(backend), "memory://", refresh=0.2, verify_every=1.0
        )
    url = f"sqlite:///{folder / 'fleet.db'}"
    manager = StateManager.from_url(url, prices=DEMO_PRICES)
    return manager, DashboardSettings.for_url(url, refresh=0.2, verify_every=1.0)


@contextlib.contextmanager
def running(settings: DashboardSettings, manager: StateManager, **headers: str) -> Iterator[Dashboard]:
    server = DashboardServer(settings, "127.0.0.1", 0)
    server.start()
    try:
        yield Dashboard(server, manager, dict(headers))
    finally:
        server.stop()


def wait_for(check: Any, timeout: float = 5.0, step: float = 0.05) -> Any:
    """Call ``check`` until it returns something true; that value (or fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {check}")
        time.sleep(step)
