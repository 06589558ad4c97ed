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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..audit_chain import AuditChain, AuditRow
from ..errors import BackendError, StateError
from ..ids import AgentId
from ..models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation

__all__ = ["AuditQuery", "Backend", "CommitResult", "SpendResult", "UpdateFn"]

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


@dataclass(slots=True)
class CommitResult:
    """What committing a reservation did: the spend is always recorded."""

    state: AgentState
    exceeded: bool  # the recorded spend took the agent past its limit


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
        for name in _WRAPPED:
            method = cls.__dict__.get(name)
            if method is None or getattr(method, "__isabstractmethod__", False):
                continue
            wrap = _wrap_iter if name in _ITERATORS else _wrap
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

    def save_values(
        self,
        agent_id: AgentId,
        status: AgentStatus,
        budget_spent: float,
        pii_detections: int,
        budget_limit: float | None,
    ) -> None:
        """Insert or replace a state given as valid field values: the manager's save path.

        The manager reads each field of the caller's state once, checks those values and passes
        them here, so no copy is built. The store takes the time of the change itself (a store
        that keeps it only for some states need not read the clock for the others); this
        default builds the state for :meth:`save`.
        """
        self.save(
            AgentState._trusted(agent_id, status, budget_spent, pii_detections, budget_limit), time.time()
        )

    def manager_methods(self) -> dict[str, Callable[..., Any]]:
        """Whole versions of hot ``StateManager`` methods, argument checks included; none here.

        A store whose operations cost about as much as a Python call (the in-memory one) may
        return its own ``save_agent_state`` and ``get_agent_state``, keyed by those names. The
        manager then binds them in place of its generic methods, which saves a call and a
        second pass over the arguments on every use. Each must behave exactly like the
        manager's method it replaces, errors included.
        """
        return {}

    def save_many(self, states: Sequence[AgentState], now: float) -> None:
        """Insert or replace many states; backends override this to batch the writes."""
        for state in states:
            self.save(state, now)

    @abc.abstractmethod
    def get(self, agent_id: AgentId) -> AgentState | None:
        """An independent copy of the agent's state, or ``None``."""

    def get_many(self, agent_ids: Sequence[AgentId]) -> list[AgentState | None]:
        """The states of many agents, in order; backends override this to batch the reads."""
        return [self.get(agent_id) for agent_id in agent_ids]

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
    def record_spend(self, agent_id: AgentId, amount: float, now: float) -> SpendResult:
        """Atomically add ``amount`` to ``budget_spent`` unless that passes the limit.

        The check counts open reservations: ``spent + reserved + amount <= limit``. Raises
        ``AgentNotFound`` or ``AgentNotRunning``; a refused spend is ``exceeded=True``.
        """

    @abc.abstractmethod
    def record_pii(self, agent_id: AgentId, count: int, now: float) -> AgentState:
        """Atomically add ``count`` to ``pii_detections``; ``AgentNotFound`` when absent."""

    @abc.abstractmethod
    def set_status(
        self, agent_id: AgentId, status: AgentStatus, now: float
    ) -> tuple[AgentStatus, AgentState]:
        """Atomically set the status; returns the old status and the new state."""

    # -- reservations ---------------------------------------------------------------------

    @abc.abstractmethod
    def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str
    ) -> Reservation | SpendResult:
        """Hold ``amount`` if ``spent + open holds + amount <= limit``, first dropping expired holds.

        Returns the reservation, or a ``SpendResult`` with ``exceeded=True`` when refused.
        Raises ``AgentNotFound`` or ``AgentNotRunning``.
        """

    @abc.abstractmethod
    def commit(self, reservation: Reservation, actual: float, now: float) -> CommitResult:
        """Record ``actual`` as spent and drop the hold, atomically.

        Raises ``ReservationError`` if the hold is not open (settled, expired or never made).
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
        so concurrent appenders (threads, processes, hosts) extend one chain.
        """

    @abc.abstractmethod
    def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        """Records matching ``query`` in ``seq`` order, at most ``query.limit`` of them."""

    @abc.abstractmethod
    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Iterator[AuditRow]:
        """Every record with ``seq > after_seq`` as plain rows, in ``seq`` order, in batches."""

    @abc.abstractmethod
    def audit_anchor(self) -> tuple[int, str]:
        """``(seq, hash)`` the first remaining record links to: ``(0, GENESIS_HASH)`` unpruned."""

    @abc.abstractmethod
    def audit_head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest record ever appended (the anchor if none remain)."""

    @abc.abstractmethod
    def audit_count(self) -> int:
        """How many records the trail holds."""

    @abc.abstractmethod
    def prune_audit(self, before: int) -> int:
        """Remove the longest run of oldest records whose timestamp is before ``before``.

        The hash of the last removed record becomes the anchor. Returns how many were removed.
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


_ITERATORS = frozenset({"iter_states", "iter_audit_rows"})
_WRAPPED = (
    "save",
    "save_values",
    "save_many",
    "get",
    "get_many",
    "remove",
    "list_ids",
    "iter_states",
    "stats",
    "update",
    "record_spend",
    "record_pii",
    "set_status",
    "reserve",
    "commit",
    "release",
    "reserved",
    "append_audit",
    "query_audit",
    "iter_audit_rows",
    "audit_anchor",
    "audit_head",
    "audit_count",
    "prune_audit",
    "purge_agents",
    "close",
)
