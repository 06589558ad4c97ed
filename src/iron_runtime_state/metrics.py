"""Prometheus metrics for a fleet: a collector for your own app, and what ``iron-state metrics`` serves.

Needs the ``metrics`` extra (``pip install 'iron-runtime-state[metrics]'``). Register the
collector once, in the process that already exposes metrics::

    from prometheus_client import REGISTRY, start_http_server
    from iron_runtime_state import StateManager
    from iron_runtime_state.metrics import FleetCollector

    manager = StateManager.from_env()
    REGISTRY.register(FleetCollector(manager))
    start_http_server(9464, addr="127.0.0.1")

At each scrape the collector reads :meth:`StateManager.stats`, :meth:`StateManager.audit_count`
and :meth:`StateManager.list_budgets`: the store's running totals and its budget scopes, never
a scan of the agents, so a scrape costs the same for ten agents or ten million. These are
gauges, since purging agents, pruning the trail or a new budget period lowers them:

===========================================  ==================================================
``iron_state_agents{status}``                agents by status: ``running``, ``stopped``, ``failed``
``iron_state_budget_spent``                  sum of ``budget_spent`` over every stored agent
``iron_state_pii_detections``                sum of ``pii_detections`` over every stored agent
``iron_state_audit_records``                 records in the audit trail
``iron_state_scope_spent{scope}``            a budget scope's spend in its current period
``iron_state_scope_limit{scope}``            its limit (no sample for a scope without one)
``iron_state_scope_held{scope}``             its open holds (reserved, not yet settled)
``iron_state_scope_period_start_seconds``    the start of its current period, in Unix seconds
                                             (no sample for a scope without a period)
``iron_state_up``                            1 when the store answered this scrape, else 0
``iron_state_scrape_duration_seconds``       time this scrape spent reading the store
===========================================  ==================================================

**Counters from the audit trail.** Refusals, overspends, period resets, expired holds and
threshold crossings are events in the audit trail, not totals the store keeps, so they are
counted by following the trail with :meth:`StateManager.watch` (:class:`TrailCounters`, fed by
:func:`follow_trail` in a thread, or by the dashboard's feed). They count what was appended
since the follower started (a restart starts them from 0, which Prometheus's ``rate()`` and
``increase()`` expect of a counter); every process following one store counts the same events,
whichever process wrote them. Label ``scope`` is the budget scope concerned, ``""`` for an
agent's own budget:

==================================================  ==========================================
``iron_state_spends_refused_total{scope}``          ``budget_exceeded`` events of ``record_spend``
``iron_state_reservations_refused_total{scope}``    ``budget_exceeded`` events of ``reserve_budget``
``iron_state_overspent_total{scope}``               commits that took a budget past its limit
``iron_state_budget_resets_total{scope}``           periods that ended (``budget_reset``)
``iron_state_holds_expired_total{scope}``           ``hold_expired`` events
``iron_state_threshold_crossings_total{scope}``     ``budget_threshold`` events
``iron_state_audit_followed_seq``                   the last ``seq`` the follower counted (a gauge)
==================================================  ==========================================

The spend ledger is counted the same way, from its ``spend`` records (one per settled spend:
``record_spend``, a commit, a usage-priced call). Label ``model`` is the model of a metered
call, ``""`` for a spend that names none. Amounts are summed exactly (micro-units) and shown
in the budgets' unit of money:

==================================================  ==========================================
``iron_state_spend_total{model}``                   money spent (the ``spend`` records' amounts)
``iron_state_spend_calls_total{model}``             settled spends (``spend`` records)
``iron_state_spend_tokens_total{model,kind}``       tokens of metered calls; ``kind`` is
                                                    ``input``, ``output`` or ``cached_input``
==================================================  ==========================================

``rate(iron_state_spend_total[1h]) * 3600`` is the spend per hour, by model; for totals over
days or by agent, scope or label, ask the ledger (:meth:`StateManager.spend_report`,
``iron-state spend``).

When the store cannot be read, the scrape still succeeds with ``iron_state_up 0`` (and a
warning logged on ``iron_runtime_state.metrics``), so alerts can key on it. A collector given
an opener rather than a manager (:class:`FleetCollector`) opens the store at the first scrape
and again after a failed open: the exporter starts, and reports the store as down, even while
the store cannot be reached.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final
from wsgiref.simple_server import WSGIServer

from .config import METRICS_PORT
from .errors import ConfigurationError, MissingDependency, StateError
from .manager import StateManager
from .models import AgentStatus, AuditRecord, BudgetState, FleetStats
from .money import from_micros, to_micros

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependency(
        "iron_runtime_state.metrics needs the 'metrics' extra: pip install 'iron-runtime-state[metrics]'"
    ) from exc

__all__ = [
    "DEFAULT_PORT",
    "PREFIX",
    "FleetCollector",
    "FleetReading",
    "ManagerSource",
    "TrailCounters",
    "fleet_families",
    "follow_trail",
    "lazy_manager",
    "read_fleet",
    "serve_metrics",
]

#: The prefix of every metric name.
PREFIX: Final = "iron_state"
#: The port ``iron-state metrics`` listens on by default.
DEFAULT_PORT: Final = METRICS_PORT
#: Seconds :func:`follow_trail` waits before it tries a store that failed again (doubling up to
#: :data:`RETRY_MAX`).
RETRY_FIRST: Final = 0.5
RETRY_MAX: Final = 15.0

logger: Final = logging.getLogger("iron_runtime_state.metrics")

#: A manager, or a function that opens one (called again after it failed).
ManagerSource = StateManager | Callable[[], StateManager]


@dataclass(frozen=True, slots=True)
class FleetReading:
    """What one scrape read from the store."""

    stats: FleetStats
    audit_records: int
    budgets: Sequence[BudgetState]


def read_fleet(manager: StateManager) -> FleetReading:
    """The store's totals and budget scopes, as a scrape reports them (three store calls)."""
    return FleetReading(manager.stats(), manager.audit_count(), manager.list_budgets())


# -- counting the audit trail ---------------------------------------------------------------------

#: Counter name (without ``_total``) and help, by what is counted.
_COUNTERS: Final = (
    ("spends_refused", "Spends refused because a budget would pass its limit (budget_exceeded)."),
    ("reservations_refused", "Holds refused because a budget would pass its limit (budget_exceeded)."),
    ("overspent", "Commits whose real cost took a budget past its limit (budget_exceeded)."),
    ("budget_resets", "Budget periods that ended (budget_reset)."),
    ("holds_expired", "Holds released by the store when their ttl ran out (hold_expired)."),
    ("threshold_crossings", "Spends that crossed a budget threshold (budget_threshold)."),
)
#: ``budget_exceeded`` by its ``action`` detail.
_REFUSALS: Final = {"spend": "spends_refused", "reserve": "reservations_refused", "commit": "overspent"}
#: The other counted event types.
_EVENTS: Final = {
    "budget_reset": "budget_resets",
    "hold_expired": "holds_expired",
    "budget_threshold": "threshold_crossings",
}


#: Token counts of a ``spend`` record, by the ``kind`` label of ``iron_state_spend_tokens_total``.
_TOKENS: Final = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cached_input", "cached_input_tokens"),
)


def _details(record: AuditRecord) -> dict[str, object]:
    """The record's details as a JSON object (library events always are; anything else is ``{}``)."""
    try:
        found = json.loads(record.details)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _count_of(value: object) -> int:
    """A token count of a record's details (0 for anything that is not one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(slots=True)
class _Spend:
    """The ledger's running sums for one model: micro-units, records and tokens by kind."""

    micros: int = 0
    calls: int = 0
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, details: dict[str, object]) -> None:
        # A record the library did not write may lack a readable amount: a call of no amount.
        with contextlib.suppress(StateError):
            self.micros += to_micros(details.get("amount"))
        self.calls += 1
        for kind, key in _TOKENS:
            self.tokens[kind] = self.tokens.get(kind, 0) + _count_of(details.get(key))

    def copy(self) -> _Spend:
        return _Spend(self.micros, self.calls, dict(self.tokens))


class TrailCounters:
    """Counts of budget events and sums of the spend ledger in the audit trail, fed record by
    record (no I/O): each record is looked at once, so counting costs nothing per scrape.

    Feed it every record a :meth:`StateManager.watch` hands out (:func:`follow_trail` does);
    ``last_seq`` is where a follower resumes after the store failed, so nothing is counted
    twice or missed. Thread-safe: a follower thread counts while a scrape reads.
    """

    def __init__(self, after_seq: int | None = None) -> None:
        """Count records after ``after_seq`` (``None``: from the trail's head when following starts)."""
        self.last_seq = after_seq
        self._counts: Counter[tuple[str, str]] = Counter()
        self._spend: dict[str, _Spend] = {}
        self._lock = threading.Lock()

    def count(self, records: Iterable[AuditRecord]) -> None:
        """Count ``records`` (in ``seq`` order; one already counted is skipped)."""
        with self._lock:
            for record in records:
                if self.last_seq is not None and record.seq <= self.last_seq:
                    continue
                self.last_seq = record.seq
                kind = record.event_type
                if kind == "spend":
                    self._add_spend(_details(record))
                    continue
                name = _EVENTS.get(kind)
                if kind == "budget_exceeded":
                    name = _REFUSALS.get(str(_details(record).get("action")))
                if name is None:
                    continue
                scope = _details(record).get("scope")
                self._counts[name, scope if isinstance(scope, str) else ""] += 1

    def _add_spend(self, details: dict[str, object]) -> None:
        model = details.get("model")
        key = model if isinstance(model, str) else ""
        sums = self._spend.get(key)
        if sums is None:
            sums = self._spend[key] = _Spend()
        sums.add(details)

    def spend(self) -> dict[str, tuple[float, int, dict[str, int]]]:
        """The ledger's sums by model (``""``: spends naming none): amount, calls, tokens by kind."""
        with self._lock:
            return {m: (from_micros(s.micros), s.calls, dict(s.tokens)) for m, s in self._spend.items()}

    def start_at(self, seq: int) -> None:
        """Count from after ``seq`` unless counting already started."""
        with self._lock:
            if self.last_seq is None:
                self.last_seq = seq

    def snapshot(self) -> tuple[int | None, dict[tuple[str, str], int]]:
        """``last_seq`` and the counts by (counter, scope), read together."""
        with self._lock:
            return self.last_seq, dict(self._counts)

    def families(self) -> list[Metric]:
        """The counters as metric families (and the followed ``seq`` as a gauge)."""
        with self._lock:
            last, counts = self.last_seq, dict(self._counts)
            spend = {model: sums.copy() for model, sums in self._spend.items()}
        found: list[Metric] = []
        for name, text in _COUNTERS:
            family = CounterMetricFamily(f"{PREFIX}_{name}", text, labels=["scope"])
            for (counter, scope), value in sorted(counts.items()):
                if counter == name:
                    family.add_metric([scope], float(value))
            found.append(family)
        found.extend(_spend_families(spend))
        followed = GaugeMetricFamily(
            f"{PREFIX}_audit_followed_seq", "The last audit record seq the event counters have read."
        )
        if last is not None:
            followed.add_metric([], float(last))
        found.append(followed)
        return found


def _spend_families(spend: dict[str, _Spend]) -> list[Metric]:
    amount = CounterMetricFamily(
        f"{PREFIX}_spend", "Money spent, from the spend ledger (spend records), by model.", labels=["model"]
    )
    calls = CounterMetricFamily(
        f"{PREFIX}_spend_calls", "Settled spends (spend records), by model.", labels=["model"]
    )
    tokens = CounterMetricFamily(
        f"{PREFIX}_spend_tokens",
        "Tokens of metered model calls, by model and kind (input, output, cached_input).",
        labels=["model", "kind"],
    )
    for model, sums in sorted(spend.items()):
        amount.add_metric([model], from_micros(sums.micros))
        calls.add_metric([model], float(sums.calls))
        for kind, _ in _TOKENS:
            tokens.add_metric([model, kind], float(sums.tokens.get(kind, 0)))
    return [amount, calls, tokens]


def lazy_manager(source: ManagerSource) -> Callable[[], StateManager]:
    """A function that returns the source's manager, opening it on first use and again after a
    failed open (the same manager ever after). A manager is returned as it is."""
    if isinstance(source, StateManager):
        manager = source
        return lambda: manager
    opener = source
    held: list[StateManager] = []
    lock = threading.Lock()

    def get() -> StateManager:
        with lock:
            if not held:
                held.append(opener())
            return held[0]

    return get


def follow_trail(
    source: ManagerSource,
    counters: TrailCounters,
    stop: threading.Event,
    *,
    idle: float = 1.0,
) -> None:
    """Count the trail's new records into ``counters`` until ``stop`` is set (run it in a thread).

    Follows :meth:`StateManager.watch` from ``counters.last_seq`` (the head, when ``None``).
    While the store fails it retries, waiting longer each time up to :data:`RETRY_MAX`
    seconds, and resumes from the last counted record: no record is missed or counted twice.
    ``stop`` is noticed within ``idle`` seconds.
    """
    get = lazy_manager(source)
    delay = RETRY_FIRST
    while not stop.is_set():
        try:
            manager = get()
            if counters.last_seq is None:  # start from the head, once it can be read
                counters.start_at(manager.backend.audit_marks().head[0])
            for record in manager.watch(after_seq=counters.last_seq, idle_timeout=idle):
                counters.count((record,))
                delay = RETRY_FIRST
                if stop.is_set():
                    return
        except StateError as exc:
            logger.warning("metrics: cannot follow the audit trail (retrying in %.1fs): %s", delay, exc)
            stop.wait(delay)
            delay = min(delay * 2, RETRY_MAX)


# -- the collector ----------------------------------------------------------------------------------


def _gauges() -> tuple[GaugeMetricFamily, ...]:
    return (
        GaugeMetricFamily(f"{PREFIX}_agents", "Stored agents, by status.", labels=["status"]),
        GaugeMetricFamily(f"{PREFIX}_budget_spent", "Budget spent by every stored agent, summed."),
        GaugeMetricFamily(f"{PREFIX}_pii_detections", "PII detections of every stored agent, summed."),
        GaugeMetricFamily(f"{PREFIX}_audit_records", "Records in the audit trail."),
        GaugeMetricFamily(
            f"{PREFIX}_scope_spent", "A budget scope's spend in its current period.", labels=["scope"]
        ),
        GaugeMetricFamily(f"{PREFIX}_scope_limit", "A budget scope's limit.", labels=["scope"]),
        GaugeMetricFamily(
            f"{PREFIX}_scope_held", "A budget scope's open holds (reserved, not settled).", labels=["scope"]
        ),
        GaugeMetricFamily(
            f"{PREFIX}_scope_period_start_seconds",
            "The start of a budget scope's current period, in Unix seconds.",
            labels=["scope"],
        ),
    )


def _status_gauges() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(f"{PREFIX}_up", "1 when the store answered this scrape, 0 when it did not."),
        GaugeMetricFamily(
            f"{PREFIX}_scrape_duration_seconds", "Seconds this scrape spent reading the store."
        ),
    )


def fleet_families(
    reading: FleetReading | None, duration: float, counters: TrailCounters | None = None
) -> list[Metric]:
    """Every metric family of one scrape: ``reading`` is ``None`` when the store did not answer.

    Shared by :class:`FleetCollector` and the dashboard's ``/metrics``, so both report alike.
    """
    up, took = _status_gauges()
    took.add_metric([], duration)
    found: list[Metric] = []
    if reading is None:
        up.add_metric([], 0.0)
    else:
        up.add_metric([], 1.0)
        agents, spent, pii, records, scope_spent, scope_limit, scope_held, scope_start = _gauges()
        stats = reading.stats
        for status in AgentStatus:
            agents.add_metric([status.value], float(getattr(stats, status.value)))
        spent.add_metric([], stats.budget_spent)
        pii.add_metric([], float(stats.pii_detections))
        records.add_metric([], float(reading.audit_records))
        for budget in reading.budgets:
            scope_spent.add_metric([budget.scope], budget.spent)
            scope_held.add_metric([budget.scope], budget.held)
            if budget.limit is not None:
                scope_limit.add_metric([budget.scope], budget.limit)
            if budget.period_start is not None:
                scope_start.add_metric([budget.scope], budget.period_start.timestamp())
        found.extend((agents, spent, pii, records, scope_spent, scope_limit, scope_held, scope_start))
    found.extend((up, took))
    if counters is not None:
        found.extend(counters.families())
    return found


class FleetCollector:
    """A Prometheus collector reporting one store's fleet totals and budget scopes at scrape time.

    It follows ``prometheus_client``'s custom collector protocol: register it with
    ``REGISTRY.register(FleetCollector(manager))`` or with your own ``CollectorRegistry``.
    ``describe()`` names the metrics without touching the store, so registering is free.
    """

    def __init__(self, manager: ManagerSource, *, counters: TrailCounters | None = None) -> None:
        """Report on ``manager``'s store (the collector does not close it).

        ``manager`` may also be a function that opens one: it is called at the first scrape,
        and at each scrape after it failed, so a store that is down at start-up reports
        ``iron_state_up 0`` until it can be opened. ``counters`` (fed by :func:`follow_trail`)
        adds the counters of budget events.
        """
        if not isinstance(manager, StateManager) and not callable(manager):
            raise TypeError(
                "FleetCollector needs a StateManager (or a function that opens one), "
                f"got {type(manager).__name__}"
            )
        self._source = manager
        self._get = lazy_manager(manager)
        self._counters = counters

    @property
    def manager(self) -> StateManager:
        """The manager whose store is reported (opened now if the collector was given an opener)."""
        return self._get()

    def describe(self) -> Iterator[Metric]:
        """The metric families this collector yields, without samples."""
        yield from _gauges()
        yield from _status_gauges()
        if self._counters is not None:
            yield from TrailCounters().families()

    def collect(self) -> Iterator[Metric]:
        """Read the store's totals and budget scopes and yield them."""
        started = time.perf_counter()
        reading: FleetReading | None = None
        try:
            reading = read_fleet(self._get())
        except StateError as exc:
            logger.warning("metrics: cannot read %s: %s", self._describe_source(), exc)
        yield from fleet_families(reading, time.perf_counter() - started, self._counters)

    def _describe_source(self) -> str:
        return self._source.url if isinstance(self._source, StateManager) else "the store"

    def __repr__(self) -> str:
        source = self._source
        shown = source.url if isinstance(source, StateManager) else getattr(source, "__name__", "opener")
        return f"FleetCollector({shown!r})"


def serve_metrics(
    manager: ManagerSource,
    port: int = DEFAULT_PORT,
    addr: str = "127.0.0.1",
    *,
    counters: TrailCounters | None = None,
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``manager``'s fleet metrics (only those) on ``http://addr:port/metrics`` in a thread.

    What ``iron-state metrics`` runs. Listens on the loopback interface unless ``addr`` says
    otherwise; ``port=0`` picks a free port (``server.server_port``). Stop it with
    ``server.shutdown()``. In an app that already serves metrics, register a
    :class:`FleetCollector` in its registry instead. ``manager`` and ``counters`` are as for
    :class:`FleetCollector`.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigurationError(f"port must be an int from 0 to 65535, got {port!r}")
    registry = CollectorRegistry()
    registry.register(FleetCollector(manager, counters=counters))
    return start_http_server(port, addr=addr, registry=registry)
