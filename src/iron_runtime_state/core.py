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
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from random import getrandbits
from typing import Any, Final, NamedTuple

from . import events
from .audit_chain import GENESIS_HASH, AuditChain, ChainVerifier
from .backends.base import AuditMarks, AuditQuery, Change, CommitResult, SpendResult, UpdateFn
from .errors import BudgetExceeded, ReservationError, StateTypeError, ValidationError
from .ids import AgentId, coerce, try_parse
from .models import (
    MAX_AMOUNT,
    MAX_TIMESTAMP,
    MAX_TTL,
    AgentState,
    AgentStatus,
    AuditCheckpoint,
    AuditEvent,
    AuditRecord,
    AuditVerification,
    Reservation,
    check_amount,
    check_count,
    check_event_type,
    check_state,
)

__all__ = ["BATCH_SIZE", "AuditPages", "ManagerCore", "StoreCall"]


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
#: Times the verifier reads on past rows appended while it read, before it checks the head.
CATCH_UP_READS: Final = 5
#: What a reservation id may look like (``new_reservation_id`` makes 32 hex digits).
_RESERVATION_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
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
    check_amount(reservation.amount, "Reservation.amount", maximum=MAX_AMOUNT)
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
    receives; methods named after an outcome (``_spent``, ``_reserved``, ``_changed``) turn the
    store's answer into the caller's result or error.
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
        """The id, the amount (> 0, at most :data:`MAX_AMOUNT`) and the time of a spend or a hold."""
        value = check_amount(amount, "amount", allow_zero=False, maximum=MAX_AMOUNT)
        return coerce(agent_id), value, time.time()

    @staticmethod
    def _ttl(ttl: object) -> float:
        """A hold's time to live in seconds: > 0 and at most :data:`MAX_TTL`."""
        return check_amount(ttl, "ttl (seconds)", allow_zero=False, maximum=MAX_TTL)

    @staticmethod
    def _refusal(request: SpendRequest, result: SpendResult) -> BudgetExceeded:
        """The error for a spend or hold past the limit (the store wrote its event)."""
        aid, amount, _ = request
        state = result.state
        return BudgetExceeded(
            aid.as_str(),
            limit=state.budget_limit if state.budget_limit is not None else math.inf,
            spent=state.budget_spent,
            requested=amount,
            reserved=result.reserved,
        )

    def _spent(self, request: SpendRequest, result: SpendResult) -> AgentState:
        """The outcome of ``record_spend``: the new state, or :class:`BudgetExceeded`."""
        if result.records:
            log_events(result.records)
        if result.exceeded:
            raise self._refusal(request, result)
        return result.state

    def _reserved(self, request: SpendRequest, result: Reservation | SpendResult) -> Reservation:
        """The outcome of ``reserve_budget``: the hold, or :class:`BudgetExceeded`."""
        if isinstance(result, SpendResult):
            if result.records:
                log_events(result.records)
            raise self._refusal(request, result)
        return result

    @staticmethod
    def _commit_request(reservation: object, actual: object) -> tuple[Reservation, float, float]:
        """The hold, what it really cost (>= 0, at most :data:`MAX_AMOUNT`) and the time."""
        held = check_reservation(reservation)
        return held, check_amount(actual, "actual", maximum=MAX_AMOUNT), time.time()

    @staticmethod
    def _changed(result: CommitResult | Change) -> AgentState:
        """The outcome of a change whose events the store appended with it: the new state."""
        if result.records:
            log_events(result.records)
        return result.state

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

    def _checkpoint(self, marks: AuditMarks) -> AuditCheckpoint:
        """A witness of the head in ``marks``, signed with the audit key when there is one."""
        seq, digest = marks.head
        unsigned = AuditCheckpoint(seq, digest, int(time.time()))
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
