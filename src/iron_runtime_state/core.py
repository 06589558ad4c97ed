"""The half of both managers that does no I/O: each operation's rules, written once.

:class:`StateManager` and :class:`AsyncStateManager` both derive from :class:`ManagerCore`
(the shape httpx gives ``Client`` and ``AsyncClient`` with ``BaseClient``). Every operation
of theirs reads the same way::

    request = self._spend_request(agent_id, amount)        # check the arguments (here)
    result = <the store's record_spend(*request)>          # one store call (the manager)
    return <settle>(self._spent(request, result))          # the outcome (here)

Checking arguments, the audit events an operation writes, the limit refusals, and what the
caller gets back are decided here; the managers only call the store between those steps, and
``settle`` an :class:`Outcome`: append its events, then raise its error or return its value.
Operations of several store calls that a caller waits for as one (``verify_audit_log``) are
generators of :class:`StoreCall` steps (:meth:`ManagerCore._verify_steps`), run by each
manager's own driver.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from random import getrandbits
from typing import Any, Final, Generic, NamedTuple, TypeVar

from . import events
from .audit_chain import AuditChain, AuditRow
from .backends.base import AuditQuery, CommitResult, SpendResult, UpdateFn
from .errors import BudgetExceeded, ReservationError, StateError, StateTypeError, ValidationError
from .ids import AgentId, coerce, try_parse
from .models import (
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    AuditVerification,
    Reservation,
    check_amount,
    check_count,
    check_event_type,
    check_state,
)

__all__ = ["BATCH_SIZE", "AuditPages", "ManagerCore", "Outcome", "StoreCall"]

_T = TypeVar("_T")

audit_logger: Final = logging.getLogger("iron_runtime_state.audit")
logger: Final = logging.getLogger("iron_runtime_state")

#: States written per store call by ``save_agent_states``, and read per batch by iterators.
BATCH_SIZE: Final = 500
#: Rows read per batch while the chain is verified.
VERIFY_BATCH: Final = 5000
#: Checks of the chain before a failure is reported: a prune that moves the anchor while the
#: rows are read makes them start past the anchor that was read first, which is no tampering.
VERIFY_ATTEMPTS: Final = 3
#: Default records per page of ``iter_audit_log``.
PAGE_SIZE: Final = 5000
#: Seconds a budget hold lasts unless told otherwise.
DEFAULT_TTL: Final = 60.0


@dataclass(slots=True)
class Outcome(Generic[_T]):
    """What an operation ends with: events to append, then an error to raise or a value."""

    value: _T
    events: tuple[AuditEvent, ...] = ()
    error: StateError | None = None


class StoreCall(NamedTuple):
    """A step of a multi-call operation: run the store operation ``name`` with ``args``."""

    name: str
    args: tuple[Any, ...] = ()


class VerifyRows(NamedTuple):
    """A step of ``verify_audit_log``: verify the rows from ``anchor``, up to ``head``."""

    anchor: tuple[int, str]
    head: tuple[int, str]


#: A spend or hold as the store receives it: the id, the amount and the time.
SpendRequest = tuple[AgentId, float, float]


def new_reservation_id() -> str:
    """A new reservation id: 128 random bits as 32 hex digits.

    Holds live in shared stores, so ids must not collide across processes and hosts. The
    ``random`` module's generator is seeded from the OS and reseeded in a forked child.
    """
    return getrandbits(128).to_bytes(16, "big").hex()


def audit_key_bytes(key: bytes | str | None) -> bytes | None:
    """The HMAC key as bytes; text keys are UTF-8."""
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise StateTypeError(f"audit_key must be bytes or str, got {type(key).__name__}")
    if len(key) < 16:
        raise ValidationError(
            "audit_key must be at least 16 bytes; generate one with secrets.token_bytes(32)"
        )
    return bytes(key)


def log_events(records: Sequence[AuditRecord]) -> None:
    """Log appended records at DEBUG on ``iron_runtime_state.audit``, as the seed does."""
    if audit_logger.isEnabledFor(logging.DEBUG):
        for record in records:
            event = record.event
            audit_logger.debug(
                "audit seq=%d agent=%s type=%s timestamp=%d details=%s",
                record.seq,
                event.agent_id,
                event.event_type,
                event.timestamp,
                event.details[:200],
            )


def check_reservation(reservation: object) -> Reservation:
    """``reservation`` if it is a :class:`Reservation`."""
    if not isinstance(reservation, Reservation):
        raise StateTypeError(f"expected a Reservation from reserve_budget, got {type(reservation).__name__}")
    return reservation


def check_timestamp(value: object, what: str) -> int:
    """Unix seconds as an int (floats are floored)."""
    if isinstance(value, float) and math.isfinite(value):
        return math.floor(value)
    return check_count(value, what)


def statuses_of(status: AgentStatus | str | Iterable[AgentStatus | str]) -> tuple[AgentStatus, ...]:
    """One status or several, as a tuple of members."""
    if isinstance(status, (AgentStatus, str)):
        return (AgentStatus.parse(status),)
    return tuple(AgentStatus.parse(s) for s in status)


def available(state: AgentState, reserved: float) -> float:
    """What can still be reserved: ``limit - spent - open holds`` (``inf`` without a limit)."""
    if state.budget_limit is None:
        return math.inf
    return max(0.0, state.budget_limit - state.budget_spent - reserved)


def check_unsettled(reservation: Reservation, settled: bool) -> None:
    """Raise :class:`ReservationError` if a budget hold was already committed or released."""
    if settled:
        raise ReservationError(f"reservation {reservation.reservation_id} was already settled")


def warn_unsettled(reservation: Reservation) -> None:
    """Log that a budget hold's block ended without ``commit()`` (it is then released)."""
    logger.warning(
        "budget hold %s for %s ended without commit(); releasing it unspent",
        reservation.reservation_id,
        reservation.agent_id,
    )


@dataclass
class AuditPages:
    """The cursor of a paged audit query: which page to ask for next (no I/O).

    ``while (query := pages.next_query()) is not None: page = <fetch>; pages.advance(page)``
    """

    query: AuditQuery
    page_size: int
    _after: int | None = field(init=False)
    _remaining: int | None = field(init=False)
    _take: int = field(init=False, default=0)
    _done: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._after = self.query.after_seq
        self._remaining = self.query.limit

    def next_query(self) -> AuditQuery | None:
        """The query for the next page, or ``None`` when every page was read."""
        remaining = self._remaining
        if self._done or (remaining is not None and remaining <= 0):
            return None
        self._take = take = self.page_size if remaining is None else min(self.page_size, remaining)
        q = self.query
        return AuditQuery(q.agent_id, q.event_type, q.since, q.until, self._after, take)

    def advance(self, page: Sequence[AuditRecord]) -> None:
        """Move past ``page``, the answer to the last :meth:`next_query`."""
        if len(page) < self._take:
            self._done = True
            return
        self._after = page[-1].seq
        if self._remaining is not None:
            self._remaining -= len(page)


class ManagerCore:
    """The rules of every manager operation, with no I/O; both managers derive from it.

    Methods named ``_<operation>_request`` check a call's arguments and return what the store
    receives; methods named after an outcome (``_spent``, ``_reserved``, ...) turn the store's
    answer into an :class:`Outcome`.
    """

    _chain: AuditChain

    def __init__(self, audit_key: bytes | str | None) -> None:
        self._chain = AuditChain(audit_key_bytes(audit_key))

    # -- agent states -----------------------------------------------------------------------------

    @staticmethod
    def _states_request(states: Iterable[AgentState]) -> list[list[AgentState]]:
        """Every state validated (before any is stored), cut into write batches."""
        checked = [check_state(state) for state in states]
        return [checked[i : i + BATCH_SIZE] for i in range(0, len(checked), BATCH_SIZE)]

    @staticmethod
    def _ids_request(agent_ids: Iterable[str | AgentId]) -> tuple[list[AgentId | None], list[str]]:
        """Each wanted id parsed (``None`` where invalid), and the keys of the valid ones to read."""
        wanted = [try_parse(a) for a in agent_ids]
        return wanted, [a.as_str() for a in wanted if a is not None]

    @staticmethod
    def _found(wanted: list[AgentId | None], found: Sequence[AgentState | None]) -> list[AgentState | None]:
        """The states read for the valid ids, in the order asked, ``None`` for invalid ids."""
        states = iter(found)
        return [None if a is None else next(states) for a in wanted]

    @staticmethod
    def _update_request(
        agent_id: str | AgentId, fn: Callable[[AgentState], AgentState]
    ) -> tuple[AgentId, UpdateFn]:
        """The id, and the user's function wrapped so its result is checked in the atomic section."""
        aid = coerce(agent_id)
        if not callable(fn):
            raise StateTypeError(f"update function must be callable, got {type(fn).__name__}")

        def apply(current: AgentState) -> AgentState:
            new = fn(current)
            if not isinstance(new, AgentState):
                raise StateTypeError(
                    f"the update function must return an AgentState, got {type(new).__name__}; "
                    "return the state it was given, changed"
                )
            if new.agent_id != aid:
                raise ValidationError(
                    f"the update function changed agent_id from {aid} to {new.agent_id}; "
                    "save a new agent with save_agent_state instead"
                )
            return check_state(new)

        return aid, apply

    @staticmethod
    def _iteration_request(
        status: AgentStatus | str | None, batch_size: object
    ) -> tuple[AgentStatus | None, int]:
        """The status filter and batch size of ``iter_agent_states``."""
        wanted = None if status is None else AgentStatus.parse(status)
        return wanted, check_count(batch_size, "batch_size", minimum=1)

    @staticmethod
    def _purge_request(
        status: AgentStatus | str | Iterable[AgentStatus | str], older_than: object
    ) -> tuple[tuple[AgentStatus, ...], float]:
        """The statuses and the cut-off time of ``purge_agents``; running agents are never purged."""
        wanted = statuses_of(status)
        if AgentStatus.RUNNING in wanted:
            raise ValidationError("purge_agents removes finished agents only; pass STOPPED and/or FAILED")
        return wanted, time.time() - check_amount(older_than, "older_than (seconds)")

    # -- counters, status and spends --------------------------------------------------------------

    @staticmethod
    def _spend_request(agent_id: str | AgentId, amount: object) -> SpendRequest:
        """The id, the amount (finite, > 0) and the time of a spend or a hold."""
        return coerce(agent_id), check_amount(amount, "amount", allow_zero=False), time.time()

    @staticmethod
    def _ttl(ttl: object) -> float:
        """A hold's time to live in seconds: finite and > 0."""
        return check_amount(ttl, "ttl (seconds)", allow_zero=False)

    @staticmethod
    def _refused(request: SpendRequest, result: SpendResult, action: str) -> Outcome[Any]:
        """A spend or hold past the limit: a ``budget_exceeded`` event and :class:`BudgetExceeded`."""
        aid, amount, now = request
        state = result.state
        event = events.budget_exceeded(aid, state, result.reserved, amount, now, action)
        error = BudgetExceeded(
            aid.as_str(),
            limit=state.budget_limit if state.budget_limit is not None else math.inf,
            spent=state.budget_spent,
            requested=amount,
            reserved=result.reserved,
        )
        return Outcome(None, (event,), error)

    def _spent(self, request: SpendRequest, result: SpendResult) -> Outcome[AgentState]:
        """The outcome of ``record_spend``."""
        if result.exceeded:
            return self._refused(request, result, "spend")
        return Outcome(result.state)

    def _reserved(self, request: SpendRequest, result: Reservation | SpendResult) -> Outcome[Reservation]:
        """The outcome of ``reserve_budget``."""
        if isinstance(result, SpendResult):
            return self._refused(request, result, "reserve")
        return Outcome(result)

    @staticmethod
    def _commit_request(reservation: object, actual: object) -> tuple[Reservation, float, float]:
        """The hold, what it really cost (finite, >= 0) and the time."""
        return check_reservation(reservation), check_amount(actual, "actual"), time.time()

    @staticmethod
    def _committed(request: tuple[Reservation, float, float], result: CommitResult) -> Outcome[AgentState]:
        """The outcome of ``commit_reservation``: past the limit, the spend stands and an event says so."""
        if not result.exceeded:
            return Outcome(result.state)
        reservation, actual, now = request
        event = events.overspent(result.state, reservation, actual, now)
        return Outcome(result.state, (event,))

    @staticmethod
    def _pii_request(
        agent_id: str | AgentId, count: object, details: object
    ) -> tuple[AgentId, int, float, AuditEvent]:
        """The id, the count (>= 1), the time, and the ``pii_detected`` event, checked before any change."""
        aid = coerce(agent_id)
        n = check_count(count, "count", minimum=1)
        if not isinstance(details, str):
            raise StateTypeError(f"details must be a str, got {type(details).__name__}")
        now = time.time()
        return aid, n, now, events.pii_detected(aid, n, details, now)

    @staticmethod
    def _status_request(
        agent_id: str | AgentId, status: AgentStatus | str
    ) -> tuple[AgentId, AgentStatus, float]:
        """The id, the new status and the time."""
        return coerce(agent_id), AgentStatus.parse(status), time.time()

    @staticmethod
    def _status_set(
        request: tuple[AgentId, AgentStatus, float], result: tuple[AgentStatus, AgentState]
    ) -> Outcome[AgentState]:
        """The outcome of ``set_status``: a real change writes a ``status_changed`` event."""
        aid, new, now = request
        old, state = result
        if old is new:
            return Outcome(state)
        return Outcome(state, (events.status_changed(aid, old, new, now),))

    # -- the audit trail --------------------------------------------------------------------------

    @staticmethod
    def _events_request(events: Iterable[AuditEvent]) -> list[AuditEvent]:
        """The events as a list, each checked to be an :class:`AuditEvent` (for one atomic batch)."""
        batch = list(events)
        for event in batch:
            if not isinstance(event, AuditEvent):
                raise StateTypeError(f"expected an AuditEvent, got {type(event).__name__}")
        return batch

    @staticmethod
    def _audit_query(
        agent_id: str | AgentId | None,
        event_type: str | None,
        since: int | None,
        until: int | None,
        after_seq: int | None,
        limit: int | None,
    ) -> AuditQuery:
        """Checked filters for the audit queries."""
        return AuditQuery(
            agent_id=None if agent_id is None else coerce(agent_id),
            event_type=None if event_type is None else check_event_type(event_type),
            since=None if since is None else check_timestamp(since, "since"),
            until=None if until is None else check_timestamp(until, "until"),
            after_seq=None if after_seq is None else check_count(after_seq, "after_seq"),
            limit=None if limit is None else check_count(limit, "limit"),
        )

    def _pages(self, query: AuditQuery, page_size: object) -> AuditPages:
        """The cursor of ``iter_audit_log``."""
        return AuditPages(query, check_count(page_size, "page_size", minimum=1))

    @staticmethod
    def _verify_steps() -> Generator[StoreCall | VerifyRows, Any, AuditVerification]:
        """``verify_audit_log``: check the chain from the anchor up to the head read first.

        Records appended while the rows are read lie past that head and are left out, so a busy
        trail verifies too. A prune that runs meanwhile moves the anchor: a check it broke is
        made again, up to :data:`VERIFY_ATTEMPTS` times.
        """
        for _ in range(VERIFY_ATTEMPTS):
            head = yield StoreCall("audit_head")
            anchor = yield StoreCall("audit_anchor")
            result: AuditVerification = yield VerifyRows(anchor, head)
            if result.ok or (yield StoreCall("audit_anchor")) == anchor:
                return result
        return result

    def _verify_rows(self, rows: Iterable[AuditRow], step: VerifyRows) -> AuditVerification:
        """Verify stored rows (from ``step.anchor``) up to ``step.head``; the CPU half of verifying."""
        head_seq = step.head[0]
        bounded = (row for row in rows if row[0] <= head_seq)
        return self._chain.verify(
            bounded, anchor_seq=step.anchor[0], anchor_hash=step.anchor[1], head=step.head
        )
