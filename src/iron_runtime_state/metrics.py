"""Prometheus metrics for a fleet: a collector for your own app, and what ``iron-state metrics`` serves.

Needs the ``metrics`` extra (``pip install 'iron-runtime-state[metrics]'``). Register the
collector once, in the process that already exposes metrics::

    from prometheus_client import REGISTRY, start_http_server
    from iron_runtime_state import StateManager
    from iron_runtime_state.metrics import FleetCollector

    manager = StateManager.from_env()
    REGISTRY.register(FleetCollector(manager))
    start_http_server(9464, addr="127.0.0.1")

At each scrape the collector reads :meth:`StateManager.stats` and
:meth:`StateManager.audit_count`: the store's running totals, never a scan of the agents, so a
scrape costs the same for ten agents or ten million. Every metric is a gauge, since purging
agents or pruning the trail lowers them:

=====================================  =======================================================
``iron_state_agents{status}``          agents by status: ``running``, ``stopped``, ``failed``
``iron_state_budget_spent``            sum of ``budget_spent`` over every stored agent
``iron_state_pii_detections``          sum of ``pii_detections`` over every stored agent
``iron_state_audit_records``           records in the audit trail
``iron_state_up``                      1 when the store answered this scrape, else 0
``iron_state_scrape_duration_seconds`` time this scrape spent reading the store
=====================================  =======================================================

When the store cannot be read, the scrape still succeeds with ``iron_state_up 0`` (and a
warning logged on ``iron_runtime_state.metrics``), so alerts can key on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Final
from wsgiref.simple_server import WSGIServer

from .config import METRICS_PORT
from .errors import MissingDependency, StateError
from .manager import StateManager
from .models import AgentStatus

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependency(
        "iron_runtime_state.metrics needs the 'metrics' extra: pip install 'iron-runtime-state[metrics]'"
    ) from exc

__all__ = ["DEFAULT_PORT", "PREFIX", "FleetCollector", "serve_metrics"]

#: The prefix of every metric name.
PREFIX: Final = "iron_state"
#: The port ``iron-state metrics`` listens on by default.
DEFAULT_PORT: Final = METRICS_PORT

logger: Final = logging.getLogger("iron_runtime_state.metrics")


class FleetCollector:
    """A Prometheus collector reporting one store's fleet totals at scrape time.

    It follows ``prometheus_client``'s custom collector protocol: register it with
    ``REGISTRY.register(FleetCollector(manager))`` or with your own ``CollectorRegistry``.
    ``describe()`` names the metrics without touching the store, so registering is free.
    """

    def __init__(self, manager: StateManager) -> None:
        """Report on ``manager``'s store (the collector does not close it)."""
        if not isinstance(manager, StateManager):
            raise TypeError(f"FleetCollector needs a StateManager, got {type(manager).__name__}")
        self._manager = manager

    @property
    def manager(self) -> StateManager:
        """The manager whose store is reported."""
        return self._manager

    def describe(self) -> Iterator[Metric]:
        """The metric families this collector yields, without samples."""
        agents, spent, pii, records, up, duration = _families()
        yield from (agents, spent, pii, records, up, duration)

    def collect(self) -> Iterator[Metric]:
        """Read the store's totals and yield them as gauges."""
        agents, spent, pii, records, up, duration = _families()
        started = time.perf_counter()
        try:
            stats = self._manager.stats()
            audit_records = self._manager.audit_count()
        except StateError as exc:
            logger.warning("metrics: cannot read %s: %s", self._manager.url, exc)
            up.add_metric([], 0.0)
            duration.add_metric([], time.perf_counter() - started)
            yield from (up, duration)
            return
        for status in AgentStatus:
            agents.add_metric([status.value], float(getattr(stats, status.value)))
        spent.add_metric([], stats.budget_spent)
        pii.add_metric([], float(stats.pii_detections))
        records.add_metric([], float(audit_records))
        up.add_metric([], 1.0)
        duration.add_metric([], time.perf_counter() - started)
        yield from (agents, spent, pii, records, up, duration)

    def __repr__(self) -> str:
        return f"FleetCollector({self._manager.url!r})"


def serve_metrics(
    manager: StateManager, port: int = DEFAULT_PORT, addr: str = "127.0.0.1"
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``manager``'s fleet metrics (only those) on ``http://addr:port/metrics`` in a thread.

    What ``iron-state metrics`` runs. Listens on the loopback interface unless ``addr`` says
    otherwise; ``port=0`` picks a free port (``server.server_port``). Stop it with
    ``server.shutdown()``. In an app that already serves metrics, register a
    :class:`FleetCollector` in its registry instead.
    """
    registry = CollectorRegistry()
    registry.register(FleetCollector(manager))
    return start_http_server(port, addr=addr, registry=registry)


def _families() -> tuple[
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
]:
    return (
        GaugeMetricFamily(f"{PREFIX}_agents", "Stored agents, by status.", labels=["status"]),
        GaugeMetricFamily(f"{PREFIX}_budget_spent", "Budget spent by every stored agent, summed."),
        GaugeMetricFamily(f"{PREFIX}_pii_detections", "PII detections of every stored agent, summed."),
        GaugeMetricFamily(f"{PREFIX}_audit_records", "Records in the audit trail."),
        GaugeMetricFamily(f"{PREFIX}_up", "1 when the store answered this scrape, 0 when it did not."),
        GaugeMetricFamily(
            f"{PREFIX}_scrape_duration_seconds", "Seconds this scrape spent reading the store."
        ),
    )
