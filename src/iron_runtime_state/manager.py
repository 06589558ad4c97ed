"""``StateManager``: the object users hold.

The manager validates, writes the audit events that operations imply, logs, and delegates the
storing to a :class:`~iron_runtime_state.backends.Backend`. The checks and event building that
do no I/O live in module-level functions here, shared with the asyncio manager.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from random import getrandbits as _getrandbits
from types import TracebackType
from typing import IO, Any, Final, Literal

from .audit_chain import AuditChain, AuditRow
from .backends import AuditQuery, Backend, SpendResult, open_backend
from .backends.memory import MemoryBackend
from .errors import (
    BudgetExceeded,
    ConfigurationError,
    ReservationError,
    StateTypeError,
    ValidationError,
)
from .ids import AgentId, coerce, key_of, try_parse
from .models import (
    MAX_COUNT,
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    AuditVerification,
    FleetStats,
    Reservation,
    check_amount,
    check_count,
    check_event_type,
    check_state,
)

__all__ = ["BudgetHold", "StateManager"]

_time = time.time
_INF: Final = math.inf
audit_logger: Final = logging.getLogger("iron_runtime_state.audit")
logger: Final = logging.getLogger("iron_runtime_state")

DEFAULT_URL: Final = "memory://"
ENV_URL: Final = "IRON_STATE_URL"
ENV_AUDIT_KEY: Final = "IRON_STATE_AUDIT_KEY"
BATCH_SIZE: Final = 500
VERIFY_BATCH: Final = 5000  # rows per read while verifying the chain
#: Checks of the chain before a failure is reported: a prune that moves the anchor while the
#: rows are read makes them start past the anchor that was read first, which is no tampering.
VERIFY_ATTEMPTS: Final = 3
#: The methods a store may replace with its own whole versions (Backend.manager_methods).
_BINDABLE: Final = frozenset({"save_agent_state", "get_agent_state"})
EXPORT_FORMATS: Final = ("jsonl", "csv")
EXPORT_COLUMNS: Final = (
    "seq",
    "agent_id",
    "event_type",
    "timestamp",
    "details",
    "prev_hash",
    "hash",
)

# -- reservation ids ---------------------------------------------------------------------------------


def new_reservation_id() -> str:
    """A new reservation id: 128 random bits as 32 hex digits, for both managers.

    Holds live in shared stores, so ids must not collide across processes and hosts. The
    ``random`` module's generator is seeded from the OS and reseeded in a forked child, and is
    an order of magnitude cheaper than reading the OS's random source for every hold.
    """
    return _getrandbits(128).to_bytes(16, "big").hex()


# -- checks and events shared by the sync and async managers ------------------------------------


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


def check_spend(amount: object) -> float:
    """An amount to spend or reserve: finite and > 0."""
    return check_amount(amount, "amount", allow_zero=False)


def check_ttl(ttl: object) -> float:
    """A reservation's time to live in seconds: finite and > 0."""
    return check_amount(ttl, "ttl (seconds)", allow_zero=False)


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


def make_update(
    agent_id: AgentId, fn: Callable[[AgentState], AgentState]
) -> Callable[[AgentState], AgentState]:
    """Wrap a user's update function so its result is checked inside the atomic section."""
    if not callable(fn):
        raise StateTypeError(f"update function must be callable, got {type(fn).__name__}")

    def apply(current: AgentState) -> AgentState:
        new = fn(current)
        if not isinstance(new, AgentState):
            raise StateTypeError(
                f"the update function must return an AgentState, got {type(new).__name__}; "
                "return the state it was given, changed"
            )
        if new.agent_id != agent_id:
            raise ValidationError(
                f"the update function changed agent_id from {agent_id} to {new.agent_id}; "
                "save a new agent with save_agent_state instead"
            )
        return check_state(new)

    return apply


def event_json(**fields: object) -> str:
    """Details of the events the library writes itself: compact JSON with sorted keys."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def budget_exceeded_event(
    agent_id: AgentId, result: SpendResult, requested: float, now: float, action: str
) -> AuditEvent:
    """The ``budget_exceeded`` event for a refused spend or hold."""
    state = result.state
    return AuditEvent._trusted(
        agent_id,
        "budget_exceeded",
        int(now),
        event_json(
            action=action,
            limit=state.budget_limit,
            spent=state.budget_spent,
            reserved=result.reserved,
            requested=requested,
        ),
    )


def budget_exceeded_error(agent_id: AgentId, result: SpendResult, requested: float) -> BudgetExceeded:
    """The error matching :func:`budget_exceeded_event`."""
    state = result.state
    return BudgetExceeded(
        agent_id.as_str(),
        limit=state.budget_limit if state.budget_limit is not None else math.inf,
        spent=state.budget_spent,
        requested=requested,
        reserved=result.reserved,
    )


def overspend_event(state: AgentState, reservation: Reservation, actual: float, now: float) -> AuditEvent:
    """The ``budget_exceeded`` event for a commit whose real cost passed the limit."""
    return AuditEvent._trusted(
        state.agent_id,
        "budget_exceeded",
        int(now),
        event_json(
            action="commit",
            limit=state.budget_limit,
            spent=state.budget_spent,
            committed=actual,
            reserved=reservation.amount,
            reservation=reservation.reservation_id,
        ),
    )


def pii_event(agent_id: AgentId, count: int, details: str, now: float) -> AuditEvent:
    """The ``pii_detected`` event (validated now, before the counter changes)."""
    if not isinstance(details, str):
        raise StateTypeError(f"details must be a str, got {type(details).__name__}")
    return AuditEvent(agent_id, "pii_detected", int(now), event_json(count=count, details=details))


def status_event(agent_id: AgentId, old: AgentStatus, new: AgentStatus, now: float) -> AuditEvent:
    """The ``status_changed`` event naming the old and the new status."""
    return AuditEvent._trusted(
        agent_id, "status_changed", int(now), event_json(**{"from": old.value, "to": new.value})
    )


def audit_query(
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


def statuses_of(status: AgentStatus | str | Iterable[AgentStatus | str]) -> tuple[AgentStatus, ...]:
    """One status or several, as a tuple of members."""
    if isinstance(status, (AgentStatus, str)):
        return (AgentStatus.parse(status),)
    return tuple(AgentStatus.parse(s) for s in status)


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


def write_export(records: Iterable[AuditRecord], out: IO[str], fmt: str) -> int:
    """Write records to a text stream as JSONL or CSV; returns how many."""
    count = 0
    if fmt == "jsonl":
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        for record in records:
            out.write(dumps(record.to_dict()))
            out.write("\n")
            count += 1
    else:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_COLUMNS)
        for record in records:
            d = record.to_dict()
            writer.writerow([d[c] for c in EXPORT_COLUMNS])
            count += 1
    return count


def check_export_format(fmt: object) -> str:
    """``fmt`` if it is a known export format."""
    if fmt not in EXPORT_FORMATS:
        raise ValidationError(f"unknown export format {str(fmt)[:32]!r}; use 'jsonl' or 'csv'")
    return str(fmt)


def check_event(event: object) -> AuditEvent:
    """``event`` if it is an :class:`AuditEvent`."""
    if not isinstance(event, AuditEvent):
        raise StateTypeError(f"expected an AuditEvent, got {type(event).__name__}")
    return event


def check_events(events: Iterable[AuditEvent]) -> list[AuditEvent]:
    """The events as a list, each checked to be an :class:`AuditEvent` (for one atomic batch)."""
    batch = list(events)
    for event in batch:
        if not isinstance(event, AuditEvent):
            raise StateTypeError(f"expected AuditEvent items, got {type(event).__name__}")
    return batch


def in_batches(states: Sequence[AgentState]) -> Iterator[Sequence[AgentState]]:
    """``states`` cut into write batches of :data:`BATCH_SIZE`."""
    for start in range(0, len(states), BATCH_SIZE):
        yield states[start : start + BATCH_SIZE]


def parse_ids(agent_ids: Iterable[str | AgentId]) -> tuple[list[AgentId | None], list[AgentId]]:
    """Each wanted id parsed (``None`` where invalid), and the valid ones to read."""
    wanted = [try_parse(a) for a in agent_ids]
    return wanted, [a for a in wanted if a is not None]


def place_found(wanted: list[AgentId | None], found: Sequence[AgentState | None]) -> list[AgentState | None]:
    """The states read for the valid ids, put back in the order asked, ``None`` for invalid ids."""
    states = iter(found)
    return [None if a is None else next(states) for a in wanted]


def check_iteration(status: AgentStatus | str | None, batch_size: object) -> tuple[AgentStatus | None, int]:
    """The status filter and batch size of ``iter_agent_states``."""
    wanted = None if status is None else AgentStatus.parse(status)
    return wanted, check_count(batch_size, "batch_size", minimum=1)


def available(state: AgentState, reserved: float) -> float:
    """What can still be reserved: ``limit - spent - open holds`` (``inf`` without a limit)."""
    if state.budget_limit is None:
        return math.inf
    return max(0.0, state.budget_limit - state.budget_spent - reserved)


def check_purge(
    status: AgentStatus | str | Iterable[AgentStatus | str], older_than: object
) -> tuple[tuple[AgentStatus, ...], float]:
    """The statuses and the age in seconds of ``purge_agents``; running agents are never purged."""
    wanted = statuses_of(status)
    if AgentStatus.RUNNING in wanted:
        raise ValidationError("purge_agents removes finished agents only; pass STOPPED and/or FAILED")
    return wanted, check_amount(older_than, "older_than (seconds)")


def env_config() -> tuple[str, str | None]:
    """The store URL and audit key from ``$IRON_STATE_URL`` and ``$IRON_STATE_AUDIT_KEY``."""
    return os.environ.get(ENV_URL) or DEFAULT_URL, os.environ.get(ENV_AUDIT_KEY) or None


class AuditPages:
    """The cursor of a paged audit query: which page to ask for next (no I/O).

    ``while (query := pages.next_query()) is not None: page = <fetch>; pages.advance(page)``
    """

    __slots__ = ("_after", "_done", "_query", "_remaining", "_size", "_take")

    def __init__(self, query: AuditQuery, page_size: int) -> None:
        self._query = query
        self._size = page_size
        self._after = query.after_seq
        self._remaining = query.limit
        self._take = 0
        self._done = False

    def next_query(self) -> AuditQuery | None:
        """The query for the next page, or ``None`` when every page was read."""
        remaining = self._remaining
        if self._done or (remaining is not None and remaining <= 0):
            return None
        self._take = take = self._size if remaining is None else min(self._size, remaining)
        q = self._query
        return AuditQuery(q.agent_id, q.event_type, q.since, q.until, self._after, take)

    def advance(self, page: Sequence[AuditRecord]) -> None:
        """Move past ``page``, the answer to the last :meth:`next_query`."""
        if len(page) < self._take:
            self._done = True
            return
        self._after = page[-1].seq
        if self._remaining is not None:
            self._remaining -= len(page)


def verify_trail(
    chain: AuditChain, rows: Iterable[AuditRow], anchor: tuple[int, str], head: tuple[int, str]
) -> AuditVerification:
    """Verify stored rows from ``anchor`` up to the ``head`` read before them.

    Records appended while the rows are read are past the head and left out, so a busy trail
    verifies too.
    """
    head_seq = head[0]
    bounded = (row for row in rows if row[0] <= head_seq)
    return chain.verify(bounded, anchor_seq=anchor[0], anchor_hash=anchor[1], head=head)


def export_writer(file: str | os.PathLike[str] | IO[str], fmt: str) -> Callable[[Iterable[AuditRecord]], int]:
    """A function that writes records to ``file`` (a path, or a text file open for writing)."""
    if isinstance(file, (str, os.PathLike)):
        path = file

        def write_file(records: Iterable[AuditRecord]) -> int:
            with open(path, "w", encoding="utf-8", newline="") as out:
                return write_export(records, out, fmt)

        return write_file
    if not isinstance(file, io.TextIOBase) and not hasattr(file, "write"):
        raise StateTypeError("file must be a path or a text file opened for writing")
    out = file

    def write_stream(records: Iterable[AuditRecord]) -> int:
        return write_export(records, out, fmt)

    return write_stream


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


class StateManager:
    """Live state of a fleet of agents, over any store.

    ``StateManager()`` keeps everything in this process's memory; :meth:`from_url` picks any
    store by URL. The manager is thread-safe and a context manager; :meth:`close` releases the
    store's connections and files.
    """

    def __init__(self, backend: Backend | None = None, *, audit_key: bytes | str | None = None):
        """Use ``backend`` (in-memory when ``None``); ``audit_key`` makes the chain HMAC-keyed."""
        if backend is not None and not isinstance(backend, Backend):
            raise StateTypeError(f"backend must be a Backend, got {type(backend).__name__}")
        self._backend: Backend = backend if backend is not None else MemoryBackend()
        self._chain = AuditChain(audit_key_bytes(audit_key))

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, audit_key: bytes | str | None = None, **options: Any) -> StateManager:
        """The manager for a store URL: ``memory://``, ``sqlite:///state.db``, ``redis://...``.

        ``options`` go to the backend (see the README for each backend's options).
        """
        return cls(open_backend(url, **options), audit_key=audit_key)

    @classmethod
    def with_sqlite(
        cls, path: str | os.PathLike[str], *, audit_key: bytes | str | None = None, **options: Any
    ) -> StateManager:
        """A manager over one SQLite file (created if missing); state and audit trail persist.

        ``options`` go to :class:`~iron_runtime_state.backends.sqlite.SQLiteBackend`.
        """
        from .backends.sqlite import SQLiteBackend

        return cls(SQLiteBackend(path, **options), audit_key=audit_key)

    @classmethod
    def with_redis(
        cls,
        url: str = "redis://localhost:6379/0",
        *,
        namespace: str = "iron",
        audit_key: bytes | str | None = None,
        **options: Any,
    ) -> StateManager:
        """A manager over Redis: state shared by every process and host using the same namespace.

        Needs the ``redis`` extra. ``options`` go to the Redis backend.
        """
        from .backends.redis import open_redis

        return cls(open_redis(url, namespace=namespace, **options), audit_key=audit_key)

    @classmethod
    def from_env(cls, **options: Any) -> StateManager:
        """``from_url($IRON_STATE_URL)`` (``memory://`` when unset).

        ``$IRON_STATE_AUDIT_KEY``, when set, is the HMAC key of the audit chain.
        """
        url, key = env_config()
        return cls.from_url(url, audit_key=key, **options)

    @property
    def backend(self) -> Backend:
        """The store this manager delegates to."""
        return self._backend

    @property
    def url(self) -> str:
        """The store's URL, password masked."""
        return self._backend.url

    # -- the seed's operations -------------------------------------------------------------------

    def save_agent_state(self, state: AgentState) -> None:
        """Insert or replace the agent's state; an invalid state raises and stores nothing."""
        self._backend.save(check_state(state), _time())

    def get_agent_state(self, agent_id: str | AgentId) -> AgentState | None:
        """An independent copy of the agent's state; ``None`` if absent or not a valid id."""
        key = key_of(agent_id)
        return None if key is None else self._backend.get(key)

    def list_agents(self) -> list[str]:
        """Every stored agent's canonical id, in no promised order."""
        return self._backend.list_ids()

    def save_audit_log(self, event: AuditEvent) -> AuditRecord:
        """Append ``event`` to the audit trail (and log it at DEBUG); returns the stored record."""
        records = self._backend.append_audit((check_event(event),), self._chain)
        log_events(records)
        return records[0]

    # -- beyond the seed -------------------------------------------------------------------------

    def save_audit_logs(self, events: Iterable[AuditEvent]) -> list[AuditRecord]:
        """Append many events in one atomic batch: all of them are stored, or none."""
        batch = check_events(events)
        if not batch:
            return []
        records = self._backend.append_audit(batch, self._chain)
        log_events(records)
        return records

    def save_agent_states(self, states: Iterable[AgentState]) -> int:
        """Insert or replace many states in batches; all are validated before any is stored.

        Returns how many were saved. Used for imports and ``iron-state copy``.
        """
        checked = [check_state(state) for state in states]
        now = time.time()
        for batch in in_batches(checked):
            self._backend.save_many(batch, now)
        return len(checked)

    def get_agent_states(self, agent_ids: Iterable[str | AgentId]) -> list[AgentState | None]:
        """The states of many agents in one batched read, in order; ``None`` where absent or invalid."""
        wanted, valid = parse_ids(agent_ids)
        return place_found(wanted, self._backend.get_many([a.as_str() for a in valid]) if valid else [])

    def remove_agent_state(self, agent_id: str | AgentId) -> bool:
        """Remove the agent (and its open reservations); ``True`` when something was removed."""
        return self._backend.remove(coerce(agent_id))

    def update_agent_state(
        self, agent_id: str | AgentId, fn: Callable[[AgentState], AgentState]
    ) -> AgentState:
        """Atomic read-modify-write: ``fn`` gets a copy and returns the new state.

        No concurrent update is lost. ``fn`` may run more than once, so it must be pure (and must
        not call this manager). Raises ``AgentNotFound`` when the agent has no state.
        """
        aid = coerce(agent_id)
        return self._backend.update(aid, make_update(aid, fn), time.time())

    def iter_agent_states(
        self, *, status: AgentStatus | str | None = None, batch_size: int = BATCH_SIZE
    ) -> Iterator[AgentState]:
        """Every state, or those with ``status``, fetched ``batch_size`` at a time."""
        wanted, size = check_iteration(status, batch_size)
        return self._backend.iter_states(wanted, size)

    def stats(self) -> FleetStats:
        """Fleet totals, kept up to date by every change (no agent is read)."""
        return self._backend.stats()

    def audit_log(
        self,
        *,
        agent_id: str | AgentId | None = None,
        event_type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        after_seq: int | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Audit records in ``seq`` order; ``since``/``until`` bound the timestamp (inclusive).

        Page with ``after_seq`` (the last ``seq`` you saw) and ``limit``.
        """
        query = audit_query(agent_id, event_type, since, until, after_seq, limit)
        return self._backend.query_audit(query)

    def audit_count(self) -> int:
        """How many records the audit trail holds."""
        return self._backend.audit_count()

    def record_spend(self, agent_id: str | AgentId, amount: float) -> AgentState:
        """Atomically add ``amount`` (> 0) to the agent's spend and return the new state.

        If ``spent + open reservations + amount`` would pass ``budget_limit``, nothing changes,
        a ``budget_exceeded`` event is written and :class:`BudgetExceeded` is raised. Raises
        ``AgentNotRunning`` for an agent that is stopped or failed.
        """
        aid = agent_id if type(agent_id) is AgentId else coerce(agent_id)
        value = amount if type(amount) is float and 0.0 < amount < _INF else check_spend(amount)
        now = _time()
        result = self._backend.record_spend(aid, value, now)
        if result.exceeded:
            self._append(budget_exceeded_event(aid, result, value, now, "spend"))
            raise budget_exceeded_error(aid, result, value)
        return result.state

    def record_pii_detection(
        self, agent_id: str | AgentId, count: int = 1, *, details: str = ""
    ) -> AgentState:
        """Atomically add ``count`` (>= 1) PII detections and write a ``pii_detected`` event."""
        aid = coerce(agent_id)
        n = check_count(count, "count", minimum=1)
        now = time.time()
        event = pii_event(aid, n, details, now)
        state = self._backend.record_pii(aid, n, now)
        self._append(event)
        return state

    def set_status(self, agent_id: str | AgentId, status: AgentStatus | str) -> AgentState:
        """Atomically change the status; a real change writes a ``status_changed`` event."""
        aid = coerce(agent_id)
        new = AgentStatus.parse(status)
        now = time.time()
        old, state = self._backend.set_status(aid, new, now)
        if old is not new:
            self._append(status_event(aid, old, new, now))
        return state

    # -- reservations ----------------------------------------------------------------------------

    def reserve_budget(self, agent_id: str | AgentId, amount: float, *, ttl: float = 60.0) -> Reservation:
        """Hold ``amount`` of the agent's budget before a call whose cost is known only after.

        Admitted only if ``spent + open holds + amount <= budget_limit``, atomically; otherwise
        a ``budget_exceeded`` event and :class:`BudgetExceeded`. Settle it with
        :meth:`commit_reservation` or :meth:`release_reservation`; after ``ttl`` seconds the
        store releases it by itself, even if this process died.
        """
        aid = agent_id if type(agent_id) is AgentId else coerce(agent_id)
        value = amount if type(amount) is float and 0.0 < amount < _INF else check_spend(amount)
        seconds = ttl if type(ttl) is float and 0.0 < ttl < _INF else check_ttl(ttl)
        now = _time()
        result = self._backend.reserve(aid, value, seconds, now, new_reservation_id())
        if isinstance(result, SpendResult):
            self._append(budget_exceeded_event(aid, result, value, now, "reserve"))
            raise budget_exceeded_error(aid, result, value)
        return result

    def commit_reservation(self, reservation: Reservation, actual: float) -> AgentState:
        """Record what the call really cost and free the hold, atomically.

        The spend is recorded even if it passes the limit (it was spent); then a
        ``budget_exceeded`` event is written. Committing a hold that is not open raises
        :class:`ReservationError` and charges nothing.
        """
        held = reservation if type(reservation) is Reservation else check_reservation(reservation)
        value = actual if type(actual) is float and 0.0 <= actual < _INF else check_amount(actual, "actual")
        now = _time()
        result = self._backend.commit(held, value, now)
        if result.exceeded:
            self._append(overspend_event(result.state, held, value, now))
        return result.state

    def release_reservation(self, reservation: Reservation) -> None:
        """Free the hold without spending; :class:`ReservationError` if it is not open."""
        self._backend.release(check_reservation(reservation), time.time())

    def budget_available(self, agent_id: str | AgentId) -> float:
        """What can still be reserved: ``limit - spent - open holds`` (``inf`` without a limit)."""
        state, reserved = self._backend.reserved(coerce(agent_id), time.time())
        return available(state, reserved)

    def budget(self, agent_id: str | AgentId, estimate: float, *, ttl: float = 60.0) -> BudgetHold:
        """A hold as a context manager::

            with manager.budget(agent_id, 0.50) as hold:
                cost = call_the_model()
                hold.commit(cost)

        The hold is released if the block raises, or ends without ``commit``.
        """
        return BudgetHold(self, self.reserve_budget(agent_id, estimate, ttl=ttl))

    # -- the audit trail's integrity, export and retention -----------------------------------------

    def verify_audit_log(self) -> AuditVerification:
        """Check the whole hash chain; the report names the first bad record and why.

        A prune that runs meanwhile moves the anchor; a check it broke is made again.
        """
        for _ in range(VERIFY_ATTEMPTS):
            head = self._backend.audit_head()
            anchor = self._backend.audit_anchor()
            rows = self._backend.iter_audit_rows(anchor[0], VERIFY_BATCH)
            result = verify_trail(self._chain, rows, anchor, head)
            if result.ok or self._backend.audit_anchor() == anchor:
                return result
        return result

    def iter_audit_log(
        self,
        *,
        agent_id: str | AgentId | None = None,
        event_type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        after_seq: int | None = None,
        limit: int | None = None,
        page_size: int = 5000,
    ) -> Iterator[AuditRecord]:
        """Like :meth:`audit_log`, but streamed page by page (flat memory for any size)."""
        query = audit_query(agent_id, event_type, since, until, after_seq, limit)
        size = check_count(page_size, "page_size", minimum=1)
        return self._pages(query, size)

    def _pages(self, query: AuditQuery, size: int) -> Iterator[AuditRecord]:
        pages = AuditPages(query, size)
        while (next_query := pages.next_query()) is not None:
            page = self._backend.query_audit(next_query)
            yield from page
            pages.advance(page)

    def export_audit_log(
        self,
        file: str | os.PathLike[str] | IO[str],
        *,
        format: Literal["jsonl", "csv"] = "jsonl",
        **filters: Any,
    ) -> int:
        """Stream the audit trail (or the part ``filters`` select) to a path or text file.

        ``filters`` are those of :meth:`audit_log`. JSONL lines carry ``prev_hash`` and
        ``hash``, so the chain can be checked outside this library. Returns the record count.
        """
        fmt = check_export_format(format)
        records = self.iter_audit_log(**filters)
        return export_writer(file, fmt)(records)

    def prune_audit_log(self, *, before: int) -> int:
        """Remove the oldest records with a timestamp before ``before`` (Unix seconds).

        Only a prefix of the trail is removed (it stops at the first record that is not old
        enough), so what remains still verifies: the last removed hash becomes the anchor.
        Returns how many records were removed.
        """
        return self._backend.prune_audit(check_timestamp(before, "before"))

    def purge_agents(
        self,
        *,
        older_than: float,
        status: AgentStatus | str | Iterable[AgentStatus | str] = (
            AgentStatus.STOPPED,
            AgentStatus.FAILED,
        ),
    ) -> list[str]:
        """Remove agents with ``status`` whose state has not changed for ``older_than`` seconds.

        By default stopped and failed agents. Returns the removed ids.
        """
        wanted, age = check_purge(status, older_than)
        return self._backend.purge_agents(wanted, time.time() - age)

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the store's connections and files."""
        self._backend.close()

    def __enter__(self) -> StateManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateManager({self.url!r})"

    def _append(self, event: AuditEvent) -> None:
        log_events(self._backend.append_audit((event,), self._chain))


class BudgetHold:
    """An open reservation used as a context manager (see :meth:`StateManager.budget`)."""

    def __init__(self, manager: StateManager, reservation: Reservation) -> None:
        self.manager = manager
        self.reservation = reservation
        self.settled = False

    def commit(self, actual: float) -> AgentState:
        """Record what was really spent and free the hold."""
        check_unsettled(self.reservation, self.settled)
        state = self.manager.commit_reservation(self.reservation, actual)
        self.settled = True
        return state

    def release(self) -> None:
        """Free the hold without spending."""
        check_unsettled(self.reservation, self.settled)
        self.manager.release_reservation(self.reservation)
        self.settled = True

    def __enter__(self) -> BudgetHold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.settled:
            return
        if exc_type is None:
            warn_unsettled(self.reservation)
        with contextlib.suppress(ReservationError):  # it expired meanwhile: nothing is held
            self.release()
