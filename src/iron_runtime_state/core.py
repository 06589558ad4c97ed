"""The half of both managers that does no I/O: each operation's rules, written once.

:class:`StateManager` and :class:`AsyncStateManager` both derive from :class:`ManagerCore`
(the shape httpx gives ``Client`` and ``AsyncClient`` with ``BaseClient``). Every operation
of theirs reads the same way::

    request = self._spend_request(agent_id, amount)        # check the arguments (here)
    result = <the store's record_spend(*request, chain)>   # one store call (the manager)
    return self._spent(request, result)                    # the outcome (here)

Checking arguments, the audit events an operation writes (built in :mod:`.events`, appended by
the store in the same atomic step as the change), the limit refusals, and what the caller gets
back are decided here; the managers only call the store between those steps. An outcome method
logs the records the store call appended, then raises the refusal or returns the result.
Operations of several store calls that a caller waits for as one (``verify_audit_log``) are
generators of :class:`StoreCall` steps (:meth:`ManagerCore._verify_steps`), run by each
manager's own driver.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from random import getrandbits
from typing import Any, Final, NamedTuple, overload

from . import events
from .audit_chain import GENESIS_HASH, AuditChain, ChainVerifier
from .backends.base import (
    AGENT_ORDERS,
    AgentPage,
    AuditMarks,
    AuditQuery,
    BudgetChange,
    BudgetRow,
    Change,
    CommitResult,
    SpendResult,
    UpdateFn,
)
from .budgets import budget_view, current_start, state_view
from .cursors import AuditFeed, AuditPages
from .errors import BudgetExceeded, ReservationError, StateTypeError, ValidationError
from .ids import AgentId, coerce, try_parse
from .metering import EventHook, MeteringCore
from .models import (
    MAX_TIMESTAMP,
    MAX_TTL,
    AgentState,
    AgentStatus,
    AuditCheckpoint,
    AuditEvent,
    AuditVerification,
    BudgetState,
    Reservation,
    check_amount,
    check_count,
    check_event_type,
    check_state,
)
from .money import MAX_MICROS, from_micros, to_micros
from .names import check_labels, check_scope
from .periods import check_period, check_tz
from .pricing import Price, PriceBook
from .thresholds import DEFAULT_THRESHOLDS, check_thresholds

__all__ = ["BATCH_SIZE", "ManagerCore", "StoreCall"]


audit_logger: Final = logging.getLogger("iron_runtime_state.audit")
logger: Final = logging.getLogger("iron_runtime_state")

#: States written per store call by ``save_agent_states``, and read per batch by iterators.
BATCH_SIZE: Final = 500
#: Rows read per batch while the chain is verified.
VERIFY_BATCH: Final = 5000
#: Checks of the chain before a failure is reported: a prune that moves the anchor while the
#: rows are read makes them start past the anchor that was read first, which is no tampering.
VERIFY_ATTEMPTS: Final = 3
#: The most agents one page of ``page_agent_states`` holds.
MAX_PAGE: Final = 1000
#: Default records per page of ``iter_audit_log``.
PAGE_SIZE: Final = 5000
#: Times the verifier reads on past rows appended while it read, before it checks the head.
CATCH_UP_READS: Final = 5
#: What a reservation id may look like (``new_reservation_id`` makes 32 hex digits).
_RESERVATION_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Event types only stores write, with the charge they record: a program cannot append them.
LEDGER_EVENTS: Final = frozenset({"spend", "budget_threshold"})
#: Seconds a budget hold lasts unless told otherwise.
DEFAULT_TTL: Final = 60.0


class StoreCall(NamedTuple):
    """A step of a multi-call operation: run the store operation ``name`` with ``args``."""

    name: str
    args: tuple[Any, ...] = ()


class VerifyRows(NamedTuple):
    """A step of ``verify_audit_log``: feed ``verifier`` every stored row after ``after_seq``.

    The reply is how many rows were read. A driver may run the hashing in a worker thread.
    """

    verifier: ChainVerifier
    after_seq: int


#: A spend or hold as the store receives it: the id, the amount in micro-units and the time.
SpendRequest = tuple[AgentId, int, float]
#: A clock: Unix seconds now (``time.time`` unless a manager is given another).
Clock = Callable[[], float]


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


def check_reservation(reservation: object) -> Reservation:
    """``reservation`` if it is a :class:`Reservation` whose fields a store can take.

    Reservations come from ``reserve_budget``; one built by hand is checked field by field, so
    a store never sees a value it cannot handle.
    """
    if not isinstance(reservation, Reservation):
        raise StateTypeError(f"expected a Reservation from reserve_budget, got {type(reservation).__name__}")
    rid = reservation.reservation_id
    if not isinstance(rid, str) or not _RESERVATION_ID.fullmatch(rid):
        raise ValidationError(
            "reservation_id must be the id reserve_budget gave (1 to 64 of [A-Za-z0-9_-]), "
            f"got {str(rid)[:64]!r}"
        )
    if not isinstance(reservation.agent_id, AgentId):
        raise StateTypeError(
            f"Reservation.agent_id must be an AgentId, got {type(reservation.agent_id).__name__}"
        )
    to_micros(reservation.amount, "Reservation.amount", maximum=MAX_MICROS)
    check_amount(reservation.expires_at, "Reservation.expires_at")
    return reservation


def check_timestamp(value: object, what: str) -> int:
    """Unix seconds as an int (floats are floored), from 0 to :data:`MAX_TIMESTAMP`."""
    if isinstance(value, float) and math.isfinite(value):
        value = math.floor(value)
    seconds = check_count(value, what)
    if seconds > MAX_TIMESTAMP:
        raise ValidationError(f"{what} must be Unix seconds up to 2**53, got {str(seconds)[:24]}")
    return seconds


def statuses_of(status: object) -> tuple[AgentStatus, ...]:
    """One status or several, as a tuple of members."""
    if isinstance(status, (AgentStatus, str)):
        return (AgentStatus.parse(status),)
    if not isinstance(status, Iterable):
        raise StateTypeError(
            f"status must be an AgentStatus, a status name, or several of them, got {type(status).__name__}"
        )
    return tuple(AgentStatus.parse(s) for s in status)


def available(state: AgentState, reserved: int, scopes: Sequence[BudgetState] = ()) -> float:
    """What can still be spent or reserved: the least of ``limit - spent - open holds`` over the
    agent (``reserved`` micro-units held) and its budget scopes (``inf`` without any limit)."""
    least = math.inf
    if state.budget_limit is not None:
        least = from_micros(max(0, to_micros(state.budget_limit) - to_micros(state.budget_spent) - reserved))
    for scope in scopes:
        least = min(least, scope.available)
    return least


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


class ManagerCore(MeteringCore):
    """The rules of every manager operation, with no I/O; both managers derive from it.

    Methods named ``_<operation>_request`` check a call's arguments and return what the store
    receives; methods named after an outcome (``_spent``, ``_reserved``, ``_changed``) turn the
    store's answer into the caller's result or error.
    """

    _chain: AuditChain
    _clock: Clock

    def __init__(
        self,
        audit_key: bytes | str | None,
        clock: Clock | None = None,
        prices: PriceBook | Mapping[str, Price | Mapping[str, Any]] | None = None,
        default_price: Price | Mapping[str, Any] | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        self._init_metering(prices, default_price, on_event)
        if clock is not None and not callable(clock):
            raise StateTypeError(
                f"clock must be a callable returning Unix seconds, got {type(clock).__name__}"
            )
        self._chain = AuditChain(audit_key_bytes(audit_key))
        self._clock = time.time if clock is None else clock

    def _now(self) -> float:
        """Unix seconds now, by the manager's clock (periods are read with it)."""
        return self._clock()

    @overload
    def _view(self, state: AgentState) -> AgentState: ...
    @overload
    def _view(self, state: AgentState | None) -> AgentState | None: ...
    def _view(self, state: AgentState | None) -> AgentState | None:
        """A state as read now: a period that has ended shows its new period (see :mod:`.budgets`)."""
        if state is not None and state.budget_period is not None:
            return state_view(state, self._clock())
        return state

    def _save_request(self, state: AgentState) -> tuple[AgentState, float]:
        """A validated private copy of ``state`` starting the current period, and the time."""
        now = self._clock()
        return self._stamped(check_state(state), now), now

    # -- agent states -----------------------------------------------------------------------------

    def _states_request(self, states: Iterable[AgentState]) -> tuple[list[list[AgentState]], float]:
        """Every state validated (before any is stored), cut into write batches, and the time."""
        now = self._clock()
        checked = [self._stamped(check_state(state), now) for state in states]
        return [checked[i : i + BATCH_SIZE] for i in range(0, len(checked), BATCH_SIZE)], now

    @staticmethod
    def _stamped(state: AgentState, now: float) -> AgentState:
        """A saved state's spend counts in the period that contains ``now``."""
        if state.budget_period is not None:
            state.period_start = current_start(state.budget_period, state.budget_tz, now)
        return state

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

    def _update_request(
        self, agent_id: str | AgentId, fn: Callable[[AgentState], AgentState]
    ) -> tuple[AgentId, UpdateFn, float]:
        """The id, the user's function wrapped so its result is checked in the atomic section, and
        the time. A result that keeps the period keeps its start; a new period starts now."""
        aid = coerce(agent_id)
        if not callable(fn):
            raise StateTypeError(f"update function must be callable, got {type(fn).__name__}")
        now = self._clock()

        def apply(current: AgentState) -> AgentState:
            new = fn(current.copy())
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
            checked = check_state(new)
            same_period = (checked.budget_period, checked.budget_tz) == (
                current.budget_period,
                current.budget_tz,
            )
            if same_period and current.period_start is not None:
                checked.period_start = current.period_start
                return checked
            return self._stamped(checked, now)

        return aid, apply, now

    @staticmethod
    def _page_request(
        status: AgentStatus | str | None,
        labels: object,
        order_by: object,
        descending: object,
        offset: object,
        limit: object,
    ) -> AgentPage:
        """The filters, order and window of ``page_agent_states``."""
        if order_by not in AGENT_ORDERS:
            raise ValidationError(
                f"order_by must be one of {', '.join(AGENT_ORDERS)}; got {str(order_by)[:40]!r}"
            )
        if not isinstance(descending, bool):
            raise StateTypeError(f"descending must be a bool, got {type(descending).__name__}")
        return AgentPage(
            None if status is None else AgentStatus.parse(status),
            None if labels is None else check_labels(labels) or None,
            str(order_by),
            descending,
            check_count(offset, "offset"),
            min(check_count(limit, "limit", minimum=1), MAX_PAGE),
        )

    @staticmethod
    def _iteration_request(
        status: AgentStatus | str | None, labels: object, batch_size: object
    ) -> tuple[AgentStatus | None, dict[str, str] | None, int]:
        """The status and label filters and the batch size of ``iter_agent_states``."""
        wanted = None if status is None else AgentStatus.parse(status)
        wanted_labels = None if labels is None else check_labels(labels) or None
        return wanted, wanted_labels, check_count(batch_size, "batch_size", minimum=1)

    def _purge_request(
        self, status: AgentStatus | str | Iterable[AgentStatus | str], older_than: object
    ) -> tuple[tuple[AgentStatus, ...], float]:
        """The statuses and the cut-off time of ``purge_agents``; running agents are never purged."""
        wanted = statuses_of(status)
        if AgentStatus.RUNNING in wanted:
            raise ValidationError("purge_agents removes finished agents only; pass STOPPED and/or FAILED")
        return wanted, self._clock() - check_amount(older_than, "older_than (seconds)")

    # -- counters, status and spends --------------------------------------------------------------

    def _spend_request(self, agent_id: str | AgentId, amount: object) -> SpendRequest:
        """The id, the amount in micro-units (at least one, at most a billion units) and the time."""
        micros = to_micros(amount, "amount", allow_zero=False, maximum=MAX_MICROS)
        return coerce(agent_id), micros, self._clock()

    @staticmethod
    def _ttl(ttl: object) -> float:
        """A hold's time to live in seconds: > 0 and at most :data:`MAX_TTL`."""
        return check_amount(ttl, "ttl (seconds)", allow_zero=False, maximum=MAX_TTL)

    @staticmethod
    def _refusal(request: SpendRequest, result: SpendResult) -> BudgetExceeded:
        """The error for a spend or hold past a limit (the store wrote its event)."""
        aid, amount, _ = request
        budget = result.budget
        if budget is not None:
            return BudgetExceeded(
                aid.as_str(),
                limit=math.inf if budget.limit is None else from_micros(budget.limit),
                spent=from_micros(budget.spent),
                requested=from_micros(amount),
                reserved=from_micros(budget.held),
                scope=budget.scope,
            )
        state = result.state
        return BudgetExceeded(
            aid.as_str(),
            limit=state.budget_limit if state.budget_limit is not None else math.inf,
            spent=state.budget_spent,
            requested=from_micros(amount),
            reserved=from_micros(result.reserved),
        )

    def _spent(self, request: SpendRequest, result: SpendResult) -> AgentState:
        """The outcome of ``record_spend``: the new state, or :class:`BudgetExceeded`."""
        if result.records:
            self._emit(result.records)
        if result.exceeded:
            raise self._refusal(request, result)
        return result.state

    def _reserved(self, request: SpendRequest, result: Reservation | SpendResult) -> Reservation:
        """The outcome of ``reserve_budget``: the hold, or :class:`BudgetExceeded`."""
        if isinstance(result, SpendResult):
            if result.records:
                self._emit(result.records)
            raise self._refusal(request, result)
        return result

    def _release_request(self, reservation: object) -> tuple[Reservation, float]:
        """The hold to drop and the time."""
        return check_reservation(reservation), self._clock()

    def _changed(self, result: CommitResult | Change) -> AgentState:
        """The outcome of a change whose events the store appended with it: the new state."""
        if result.records:
            self._emit(result.records)
        return result.state

    def _pii_request(
        self, agent_id: str | AgentId, count: object, details: object
    ) -> tuple[AgentId, int, float, AuditEvent]:
        """The id, the count (>= 1), the time, and the ``pii_detected`` event, checked before any change."""
        aid = coerce(agent_id)
        n = check_count(count, "count", minimum=1)
        if not isinstance(details, str):
            raise StateTypeError(f"details must be a str, got {type(details).__name__}")
        now = self._clock()
        return aid, n, now, events.pii_detected(aid, n, details, now)

    def _status_request(
        self, agent_id: str | AgentId, status: AgentStatus | str
    ) -> tuple[AgentId, AgentStatus, float]:
        """The id, the new status and the time."""
        return coerce(agent_id), AgentStatus.parse(status), self._clock()

    # -- budget scopes -----------------------------------------------------------------------------

    def _budget_request(
        self, scope: object, limit: object, period: object, tz: object, thresholds: object
    ) -> tuple[tuple[str, int | None, str | None, str, float], tuple[float, ...]]:
        """The scope, its limit in micro-units (``None``: no limit), period, time zone and the
        time; and its thresholds."""
        name = check_scope(scope)
        micros = None if limit is None else to_micros(limit, "limit", maximum=MAX_MICROS)
        alerts = DEFAULT_THRESHOLDS if thresholds is None else check_thresholds(thresholds)
        return (name, micros, check_period(period), check_tz(tz), self._clock()), alerts

    def _scope_request(self, scope: object) -> tuple[str, float]:
        """A scope's name, checked, and the time."""
        return check_scope(scope), self._clock()

    @staticmethod
    def _budget(row: BudgetRow, now: float) -> BudgetState:
        """A stored scope as read at ``now``."""
        return budget_view(
            row.scope,
            row.limit,
            row.period,
            row.tz,
            row.period_start,
            row.spent,
            row.held,
            now,
            row.thresholds,
        )

    def _budget_set(self, change: BudgetChange, now: float) -> BudgetState:
        """The outcome of ``set_budget``: the scope as it now reads."""
        if change.records:
            self._emit(change.records)
        assert change.budget is not None  # set_budget always leaves the scope
        return self._budget(change.budget, now)

    def _budget_removed(self, change: BudgetChange) -> bool:
        """The outcome of ``remove_budget``: whether there was a scope to remove."""
        if change.records:
            self._emit(change.records)
        return change.budget is not None

    # -- the audit trail --------------------------------------------------------------------------

    @staticmethod
    def _events_request(events: Iterable[AuditEvent], ledger: bool = False) -> list[AuditEvent]:
        """The events as a list, each checked to be an :class:`AuditEvent` (for one atomic batch);
        ledger records only when ``ledger`` (a copied trail)."""
        batch = list(events)
        for event in batch:
            if not isinstance(event, AuditEvent):
                raise StateTypeError(f"expected an AuditEvent, got {type(event).__name__}")
            if event.event_type in LEDGER_EVENTS and not ledger:
                raise ValidationError(
                    f"{event.event_type!r} records are written by the store with each settled spend, "
                    "so that the ledger sums to the budgets; record a spend with record_spend or "
                    "record_usage, or give your event a type of its own (save_audit_logs(..., "
                    "ledger=True) copies a trail)"
                )
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

    def _feed(
        self,
        after_seq: int | None,
        agent_id: str | AgentId | None,
        event_type: str | None,
        idle_timeout: float | None,
    ) -> AuditFeed:
        """The cursor of ``watch()``."""
        query = self._audit_query(agent_id, event_type, None, None, after_seq, None)
        idle = None if idle_timeout is None else check_amount(idle_timeout, "idle_timeout (seconds)")
        return AuditFeed(query, idle, query.after_seq)

    def _pages(self, query: AuditQuery, page_size: object) -> AuditPages:
        """The cursor of ``iter_audit_log``."""
        return AuditPages(query, check_count(page_size, "page_size", minimum=1))

    def _checkpoint(self, marks: AuditMarks) -> AuditCheckpoint:
        """A witness of the head in ``marks``, signed with the audit key when there is one."""
        seq, digest = marks.head
        unsigned = AuditCheckpoint(seq, digest, int(self._clock()))
        return AuditCheckpoint(seq, digest, unsigned.time, self._sign(unsigned))

    def _sign(self, checkpoint: AuditCheckpoint) -> str:
        return self._chain.seal_mark("checkpoint", checkpoint.seq, checkpoint.statement()) or ""

    @staticmethod
    def _checkpoint_request(checkpoint: object) -> AuditCheckpoint | None:
        """A checkpoint given to ``verify_audit_log``: an ``AuditCheckpoint`` or its dict."""
        if checkpoint is None or isinstance(checkpoint, AuditCheckpoint):
            return checkpoint
        return AuditCheckpoint.from_dict(checkpoint)

    def _verify_steps(
        self, checkpoint: AuditCheckpoint | None
    ) -> Generator[StoreCall | VerifyRows, Any, AuditVerification]:
        """``verify_audit_log``: every stored record, the marks, their seals, and a checkpoint.

        Every record a reader can see is checked, from the anchor on, and the store's head,
        anchor and count must agree with them. Records appended while the rows are read are
        read too (a few times at most), so a busy trail verifies. A prune that runs meanwhile
        moves the anchor: a check it broke is made again, up to :data:`VERIFY_ATTEMPTS` times.
        """
        for _ in range(VERIFY_ATTEMPTS):
            marks: AuditMarks = yield StoreCall("audit_marks")
            verifier = self._chain.verifier(marks.anchor)
            self._check_checkpoint(verifier, marks, checkpoint)
            yield VerifyRows(verifier, 0)
            later = marks
            for _ in range(CATCH_UP_READS):
                later = yield StoreCall("audit_marks")
                if not verifier.ok or later.anchor != marks.anchor or later.head[0] <= verifier.last[0]:
                    break
                if not (yield VerifyRows(verifier, verifier.last[0])):
                    break  # the head is ahead of every stored record
            if later.anchor != marks.anchor and not verifier.ok:
                continue  # a prune moved the anchor while the rows were read: check again
            verifier.check_head(later.head)
            self._check_marks(verifier, later)
            if verifier.ok:  # the records hold: does the ledger's index (SQL stores) agree?
                disagreement = yield StoreCall("check_ledger")
                if disagreement is not None:
                    verifier.fail(*disagreement)
            if checkpoint is not None and verifier.ok and checkpoint.seq > verifier.last[0]:
                verifier.fail(
                    verifier.last[0] + 1,
                    f"the trail ends at seq {verifier.last[0]}, before the checkpoint's seq "
                    f"{checkpoint.seq}: its newest records were removed",
                )
            return verifier.report()
        return verifier.report()

    def _check_marks(self, verifier: ChainVerifier, marks: AuditMarks) -> None:
        """The count must match the span of seqs; with a key, the head and anchor seals must match."""
        (head_seq, head_hash), (anchor_seq, anchor_hash) = marks.head, marks.anchor
        if marks.count != head_seq - anchor_seq and head_seq >= anchor_seq:
            verifier.fail(
                anchor_seq + 1,
                f"the store counts {marks.count} records, but its anchor (seq {anchor_seq}) and head "
                f"(seq {head_seq}) span {head_seq - anchor_seq}: records or marks were changed",
            )
        if not self._chain.keyed:
            return
        if head_seq > 0 and marks.head_seal != self._chain.seal_mark("head", head_seq, head_hash):
            verifier.fail(
                head_seq,
                "the store's head is not sealed with this audit key: it was moved or written without "
                "the key (or the trail was written by a version before 0.5: append once with the key)",
            )
        if anchor_seq > 0 and marks.anchor_seal != self._chain.seal_mark("anchor", anchor_seq, anchor_hash):
            verifier.fail(
                anchor_seq + 1,
                "the store's anchor is not sealed with this audit key: it was moved without the key, "
                "hiding the records before it",
            )

    def _check_checkpoint(
        self, verifier: ChainVerifier, marks: AuditMarks, checkpoint: AuditCheckpoint | None
    ) -> None:
        """The trail must still hold the checkpoint's record (or its anchor be that record)."""
        if checkpoint is None:
            return
        if self._chain.keyed and checkpoint.signature != self._sign(checkpoint):
            verifier.fail(
                checkpoint.seq,
                "the checkpoint's signature does not match this audit key: it was edited, or made "
                "with another key or without one",
            )
            return
        anchor_seq, anchor_hash = marks.anchor
        if checkpoint.seq < anchor_seq:
            verifier.fail(
                anchor_seq,
                f"the trail was pruned past the checkpoint (seq {checkpoint.seq} < anchor seq "
                f"{anchor_seq}): it cannot be checked against it; take a new checkpoint after pruning",
            )
        elif checkpoint.seq == anchor_seq:
            expected = GENESIS_HASH if anchor_seq == 0 else checkpoint.hash
            if anchor_hash != expected or checkpoint.hash != expected:
                verifier.fail(anchor_seq, "the trail's anchor is not the record the checkpoint saw")
        else:
            verifier.witness = (checkpoint.seq, checkpoint.hash)
