"""The SQLite store's operations: :class:`SQLiteBackend` and the statements it runs.

- **Atomicity.** A write that is one statement runs in autocommit; every read-modify-write runs
  in one ``BEGIN IMMEDIATE`` transaction (:class:`~.connection.Connection`). A change and the
  audit events it implies (a refused spend's ``budget_exceeded``, a status change, a PII count)
  are one transaction: both are kept, or neither.
- **Aggregates.** ``iron_stats`` is kept by triggers on ``iron_agents``, in the same
  transaction as each change, so :meth:`SQLiteBackend.stats` reads one row.
- **Budgets.** A spend and a hold are checked against the same read of the agent with its open
  holds (:func:`_admit`), by ``models.exceeds``. A spend that passes is one ``UPDATE`` in
  autocommit whose condition is that rule in SQL, on the same numbers in the same order; only
  when it changes nothing (a missing or stopped agent, a refusal with its event to append) does
  the spend take the transaction and :func:`_admit`. Holds expire by the database's clock, one
  clock for every caller.
- **Audit chain.** ``iron_audit_chain`` holds the head (newest ``seq`` and hash ever appended)
  and the anchor (left behind by pruning), each with its seal under an audit key. A trigger
  refuses any record that does not extend the head and moves the head, atomically with the
  insert. So a single unkeyed append is one statement built from the newest head this store
  object knows; when another connection appended in between (or the head went back), the
  database refuses it and the append is redone under ``BEGIN IMMEDIATE``, which reads the head.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from ... import events
from ...audit_chain import AuditChain, AuditRow
from ...errors import (
    AgentNotFound,
    AgentNotRunning,
    ReservationError,
    SchemaError,
    StateError,
    StateTypeError,
)
from ...ids import AgentId, try_parse
from ...models import (
    LIMIT_TOLERANCE,
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    FleetStats,
    Reservation,
    check_count,
    exceeds,
)
from ..base import AuditMarks, AuditQuery, Backend, Change, CommitResult, SpendResult, UpdateFn
from .connection import (
    DEFAULT_BUSY_TIMEOUT,
    DEFAULT_PAGE_CACHE_MIB,
    DEFAULT_READ_CACHE,
    DEFAULT_SYNCHRONOUS,
    Connection,
    Connections,
    Row,
    check_settings,
    map_error,
    parse_sqlite_url,
    url_of,
)
from .schema import RUNNING, STATUS_CODE, STATUSES

__all__ = ["SQLiteBackend", "audit_select", "open_sqlite"]

# -- the statements ----------------------------------------------------------------------------

_STATE: Final = "status, budget_spent, pii_detections, budget_limit"
_SQL_GET: Final = f"SELECT {_STATE} FROM iron_agents WHERE agent_id = ?"
_SQL_GET_IN: Final = f"SELECT agent_id, {_STATE} FROM iron_agents WHERE agent_id IN ({{}})"
_SQL_UPSERT: Final = (
    "INSERT INTO iron_agents (agent_id, status, budget_spent, pii_detections, budget_limit, changed_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (agent_id) DO UPDATE SET status = excluded.status, "
    "budget_spent = excluded.budget_spent, pii_detections = excluded.pii_detections, "
    "budget_limit = excluded.budget_limit, changed_at = excluded.changed_at"
)
_SQL_REPLACE: Final = (
    "UPDATE iron_agents SET status = ?, budget_spent = ?, pii_detections = ?, budget_limit = ?, "
    "changed_at = ? WHERE agent_id = ?"
)
_SQL_SET_SPENT: Final = "UPDATE iron_agents SET budget_spent = ?, changed_at = ? WHERE agent_id = ?"
_SQL_REMOVE: Final = "DELETE FROM iron_agents WHERE agent_id = ?"
_SQL_IDS: Final = "SELECT agent_id FROM iron_agents"
_SQL_PAGE: Final = f"SELECT agent_id, {_STATE} FROM iron_agents WHERE agent_id > ? ORDER BY agent_id LIMIT ?"
# The status is written into each statement, not bound: SQLite then knows when a partial index
# (iron_agents_finished, stopped and failed agents) holds every match.
_SQL_PAGE_STATUS: Final = {
    code: f"SELECT agent_id, {_STATE} FROM iron_agents WHERE agent_id > ? AND status = {code} "
    "ORDER BY agent_id LIMIT ?"
    for code in range(len(STATUSES))
}
_SQL_STATS: Final = "SELECT running, stopped, failed, budget_spent, pii_detections FROM iron_stats"
# {}: "status = 1 OR status = 2", codes written in as for _SQL_PAGE_STATUS.
_SQL_PURGEABLE: Final = "SELECT agent_id FROM iron_agents WHERE ({}) AND changed_at < ?"
_SQL_PURGE: Final = "DELETE FROM iron_agents WHERE ({}) AND changed_at < ?"

# Holds expire by one clock, the database's: SQLite's own time (Unix seconds), read where the
# statement runs, never a caller's ``now``. A caller whose clock is ahead would otherwise drop
# another's open hold, and one that is behind would keep lapsed holds. A hold is open while the
# clock is before its expires_at.
_CLOCK: Final = "((julianday('now') - 2440587.5) * 86400.0)"
_SQL_CLOCK: Final = f"SELECT {_CLOCK}"
# The total of the open holds of agent ?1 (0.0 when none). Every budget check sums them here,
# in SQL, so the check in one statement (_SQL_SPEND) and the one in Python (_admit) add the
# same numbers in the same order.
_HELD: Final = f"(SELECT total(amount) FROM iron_holds WHERE agent_id = ?1 AND expires_at > {_CLOCK})"
# An agent with the total of its open holds: what every budget check reads.
_SQL_BUDGET: Final = f"SELECT {_STATE}, {_HELD} FROM iron_agents WHERE agent_id = ?1"
# A spend that passes, as one statement: the agent runs and spent + open holds + amount
# (?2) passes no limit, by the rule of models.exceeds with the same arithmetic as _admit. It
# returns the new row and the holds; no row when the agent is missing, not running or would
# pass its limit, which record_spend then sorts out under the write lock. (RETURNING gives an
# integral REAL as an integer, hence the casts.)
_SQL_SPEND: Final = (
    "UPDATE iron_agents SET budget_spent = budget_spent + ?2, changed_at = ?3 "
    f"WHERE agent_id = ?1 AND status = {RUNNING} AND (budget_limit IS NULL OR budget_spent + {_HELD} + ?2 "
    f"<= budget_limit + {LIMIT_TOLERANCE!r} * max(1.0, budget_limit)) RETURNING status, "
    f"CAST(budget_spent AS REAL), pii_detections, CAST(budget_limit AS REAL), {_HELD}"
)
# RETURNING came with SQLite 3.35; an older library takes the transaction for every spend.
_SPEND_IN_ONE_STATEMENT: Final = sqlite3.sqlite_version_info >= (3, 35, 0)
_SQL_DROP_EXPIRED: Final = f"DELETE FROM iron_holds WHERE agent_id = ? AND expires_at <= {_CLOCK}"
_SQL_HOLD: Final = "INSERT INTO iron_holds (agent_id, reservation_id, amount, expires_at) VALUES (?, ?, ?, ?)"
_SQL_TAKE_HOLD: Final = (
    f"DELETE FROM iron_holds WHERE agent_id = ? AND reservation_id = ? AND expires_at > {_CLOCK}"
)

_AUDIT_COLUMNS: Final = "seq, agent_id, event_type, timestamp, details, prev_hash, hash"
_SQL_APPEND: Final = f"INSERT INTO iron_audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_SQL_HEAD: Final = "SELECT head_seq, head_hash FROM iron_audit_chain"
_SQL_SEAL_HEAD: Final = "UPDATE iron_audit_chain SET head_seal = ?"
# One statement, so one snapshot: the marks and the count agree with each other.
_SQL_MARKS: Final = (
    "SELECT head_seq, head_hash, anchor_seq, anchor_hash, (SELECT count(*) FROM iron_audit), "
    "head_seal, anchor_seal FROM iron_audit_chain"
)
_SQL_SET_ANCHOR: Final = "UPDATE iron_audit_chain SET anchor_seq = ?, anchor_hash = ?, anchor_seal = ?"
_SQL_COUNT: Final = "SELECT count(*) FROM iron_audit"
_SQL_ROWS: Final = f"SELECT {_AUDIT_COLUMNS} FROM iron_audit WHERE seq > ? ORDER BY seq LIMIT ?"
# NOT INDEXED: walk seq order from the oldest record and stop at the first recent one, instead
# of sorting every recent record by seq (the time index would find them all first).
_SQL_FIRST_KEPT: Final = "SELECT seq FROM iron_audit NOT INDEXED WHERE timestamp >= ? ORDER BY seq LIMIT 1"
_SQL_LAST: Final = "SELECT seq, hash FROM iron_audit ORDER BY seq DESC LIMIT 1"
_SQL_LAST_BEFORE: Final = "SELECT seq, hash FROM iron_audit WHERE seq < ? ORDER BY seq DESC LIMIT 1"
_SQL_PRUNE: Final = "DELETE FROM iron_audit WHERE seq <= ?"

_IN_CHUNK: Final = 500  # ids per "IN (...)" read
_ROWS_PER_READ: Final = 256  # audit rows per read while iterating the trail

#: One record as inserted: (seq, agent_id, event_type, timestamp, details, prev_hash, hash).
_AuditInsert = tuple[int, str, str, int, str, str, str]


def audit_select(query: AuditQuery) -> tuple[str, list[object]]:
    """The SELECT and parameters for an audit query (``query.limit`` of 0 is the caller's case).

    Every filter is a plain comparison on an indexed column. SQLite answers by agent or by event
    type from that column's index, in ``seq`` order for free. A time window alone is read from
    the time index: left to itself, SQLite would walk the whole trail in ``seq`` order to find
    a recent window. With ``after_seq`` (the next page), walking ``seq`` order from there is
    cheaper, and SQLite does that.
    """
    where: list[str] = []
    params: list[object] = []
    if query.agent_id is not None:
        where.append("agent_id = ?")
        params.append(query.agent_id.as_str())
    if query.event_type is not None:
        where.append("event_type = ?")
        params.append(query.event_type)
    if query.since is not None:
        where.append("timestamp >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append("timestamp <= ?")
        params.append(query.until)
    if query.after_seq is not None:
        where.append("seq > ?")
        params.append(query.after_seq)
    sql = f"SELECT {_AUDIT_COLUMNS} FROM iron_audit"
    by_time_only = query.agent_id is None and query.event_type is None and query.after_seq is None
    if by_time_only and (query.since is not None or query.until is not None):
        sql += " INDEXED BY iron_audit_by_time"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq"
    if query.limit is not None:
        sql += " LIMIT ?"
        params.append(query.limit)
    return sql, params


# -- rows and objects --------------------------------------------------------------------------


def _state(agent_id: AgentId, row: Row) -> AgentState:
    return AgentState._trusted(agent_id, STATUSES[row[0]], row[1], row[2], row[3])


def _row_of(state: AgentState) -> Row:
    return (STATUS_CODE[state.status._value_], state.budget_spent, state.pii_detections, state.budget_limit)


def _stored_id(text: str) -> AgentId:
    """The id of a row read by scanning (a row edited by hand may hold anything)."""
    agent_id = try_parse(text)
    if agent_id is None:
        raise SchemaError(
            f"the store holds an invalid agent id {text[:64]!r}: it was edited outside "
            "iron-runtime-state; remove that row or restore the file from a backup"
        )
    return agent_id


def _agent_row(db: sqlite3.Connection, key: str) -> Row:
    """The agent's row; ``AgentNotFound`` when there is none."""
    row: Row | None = db.execute(_SQL_GET, (key,)).fetchone()
    if row is None:
        raise AgentNotFound(key)
    return row


def _budget(db: sqlite3.Connection, key: str) -> tuple[Row, float]:
    """The agent's row and the sum of its open holds; ``AgentNotFound`` when there is none."""
    found = db.execute(_SQL_BUDGET, (key,)).fetchone()
    if found is None:
        raise AgentNotFound(key)
    status, spent, pii, limit, held = found
    return (status, spent, pii, limit), held


def _admit(db: sqlite3.Connection, key: str, amount: float, action: str) -> tuple[Row, float, bool]:
    """The limit rule of a spend or a hold: the row, the open holds, and whether ``amount`` passes.

    ``spent + open holds + amount`` is checked against the limit; only a running agent may
    spend or hold (``AgentNotRunning`` names ``action``).
    """
    row, reserved = _budget(db, key)
    if row[0] != RUNNING:
        raise AgentNotRunning(key, STATUSES[row[0]].value, action)
    return row, reserved, _passes(row[1] + reserved + amount, row[3])


def _refuse(
    conn: Connection,
    agent_id: AgentId,
    row: Row,
    reserved: float,
    amount: float,
    now: float,
    action: str,
    chain: AuditChain,
) -> list[AuditRecord]:
    """A spend or hold past the limit changes nothing: its ``budget_exceeded`` event is appended
    in the transaction ``conn`` holds."""
    event = events.budget_exceeded(agent_id, _state(agent_id, row), reserved, amount, now, action)
    return _append(conn, [event], chain, now)


def _passes(total: float, limit: float | None) -> bool:
    """Whether ``total`` passes ``limit`` (``None``: no limit)."""
    return limit is not None and exceeds(total, limit)


def _take_hold(db: sqlite3.Connection, reservation: Reservation, action: str) -> None:
    """Drop an open hold; ``ReservationError`` when it is not open."""
    params = (reservation.agent_id._value, reservation.reservation_id)
    if db.execute(_SQL_TAKE_HOLD, params).rowcount == 0:
        raise ReservationError(
            f"cannot {action} reservation {reservation.reservation_id}: it is not open (already "
            "committed or released, expired after its ttl, or its agent was removed); if money was "
            "spent after the hold expired, record it with record_spend"
        )


def _seal(
    events: Sequence[AuditEvent], chain: AuditChain, seq: int, prev: str
) -> tuple[list[_AuditInsert], list[AuditRecord]]:
    """The rows and records of ``events`` chained after the record ``(seq, prev)``."""
    rows: list[_AuditInsert] = []
    records: list[AuditRecord] = []
    for event in events:
        seq += 1
        agent, kind, at, details = event.agent_id._value, event.event_type, event.timestamp, event.details
        digest = chain.seal(prev, seq, agent, kind, at, details)
        rows.append((seq, agent, kind, at, details, prev, digest))
        records.append(AuditRecord(seq, event, digest, prev))
        prev = digest
    return rows, records


def _append(
    conn: Connection, batch: Sequence[AuditEvent], chain: AuditChain, now: float
) -> list[AuditRecord]:
    """Append ``batch`` in the transaction ``conn`` holds; the records of ``batch``.

    The head is read in the same transaction, so the records extend it whoever appended last.
    A head behind the one this store object last saw gets an ``audit_rewound`` record first
    (:class:`~..head_watch.HeadWatch`). With a keyed chain the new head's seal is stored with it
    (the chain's trigger cleared the old one). The connection notes the new head, for the
    store object to remember once the transaction commits.
    """
    if not batch:
        return []
    db = conn.db
    head: tuple[int, str] = db.execute(_SQL_HEAD).fetchone()
    rewound = conn.watch.check(head, now)
    rows, records = _seal([*rewound, *batch], chain, *head)
    db.executemany(_SQL_APPEND, rows)
    head = (rows[-1][0], rows[-1][6])
    seal = chain.seal_mark("head", *head)
    if seal is not None:
        db.execute(_SQL_SEAL_HEAD, (seal,))
    conn.appended = head
    return records[len(rewound) :]


# -- the store ---------------------------------------------------------------------------------


def open_sqlite(url: str, **options: object) -> SQLiteBackend:
    """Build the store for ``sqlite:///relative.db`` or ``sqlite:////absolute.db``.

    Options (:data:`~.connection.OPTIONS`) may be keywords or URL query parameters
    (``?synchronous=full``); a keyword wins over the same option in the URL. Percent-escapes in
    the path are decoded.
    """
    path, from_url = parse_sqlite_url(url)
    merged: dict[str, Any] = {**from_url, **options}  # SQLiteBackend checks each
    return SQLiteBackend(path, **merged)


class SQLiteBackend(Backend):
    """A store in one SQLite file, shared by every thread and process that opens it.

    ``synchronous``: ``"normal"`` (default; every acknowledged write survives the process being
    killed), ``"full"`` (also survives power loss or an OS crash: each commit is fsynced) or
    ``"extra"``. ``busy_timeout``: seconds a call waits for another writer before raising
    :class:`~iron_runtime_state.BackendUnavailable`. ``read_cache``: agent states each thread
    keeps to answer reads, revalidated against other writers on every read (0 turns it off).
    ``page_cache_mib``: the most SQLite caches of the file per connection (thread).
    Any other keyword raises :class:`~iron_runtime_state.ConfigurationError`.

    The file is created owner-only (0600) if it does not exist. An existing file that is not a
    store of this or an older schema is refused with an error naming it, and never modified.
    ``create=False`` opens only a file that already holds a store: a missing or empty file, or
    an empty database, is refused with :class:`~iron_runtime_state.BackendError` and left as
    it is (for tools that only inspect a store).

    Budget holds expire by the database's clock (SQLite's time where the statement runs),
    not by the ``now`` a caller passes, so callers whose clocks differ agree on which holds
    are open; ``Reservation.expires_at`` is on that clock.
    """

    schemes = ("sqlite",)
    driver_errors = (sqlite3.Error,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = DEFAULT_SYNCHRONOUS,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        read_cache: int = DEFAULT_READ_CACHE,
        page_cache_mib: int = DEFAULT_PAGE_CACHE_MIB,
        create: bool = True,
        **unknown: object,
    ) -> None:
        self._settings = check_settings(path, synchronous, busy_timeout, read_cache, page_cache_mib, unknown)
        if not isinstance(create, bool):
            raise StateTypeError(f"create must be True or False, got {type(create).__name__}")
        self._connections = Connections(self._settings, create)

    @property
    def url(self) -> str:
        """``sqlite:////absolute/path.db`` (the path is absolute, so any process can use it)."""
        return url_of(self._settings.path)

    @property
    def path(self) -> str:
        """The absolute path of the database file."""
        return self._settings.path

    @property
    def synchronous(self) -> str:
        """The durability setting: ``"normal"``, ``"full"`` or ``"extra"``."""
        return self._settings.synchronous

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r}, synchronous={self.synchronous!r})"

    def map_driver_error(self, exc: BaseException) -> StateError:
        """The library error for a ``sqlite3`` exception, naming the file and what to do."""
        return map_error(exc, self._settings)

    # -- agent states -------------------------------------------------------------------------

    def save(self, state: AgentState, now: float) -> None:
        conn = self._connections.get()
        key = state.agent_id._value
        row = _row_of(state)
        conn.forget(key)
        conn.db.execute(_SQL_UPSERT, (key, *row, now))
        conn.remember(key, row)

    def save_many(self, states: Sequence[AgentState], now: float) -> None:
        conn = self._connections.get()
        rows = [(state.agent_id._value, _row_of(state)) for state in states]
        for key, _ in rows:
            conn.forget(key)
        with conn as db:
            db.executemany(_SQL_UPSERT, [(key, *row, now) for key, row in rows])
        for key, row in rows:
            conn.remember(key, row)

    def get(self, key: str) -> AgentState | None:
        conn = self._connections.get()
        cache = conn.fresh_cache()
        row = None if cache is None else cache.get(key)
        if row is None:
            row = conn.db.execute(_SQL_GET, (key,)).fetchone()
            if row is None:
                return None
            conn.remember(key, row)
        return _state(AgentId._trusted(key), row)

    def get_many(self, keys: Sequence[str]) -> list[AgentState | None]:
        conn = self._connections.get()
        cache = conn.fresh_cache() or {}
        found = {key: cache[key] for key in keys if key in cache}
        missing = [key for key in keys if key not in found]
        for start in range(0, len(missing), _IN_CHUNK):
            chunk = missing[start : start + _IN_CHUNK]
            sql = _SQL_GET_IN.format(", ".join("?" * len(chunk)))
            for key, status, spent, pii, limit in conn.db.execute(sql, chunk).fetchall():
                found[key] = row = (status, spent, pii, limit)
                conn.remember(key, row)
        return [_state(AgentId._trusted(key), found[key]) if key in found else None for key in keys]

    def remove(self, agent_id: AgentId) -> bool:
        conn = self._connections.get()
        key = agent_id._value
        conn.forget(key)
        removed: int = conn.db.execute(_SQL_REMOVE, (key,)).rowcount
        return removed > 0

    def list_ids(self) -> list[str]:
        return [key for (key,) in self._connections.get().db.execute(_SQL_IDS).fetchall()]

    def iter_states(self, status: AgentStatus | None, batch_size: int) -> Iterator[AgentState]:
        after = ""
        while True:
            db = self._connections.get().db  # per batch: the caller may move between threads
            if status is None:
                rows = db.execute(_SQL_PAGE, (after, batch_size)).fetchall()
            else:
                sql = _SQL_PAGE_STATUS[STATUS_CODE[status._value_]]
                rows = db.execute(sql, (after, batch_size)).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield from [_state(_stored_id(row[0]), row[1:]) for row in rows]
            if len(rows) < batch_size:
                return

    def stats(self) -> FleetStats:
        running, stopped, failed, spent, pii = self._connections.get().db.execute(_SQL_STATS).fetchone()
        return FleetStats(
            total=running + stopped + failed,
            running=running,
            stopped=stopped,
            failed=failed,
            budget_spent=spent,
            pii_detections=pii,
        )

    def _rewrite(
        self,
        agent_id: AgentId,
        now: float,
        change: Callable[[Row], Row],
        chain: AuditChain | None = None,
        implied: Callable[[Row], list[AuditEvent]] | None = None,
    ) -> Change:
        """Replace the agent's row with ``change(row)`` under the write lock, and append the
        events ``implied(old row)`` with ``chain`` in the same transaction."""
        conn = self._connections.get()
        key = agent_id._value
        conn.forget(key)
        records: list[AuditRecord] = []
        with conn as db:
            old = _agent_row(db, key)
            new = change(old)
            db.execute(_SQL_REPLACE, (*new, now, key))
            if chain is not None and implied is not None:
                records = _append(conn, implied(old), chain, now)
        conn.remember(key, new)
        return Change(_state(agent_id, new), records)

    def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> AgentState:
        # fn runs holding the write lock: it must be quick.
        return self._rewrite(agent_id, now, lambda old: _row_of(fn(_state(agent_id, old)))).state

    # -- atomic counters ----------------------------------------------------------------------

    def record_spend(self, agent_id: AgentId, amount: float, now: float, chain: AuditChain) -> SpendResult:
        conn = self._connections.get()
        key = agent_id._value
        conn.forget(key)
        if _SPEND_IN_ONE_STATEMENT:
            # fetchall: the statement must run to its end to commit (autocommit).
            for status, spent, pii, limit, held in conn.db.execute(_SQL_SPEND, (key, amount, now)).fetchall():
                row = (status, spent, pii, limit)
                conn.remember(key, row)
                return SpendResult(_state(agent_id, row), False, held)
        # Missing, not running or past the limit (or changed since): decided under the write
        # lock, where a refusal's event is appended in the same transaction.
        records: list[AuditRecord] = []
        with conn as db:
            row, reserved, exceeded = _admit(db, key, amount, "record spend")
            if exceeded:
                records = _refuse(conn, agent_id, row, reserved, amount, now, "spend", chain)
            else:
                row = (row[0], row[1] + amount, row[2], row[3])
                db.execute(_SQL_SET_SPENT, (row[1], now, key))
        conn.remember(key, row)
        return SpendResult(_state(agent_id, row), exceeded, reserved, records)

    def record_pii(
        self, agent_id: AgentId, count: int, now: float, event: AuditEvent, chain: AuditChain
    ) -> Change:
        def change(old: Row) -> Row:
            return (old[0], old[1], check_count(old[2] + count, "the agent's pii_detections"), old[3])

        return self._rewrite(agent_id, now, change, chain, lambda old: [event])

    def set_status(self, agent_id: AgentId, status: AgentStatus, now: float, chain: AuditChain) -> Change:
        code = STATUS_CODE[status._value_]

        def implied(old: Row) -> list[AuditEvent]:
            if old[0] == code:
                return []
            return [events.status_changed(agent_id, STATUSES[old[0]], status, now)]

        return self._rewrite(agent_id, now, lambda old: (code, old[1], old[2], old[3]), chain, implied)

    # -- reservations -------------------------------------------------------------------------

    def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str, chain: AuditChain
    ) -> Reservation | SpendResult:
        conn = self._connections.get()
        key = agent_id._value
        records: list[AuditRecord] = []
        with conn as db:
            expires_at = db.execute(_SQL_CLOCK).fetchone()[0] + ttl
            db.execute(_SQL_DROP_EXPIRED, (key,))  # lapsed holds go before the check
            row, reserved, exceeded = _admit(db, key, amount, "reserve budget")
            if exceeded:
                records = _refuse(conn, agent_id, row, reserved, amount, now, "reserve", chain)
            else:
                db.execute(_SQL_HOLD, (key, reservation_id, amount, expires_at))
        conn.remember(key, row)
        if exceeded:
            return SpendResult(_state(agent_id, row), True, reserved, records)
        return Reservation(reservation_id, agent_id, amount, expires_at)

    def commit(self, reservation: Reservation, actual: float, now: float, chain: AuditChain) -> CommitResult:
        conn = self._connections.get()
        agent_id = reservation.agent_id
        key = agent_id._value
        conn.forget(key)
        records: list[AuditRecord] = []
        with conn as db:
            _take_hold(db, reservation, "commit")
            old = _agent_row(db, key)  # it exists: removing an agent removes its holds
            row = (old[0], old[1] + actual, old[2], old[3])
            db.execute(_SQL_SET_SPENT, (row[1], now, key))
            state = _state(agent_id, row)
            exceeded = _passes(row[1], row[3])
            if exceeded:
                records = _append(conn, [events.overspent(state, reservation, actual, now)], chain, now)
        conn.remember(key, row)
        return CommitResult(state, exceeded, records)

    def release(self, reservation: Reservation, now: float) -> None:
        _take_hold(self._connections.get().db, reservation, "release")

    def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, float]:
        row, held = _budget(self._connections.get().db, agent_id._value)
        return _state(agent_id, row), held

    # -- audit trail --------------------------------------------------------------------------

    def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> list[AuditRecord]:
        conn = self._connections.get()
        if not events:
            return []
        hint = conn.watch.highest
        if len(events) == 1 and hint is not None and not chain.keyed:
            # One statement in autocommit, linked to the newest head this store object knows;
            # the chain trigger refuses it unless that is still the store's head (another
            # connection appended in between, or the head went back). A keyed chain also
            # stores the head's seal, so it takes the transaction below.
            rows, records = _seal(events, chain, *hint)
            try:
                conn.db.execute(_SQL_APPEND, rows[0])
            except sqlite3.IntegrityError:
                pass  # the seq is taken or the head moved (the only constraints on the table)
            else:
                conn.watch.wrote((rows[0][0], rows[0][6]))
                return records
        with conn:  # under the write lock, reading the head in the same transaction
            return _append(conn, events, chain, time.time())

    def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        if query.limit == 0:
            return []
        sql, params = audit_select(query)
        rows = self._connections.get().db.execute(sql, params).fetchall()
        ids: dict[str, AgentId] = {}
        out: list[AuditRecord] = []
        for seq, agent, event_type, timestamp, details, prev_hash, digest in rows:
            agent_id = ids.get(agent)
            if agent_id is None:
                agent_id = ids[agent] = _stored_id(agent)
            event = AuditEvent._trusted(agent_id, event_type, timestamp, details)
            out.append(AuditRecord(seq, event, digest, prev_hash))
        return out

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Iterator[AuditRow]:
        # Verifying a trail goes through here once per record: the batches are flattened in C,
        # and kept small enough that their rows are still in the CPU's caches when checked
        # (5,000 rows at a time verify ~40% slower than 256).
        size = min(batch_size, _ROWS_PER_READ)
        return itertools.chain.from_iterable(self._audit_batches(after_seq, size))

    def _audit_batches(self, after_seq: int, batch_size: int) -> Iterator[list[AuditRow]]:
        """Rows after ``after_seq`` in lists of ``batch_size``, each read whole (no cursor stays open)."""
        after = after_seq
        while True:
            db = self._connections.get().db
            rows: list[AuditRow] = db.execute(_SQL_ROWS, (after, batch_size)).fetchall()
            if rows:
                yield rows
            if len(rows) < batch_size:
                return
            after = rows[-1][0]

    def audit_marks(self) -> AuditMarks:
        conn = self._connections.get()
        head_seq, head_hash, anchor_seq, anchor_hash, count, head_seal, anchor_seal = conn.db.execute(
            _SQL_MARKS
        ).fetchone()
        conn.watch.saw((head_seq, head_hash))
        return AuditMarks((head_seq, head_hash), (anchor_seq, anchor_hash), count, head_seal, anchor_seal)

    def audit_count(self) -> int:
        count: int = self._connections.get().db.execute(_SQL_COUNT).fetchone()[0]
        return count

    def prune_audit(self, before: int, chain: AuditChain) -> int:
        with self._connections.get() as db:
            first_kept = db.execute(_SQL_FIRST_KEPT, (before,)).fetchone()
            if first_kept is None:
                last = db.execute(_SQL_LAST).fetchone()
            else:
                last = db.execute(_SQL_LAST_BEFORE, (first_kept[0],)).fetchone()
            if last is None:
                return 0
            removed: int = db.execute(_SQL_PRUNE, (last[0],)).rowcount
            db.execute(_SQL_SET_ANCHOR, (last[0], last[1], chain.seal_mark("anchor", last[0], last[1])))
        return removed

    def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> list[str]:
        codes = sorted({STATUS_CODE[status._value_] for status in statuses})
        if not codes:
            return []
        wanted = " OR ".join(f"status = {code}" for code in codes)
        params = (changed_before,)
        conn = self._connections.get()
        with conn as db:
            removed = [key for (key,) in db.execute(_SQL_PURGEABLE.format(wanted), params).fetchall()]
            for key in removed:
                conn.forget(key)
            if removed:
                db.execute(_SQL_PURGE.format(wanted), params)
        return removed

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close every thread's connection; later calls raise ``BackendError``. Idempotent."""
        self._connections.close()
