"""The contract every store implements.

The manager validates its inputs, writes audit events and logs; a backend stores. Each
atomic operation here is atomic in the store itself (a lock, a transaction, a Lua script), so
it holds across threads, processes and hosts as far as the store is shared.

Arguments reaching a backend are already valid: ids are ``AgentId``, amounts are finite
floats, states passed ``AgentState.validate()``. A backend raises only ``StateError``
subclasses: a backend that talks to a driver lists the driver's exception types in
``driver_errors`` and maps them in ``map_driver_error``; every public method is wrapped once
here, so no method needs its own try/except.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..audit_chain import AuditChain, AuditRow
from ..errors import BackendError, StateError
from ..ids import AgentId
from ..models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation

__all__ = [
    "ITERATORS",
    "OPERATIONS",
    "AuditMarks",
    "AuditQuery",
    "Backend",
    "Change",
    "CommitResult",
    "OpsBackend",
    "SpendResult",
    "UpdateFn",
]

UpdateFn = Callable[[AgentState], AgentState]
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


@dataclass(slots=True)  # not frozen: built on every spend, and frozen init is slow
class SpendResult:
    """What an atomic spend did: the new state, or why it was refused."""

    state: AgentState
    exceeded: bool = False  # True: nothing changed, the limit would have been passed
    reserved: float = 0.0  # open holds at the time of the check
    #: The audit records appended in the same atomic step (the ``budget_exceeded`` of a refusal).
    records: Sequence[AuditRecord] = ()


@dataclass(slots=True)
class CommitResult:
    """What committing a reservation did: the spend is always recorded."""

    state: AgentState
    exceeded: bool  # the recorded spend took the agent past its limit
    #: The audit records appended in the same atomic step (the ``budget_exceeded`` of an overspend).
    records: Sequence[AuditRecord] = ()


@dataclass(slots=True)
class Change:
    """What a counter or status change did: the new state, and the events appended with it."""

    state: AgentState
    #: The audit records appended in the same atomic step as the change.
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
    def iter_states(self, status: AgentStatus | None, batch_size: int) -> Iterator[AgentState]:
        """Every state (or those with ``status``), fetched ``batch_size`` at a time."""

    @abc.abstractmethod
    def stats(self) -> FleetStats:
        """Fleet totals, from aggregates kept up to date by every change (no scan)."""

    @abc.abstractmethod
    def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> AgentState:
        """Atomically replace the state with ``fn(copy)``; ``AgentNotFound`` when absent.

        ``fn`` validates its own result and may be called more than once.
        """

    @abc.abstractmethod
    def record_spend(self, agent_id: AgentId, amount: float, now: float, chain: AuditChain) -> SpendResult:
        """Atomically add ``amount`` to ``budget_spent`` unless that passes the limit.

        The check counts open reservations: ``spent + reserved + amount <= limit``. Raises
        ``AgentNotFound`` or ``AgentNotRunning``. A refused spend changes nothing, is
        ``exceeded=True``, and appends ``events.budget_exceeded(..., "spend")`` in the same
        atomic step.
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
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str, chain: AuditChain
    ) -> Reservation | SpendResult:
        """Hold ``amount`` if ``spent + open holds + amount <= limit``, first dropping expired holds.

        Returns the reservation, or a ``SpendResult`` with ``exceeded=True`` when refused (and
        ``events.budget_exceeded(..., "reserve")`` appended in the same atomic step). Raises
        ``AgentNotFound`` or ``AgentNotRunning``.
        """

    @abc.abstractmethod
    def commit(self, reservation: Reservation, actual: float, now: float, chain: AuditChain) -> CommitResult:
        """Record ``actual`` as spent and drop the hold, atomically.

        A spend that takes the agent past its limit stands, and ``events.overspent`` is appended
        in the same atomic step. Raises ``ReservationError`` if the hold is not open (settled,
        expired or never made).
        """

    @abc.abstractmethod
    def release(self, reservation: Reservation, now: float) -> None:
        """Drop the hold without spending; ``ReservationError`` if it is not open."""

    @abc.abstractmethod
    def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, float]:
        """The agent's state and the sum of its open (unexpired) holds."""

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
    if name in ITERATORS:

        def method(self: OpsBackend, *args: Any) -> Any:
            return self._iterate(getattr(self.ops, name)(*args))
    else:

        def method(self: OpsBackend, *args: Any) -> Any:
            return self._drive(getattr(self.ops, name)(*args))

    method.__name__ = method.__qualname__ = name
    method.__doc__ = getattr(Backend, name).__doc__
    # Inherited by the drivers, so __init_subclass__ does not see it: map driver errors here.
    return _wrap_iter(method) if name in ITERATORS else _wrap(method)


for _name in OPERATIONS:
    if _name != "close":  # closing releases connections: each driver does it itself
        setattr(OpsBackend, _name, _forwarder(_name))
abc.update_abstractmethods(OpsBackend)  # type: ignore[type-abstract]  # it is abstract: that is why
