"""The contract every store implements.

The manager validates its inputs, writes audit events and logs; a backend stores. Each
atomic operation here is atomic in the store itself (a lock, a transaction, a Lua script), so
it holds across threads, processes and hosts as far as the store is shared.

Arguments reaching a backend are already valid: ids are ``AgentId``, amounts are whole
micro-units (``int``, see :mod:`..money`), states passed ``AgentState.validate()`` and carry the
``period_start`` the manager gave them. Budget rules (limits, periods) are in :mod:`..budgets`.
A backend raises only ``StateError`` subclasses: a backend that talks to a driver lists the
driver's exception types in ``driver_errors`` and maps them in ``map_driver_error``; every
public method is wrapped once here, so no method needs its own try/except.
"""

from __future__ import annotations

import abc
import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar

from ..audit_chain import AuditChain, AuditRow
from ..errors import BackendError, StateError
from ..ids import AgentId
from ..ledger import LedgerEntry, SpendNote, SpendQuery, SpendTotal, aggregate, entry_of
from ..models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation
from ..thresholds import DEFAULT_THRESHOLDS

__all__ = [
    "AGENT_ORDERS",
    "ITERATORS",
    "OPERATIONS",
    "WAITING",
    "WAIT_POLL",
    "AgentPage",
    "AuditMarks",
    "AuditQuery",
    "Backend",
    "BudgetChange",
    "BudgetRow",
    "Change",
    "CommitResult",
    "OpsBackend",
    "SpendResult",
    "UpdateFn",
]

UpdateFn = Callable[[AgentState], AgentState]
#: Seconds between two looks at the head in the default :meth:`Backend.wait_audit`.
WAIT_POLL: Final = 0.05
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters for audit queries; every field is optional and they combine with AND."""

    agent_id: AgentId | None = None
    event_type: str | None = None
    since: int | None = None  # timestamp >= since
    until: int | None = None  # timestamp <= until
    after_seq: int | None = None  # seq > after_seq
    limit: int | None = None

    def matches(self, seq: int, agent_id: str, event_type: str, timestamp: int) -> bool:
        """Whether a record passes every filter but ``limit``."""
        return (
            (self.agent_id is None or agent_id == self.agent_id.as_str())
            and (self.event_type is None or event_type == self.event_type)
            and (self.since is None or timestamp >= self.since)
            and (self.until is None or timestamp <= self.until)
            and (self.after_seq is None or seq > self.after_seq)
        )


#: What a page of agents may be sorted by.
AGENT_ORDERS: Final = ("agent_id", "status", "budget_spent", "pii_detections")


@dataclass(frozen=True, slots=True)
class AgentPage:
    """One page of agents, filtered and sorted (``page_agents``): ``offset`` and ``limit`` in the
    sorted order; ties sort by ``agent_id`` in the same direction (descending with
    ``descending=True``)."""

    status: AgentStatus | None = None
    labels: Mapping[str, str] | None = None
    order_by: str = "agent_id"  # one of AGENT_ORDERS
    descending: bool = False
    offset: int = 0
    limit: int = 50

    def sort_key(self, state: AgentState) -> tuple[Any, str]:
        """The order of a page, for a store that sorts in Python."""
        value: Any = state.agent_id.as_str()
        if self.order_by == "status":
            value = state.status.value
        elif self.order_by in ("budget_spent", "pii_detections"):
            value = getattr(state, self.order_by)
        return value, state.agent_id.as_str()


@dataclass(frozen=True, slots=True)
class BudgetRow:
    """A budget scope as a store keeps it: amounts in micro-units, times in Unix seconds.

    ``period_start`` is the start of the period ``spent`` belongs to (``None`` without a
    period), as stored: it may be a period that has ended (the manager reads it through
    :func:`..budgets.budget_view`). ``held`` is the sum of the open (unexpired) holds on it.
    """

    scope: str
    limit: int | None
    period: str | None
    tz: str
    period_start: float | None
    spent: int
    held: int
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS


@dataclass(slots=True)  # not frozen: built on every spend, and frozen init is slow
class SpendResult:
    """What an atomic spend did: the new state, or why it was refused."""

    state: AgentState
    exceeded: bool = False  # True: nothing was charged, a limit would have been passed
    reserved: int = 0  # the agent's open holds at the time of the check (micro-units)
    #: The audit records appended in the same atomic step (``hold_expired``, ``budget_reset`` of a
    #: period that ended; then the ``spend`` record and any ``budget_threshold``, or the
    #: ``budget_exceeded`` of a refusal).
    records: Sequence[AuditRecord] = ()
    #: The budget scope that refused (``None``: the agent's own limit, or no refusal).
    budget: BudgetRow | None = None


@dataclass(slots=True)
class CommitResult:
    """What committing a reservation did: the spend is always recorded."""

    state: AgentState
    exceeded: bool  # the recorded spend took the agent or one of its scopes past its limit
    #: The audit records appended in the same atomic step (``hold_expired``, ``budget_reset``,
    #: ``spend``, ``budget_exceeded``, ``budget_threshold``, in that order).
    records: Sequence[AuditRecord] = ()


@dataclass(slots=True)
class Change:
    """What a counter or status change did: the new state, and the events appended with it."""

    state: AgentState
    #: The audit records appended in the same atomic step as the change.
    records: Sequence[AuditRecord] = ()


@dataclass(slots=True)
class BudgetChange:
    """What ``set_budget`` or ``remove_budget`` did: the scope (``None``: there was none to
    remove) and the events appended with the change."""

    budget: BudgetRow | None
    records: Sequence[AuditRecord] = ()


@dataclass(frozen=True, slots=True)
class AuditMarks:
    """Where the audit trail stands, read in one snapshot.

    ``head`` is ``(seq, hash)`` of the newest record ever appended (the anchor when none remain),
    ``anchor`` the ``(seq, hash)`` the first remaining record links to (``(0, GENESIS_HASH)``
    unpruned), ``count`` the records stored. With an audit key the store keeps the head's and
    the anchor's seals (``AuditChain.seal_mark``) beside them; ``None`` where it has none.
    """

    head: tuple[int, str]
    anchor: tuple[int, str]
    count: int
    head_seal: str | None = None
    anchor_seal: str | None = None


def _wrap(method: _F) -> _F:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except StateError:
            raise
        except BaseException as exc:
            backend = args[0]
            if isinstance(exc, backend.driver_errors):
                raise backend.map_driver_error(exc) from exc
            raise

    return wrapper  # type: ignore[return-value]


def _wrap_iter(method: _F) -> _F:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            yield from method(*args, **kwargs)
        except StateError:
            raise
        except BaseException as exc:
            backend = args[0]
            if isinstance(exc, backend.driver_errors):
                raise backend.map_driver_error(exc) from exc
            raise

    return wrapper  # type: ignore[return-value]


class Backend(abc.ABC):
    """A store of agent states, reservations and one hash-chained audit trail.

    Subclasses implement every abstract method; an incomplete backend cannot be built.
    """

    #: The URL schemes this backend serves (documentation; the registry maps them).
    schemes: ClassVar[tuple[str, ...]] = ()
    #: Driver exception types that the wrapper turns into ``BackendError``.
    driver_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Whether a call can wait on I/O or locks (files, sockets). The asyncio adapter runs the
    #: calls of a blocking store in worker threads, and calls a non-blocking one (memory) directly.
    blocking: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.driver_errors:
            return
        for name in OPERATIONS:
            method = cls.__dict__.get(name)
            if method is None or getattr(method, "__isabstractmethod__", False):
                continue
            wrap = _wrap_iter if name in ITERATORS else _wrap
            setattr(cls, name, wrap(method))

    def map_driver_error(self, exc: BaseException) -> StateError:
        """The library error for a driver exception (the wrapper chains ``exc`` as the cause).

        Called on the backend, so the message can name the store (its file, its server); a
        backend that needs nothing from the instance may override it as a ``staticmethod``.
        """
        return BackendError(f"{type(exc).__name__}: {exc}")

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The store's URL with any password masked."""

    # -- agent states ---------------------------------------------------------------------

    @abc.abstractmethod
    def save(self, state: AgentState, now: float) -> None:
        """Insert or replace ``state`` (already validated; the backend may keep it)."""

    def save_many(self, states: Sequence[AgentState], now: float) -> None:
        """Insert or replace many states; backends override this to batch the writes."""
        for state in states:
            self.save(state, now)

    @abc.abstractmethod
    def get(self, key: str) -> AgentState | None:
        """An independent copy of the state of the agent whose canonical id is ``key``, or ``None``.

        Reads are keyed by the id's text and need no parse: a store holds canonical ids only,
        so a ``key`` that is not one finds nothing. The manager passes only text of the
        canonical length (:func:`~iron_runtime_state.ids.key_of`).
        """

    def get_many(self, keys: Sequence[str]) -> list[AgentState | None]:
        """The states for many keys (as in :meth:`get`), in order; stores override this to batch."""
        return [self.get(key) for key in keys]

    @abc.abstractmethod
    def remove(self, agent_id: AgentId) -> bool:
        """Remove the agent and its open reservations; ``True`` when it existed."""

    @abc.abstractmethod
    def list_ids(self) -> list[str]:
        """Every stored agent's canonical id."""

    @abc.abstractmethod
    def iter_states(
        self, status: AgentStatus | None, labels: Mapping[str, str] | None, batch_size: int
    ) -> Iterator[AgentState]:
        """Every state (or those with ``status`` and every label in ``labels``), ``batch_size`` at a time.

        States are as stored (the manager applies the period view). A store answers a label
        filter from an index where it keeps one, never by reading every agent's full state
        where it can avoid it.
        """

    def page_agents(self, page: AgentPage) -> list[AgentState]:
        """One page of the agents that match ``page``'s filters, in its order (states as stored).

        This default reads every matching agent and sorts them: a store with indexes answers
        from them instead (the dashboard pages through a million agents).
        """
        states = sorted(
            self.iter_states(page.status, page.labels, 1000), key=page.sort_key, reverse=page.descending
        )
        return states[page.offset : page.offset + page.limit]

    @abc.abstractmethod
    def stats(self) -> FleetStats:
        """Fleet totals, from aggregates kept up to date by every change (no scan).

        ``budget_spent`` sums the agents' stored spends (exact, in micro-units): an agent whose
        period ended counts its closed period until its next operation starts the new one.
        """

    @abc.abstractmethod
    def update(self, agent_id: AgentId, fn: UpdateFn, now: float, chain: AuditChain) -> Change:
        """Atomically replace the state with ``fn(copy)``; ``AgentNotFound`` when absent.

        If the agent's own period ended by ``now``, the copy ``fn`` gets starts the new period
        (``spent`` 0, the new ``period_start``) and ``events.budget_reset`` is appended in the
        same atomic step. ``fn`` validates its own result, sets its ``period_start``, and may be
        called more than once.
        """

    @abc.abstractmethod
    def record_spend(
        self, agent_id: AgentId, amount: int, now: float, chain: AuditChain, note: SpendNote | None = None
    ) -> SpendResult:
        """Atomically charge ``amount`` micro-units to the agent and to each of its budget scopes.

        All or nothing. First the agent's holds that expired unsettled are dropped (on its
        scopes too), one ``events.hold_expired`` each; a pure read never drops them, so each
        expiry is written once, by the first write that finds it (spend, reserve or commit).
        Then every budget involved whose period ended by ``now`` starts its new period
        (:func:`..budgets.rolled_start`; one ``events.budget_reset`` each). Then each budget's
        check counts its open holds: ``spent + held + amount <= limit``
        (:func:`..budgets.passes`), the agent's first, then its scopes in the order it lists
        them. A refusal charges nothing, is ``exceeded=True`` with ``budget`` naming the scope
        that refused (``None``: the agent's limit), and appends ``events.budget_exceeded`` in
        the same atomic step. A charge appends, in the same atomic step, the ledger's record
        (:func:`..events.spend`: the amount, the scopes charged, the agent's labels, ``note``),
        then one :func:`..events.budget_threshold` per threshold the charge reached
        (:func:`..thresholds.crossed`: the agent's ``budget_thresholds`` against its limit, then
        each scope's, in the order the agent lists them), raising each budget's ``alerted``
        level. Raises ``AgentNotFound``, ``AgentNotRunning``, ``BudgetNotFound`` (a scope the
        agent lists does not exist; nothing changes) or ``ValidationError`` (a total would pass
        :data:`..money.MAX_MICROS`; nothing changes).
        """

    @abc.abstractmethod
    def record_pii(
        self, agent_id: AgentId, count: int, now: float, event: AuditEvent, chain: AuditChain
    ) -> Change:
        """Atomically add ``count`` to ``pii_detections`` and append ``event`` with it.

        ``AgentNotFound`` when absent; ``ValidationError`` (nothing changes) when the count would
        reach 2**63.
        """

    @abc.abstractmethod
    def set_status(self, agent_id: AgentId, status: AgentStatus, now: float, chain: AuditChain) -> Change:
        """Atomically set the status; a real change appends ``events.status_changed`` with it."""

    # -- reservations ---------------------------------------------------------------------

    @abc.abstractmethod
    def reserve(
        self, agent_id: AgentId, amount: int, ttl: float, now: float, reservation_id: str, chain: AuditChain
    ) -> Reservation | SpendResult:
        """Hold ``amount`` micro-units on the agent and on each of its scopes, all or nothing.

        Expired holds are dropped first, periods roll as in :meth:`record_spend`, and each
        budget's check is ``spent + held + amount <= limit``. The hold remembers the scopes it
        touched. Returns the reservation (its ``scopes`` set), or a ``SpendResult`` with
        ``exceeded=True`` when refused (``events.budget_exceeded(..., "reserve")`` appended in
        the same atomic step). Raises as :meth:`record_spend` does.
        """

    @abc.abstractmethod
    def commit(
        self,
        reservation: Reservation,
        actual: int,
        now: float,
        chain: AuditChain,
        note: SpendNote | None = None,
    ) -> CommitResult:
        """Charge ``actual`` micro-units to the agent and the scopes the hold touched, and drop the
        hold everywhere, atomically.

        Expired holds go first (as in :meth:`record_spend`), then periods roll. The ledger's
        ``events.spend`` record (with the reservation's id and ``note``) is appended. A charge
        that takes a budget past its limit stands, and ``events.overspent`` is appended for each
        such budget, then ``events.budget_threshold`` for each threshold reached (as in
        :meth:`record_spend`), all in the same atomic step. A scope removed since the hold was
        made is skipped (and not named in the ``spend`` record). An ``actual`` of 0 charges
        nothing but still writes its ``spend`` record. Raises ``ReservationError`` if the hold
        is not open (settled, expired or never made).
        """

    @abc.abstractmethod
    def release(self, reservation: Reservation, now: float) -> None:
        """Drop the hold (on the agent and its scopes) without spending; ``ReservationError`` if
        it is not open. An expired hold is left for the next spend, hold or commit to drop with
        its ``hold_expired`` event (a release writes no event)."""

    @abc.abstractmethod
    def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, int]:
        """The agent's state (as stored) and the sum of its open (unexpired) holds, in micro-units."""

    # -- budget scopes --------------------------------------------------------------------

    @abc.abstractmethod
    def set_budget(
        self,
        scope: str,
        limit: int | None,
        period: str | None,
        tz: str,
        now: float,
        chain: AuditChain,
        thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    ) -> BudgetChange:
        """Create the scope, or change its limit, period, time zone and thresholds, appending
        ``events.budget_set``.

        A new scope starts with nothing spent in the period that contains ``now``, and nothing
        alerted. A changed scope keeps its spend, holds and alerted level; if its period or time
        zone changed, its spend counts in the period that contains ``now``
        (:func:`..budgets.current_start`) and its alerted level starts again from 0.
        """

    @abc.abstractmethod
    def get_budget(self, scope: str, now: float) -> BudgetRow | None:
        """The scope as stored (``held``: its unexpired holds at ``now``), or ``None``."""

    @abc.abstractmethod
    def list_budgets(self, now: float) -> list[BudgetRow]:
        """Every scope, sorted by name."""

    @abc.abstractmethod
    def remove_budget(self, scope: str, now: float, chain: AuditChain) -> BudgetChange:
        """Remove the scope (appending ``events.budget_removed``); ``budget`` is ``None`` if absent.

        Agents that list it are not changed: their spends raise ``BudgetNotFound`` until the
        scope is set again or they stop listing it. Open holds on it are dropped.
        """

    # -- audit trail ------------------------------------------------------------------------

    @abc.abstractmethod
    def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> list[AuditRecord]:
        """Append events in order, atomically as a batch, each sealed into the chain.

        The next ``seq`` and the previous hash are read and written in the same atomic step,
        so concurrent appenders (threads, processes, hosts) extend one chain. With a keyed
        chain the new head's seal is stored with it. A head below the highest this store object
        saw (a restore, a failover, a truncation) is logged as a warning and recorded by an
        ``events.audit_rewound`` record first in the same batch.
        """

    @abc.abstractmethod
    def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        """Records matching ``query`` in ``seq`` order, at most ``query.limit`` of them."""

    @abc.abstractmethod
    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Iterator[AuditRow]:
        """Every stored record with ``seq > after_seq`` as plain rows, in ``seq`` order, in batches.

        Not bounded by the head or the anchor: whatever a reader can see is handed out, so the
        verifier can flag records left before the anchor or placed after the head.
        """

    @abc.abstractmethod
    def audit_marks(self) -> AuditMarks:
        """The head, the anchor, the count and their seals, read in one snapshot."""

    def wait_audit(self, after_seq: int, timeout: float) -> bool:
        """Wait until the trail may hold a record past ``after_seq``, for at most ``timeout`` seconds.

        ``True`` when one may (the caller then queries), ``False`` on timeout. This default
        checks the head every :data:`WAIT_POLL` seconds; a store that can block on the store
        itself overrides it (a condition in memory, ``XREAD BLOCK`` on Redis, ``LISTEN`` on
        PostgreSQL, ``PRAGMA data_version`` on SQLite). The managers' ``watch()`` drives it.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.audit_marks().head[0] > after_seq:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(WAIT_POLL, left))

    @abc.abstractmethod
    def audit_count(self) -> int:
        """How many records the trail holds."""

    @abc.abstractmethod
    def prune_audit(self, before: int, chain: AuditChain) -> int:
        """Remove the longest run of oldest records whose timestamp is before ``before``.

        The hash of the last removed record becomes the anchor (sealed with a keyed chain).
        Returns how many were removed.
        """

    @abc.abstractmethod
    def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> list[str]:
        """Remove agents with one of ``statuses`` whose state last changed before the time.

        Returns the removed ids.
        """

    def spend_totals(self, query: SpendQuery) -> list[SpendTotal]:
        """The ledger's totals for ``query``: ``spend`` records grouped and summed (any order).

        This default reads every ``spend`` record in the span through :meth:`query_audit`; the
        SQL stores answer from the ledger index they write with each record instead.
        """
        return aggregate(self._ledger_entries(query), query)

    def check_ledger(self) -> tuple[int, str] | None:
        """The first ``spend`` record its ledger index disagrees with: ``(seq, what)``, or ``None``.

        ``verify_audit_log`` runs it once the chain holds: an index row edited in the store (an
        amount, an agent, a time, a model, token counts), deleted, or added without its record
        would change reports without touching the chain. This default has no index to check:
        a store whose reports read the records themselves (memory, Redis) keeps it.
        """
        return None

    def _ledger_entries(self, query: SpendQuery) -> Iterator[LedgerEntry]:
        after = 0
        while True:
            page = self.query_audit(
                AuditQuery(
                    event_type="spend",
                    since=query.since,
                    until=None if query.until is None else query.until - 1,
                    after_seq=after,
                    limit=10_000,
                )
            )
            for record in page:
                yield entry_of(record)
            if len(page) < 10_000:
                return
            after = page[-1].seq

    def migrate(self) -> str:
        """Convert data an older version stored to this version's layout; a report of what was done.

        A store that migrates by itself when it opens (memory, SQLite) has nothing to do here.
        The Redis store reads a namespace 0.4 or 0.5 wrote as it is, and changes it only after
        this (``iron-state migrate``), once every older process using it has stopped.
        """
        return f"{self.url}: nothing to migrate"

    # -- lifecycle --------------------------------------------------------------------------

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and files; calling it twice is harmless."""


def _operations() -> tuple[tuple[str, ...], frozenset[str]]:
    """The contract's operations, read off :class:`Backend` itself: every public method.

    The one list the error wrappers, the asyncio adapter and the derived forwarders use, so a
    new operation is declared once, on :class:`Backend`. An operation whose annotated result is
    an ``Iterator`` streams its items.
    """
    names = tuple(
        name
        for name, value in vars(Backend).items()
        if not name.startswith("_") and callable(value) and name != "map_driver_error"
    )
    iterators = frozenset(
        name
        for name in names
        if str(vars(Backend)[name].__annotations__.get("return", "")).startswith("Iterator")
    )
    return names, iterators


#: Every operation of the store contract, and those among them that stream their items.
OPERATIONS, ITERATORS = _operations()
#: Operations that wait (up to a timeout) rather than work: the asyncio adapter never runs them
#: on the event loop, nor in the worker threads that serve the other calls.
WAITING: Final = frozenset({"wait_audit"})


class OpsBackend(Backend):
    """A store whose operations are I/O-free generators on ``self.ops`` (the Redis stores).

    Each contract operation is derived, not written out: it builds the operation of the same
    name and arguments on ``self.ops`` and runs it with :meth:`_drive` (or, for an iterator,
    :meth:`_iterate`). The driver only carries the operation's requests to the server and back.
    """

    ops: Any

    @abc.abstractmethod
    def _drive(self, op: Any) -> Any:
        """Run one operation to its end and return its result."""

    @abc.abstractmethod
    def _iterate(self, op: Any) -> Iterator[Any]:
        """Run an operation that hands out items, yielding them."""


def _forwarder(name: str) -> Callable[..., Any]:
    # An operation with a default on Backend (wait_audit, page_agents) keeps it for a store whose
    # ops do not define their own.
    contract = getattr(Backend, name)
    default = None if getattr(contract, "__isabstractmethod__", False) else contract
    if name in ITERATORS:

        def method(self: OpsBackend, *args: Any, **kwargs: Any) -> Any:
            op = getattr(self.ops, name, None)
            if op is None and default is not None:
                return default(self, *args, **kwargs)
            return self._iterate(getattr(self.ops, name)(*args, **kwargs))
    else:

        def method(self: OpsBackend, *args: Any, **kwargs: Any) -> Any:
            op = getattr(self.ops, name, None)
            if op is None and default is not None:
                return default(self, *args, **kwargs)
            return self._drive(getattr(self.ops, name)(*args, **kwargs))

    method.__name__ = method.__qualname__ = name
    method.__doc__ = contract.__doc__
    # Inherited by the drivers, so __init_subclass__ does not see it: map driver errors here.
    return _wrap_iter(method) if name in ITERATORS else _wrap(method)


for _name in OPERATIONS:
    if _name != "close":  # closing releases connections: each driver does it itself
        setattr(OpsBackend, _name, _forwarder(_name))
abc.update_abstractmethods(OpsBackend)  # type: ignore[type-abstract]  # it is abstract: that is why
