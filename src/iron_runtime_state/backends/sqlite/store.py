"""The SQLite store's operations: :class:`SQLiteBackend` and the statements it runs.

- **Atomicity.** A write that is one statement runs in autocommit; every read-modify-write runs
  in one ``BEGIN IMMEDIATE`` transaction (:class:`~.connection.Connection`). A change and the
  audit events it implies (a refused spend's ``budget_exceeded``, a period's ``budget_reset``, a
  status change, a PII count) are one transaction: both are kept, or neither.
- **Aggregates.** ``iron_stats`` is kept by triggers on ``iron_agents``, in the same
  transaction as each change, in integers (micro-units for money), so :meth:`SQLiteBackend.stats`
  reads one exact row.
- **Budgets.** The spends, holds, periods and budget scopes are :mod:`.spending`; the spend
  ledger's index and reports :mod:`.ledger`. A hold on an agent without budget scopes or
  period that passes is one ``INSERT ... SELECT`` in autocommit here (:data:`_SQL_HOLD`),
  whose condition is the limit rule of :func:`...budgets.passes` in SQL on the same integers;
  only when it inserts nothing (a missing or stopped agent, an agent with scopes or a period, a
  refusal with its event to append) does the hold take a transaction. A spend always takes
  one: it appends its ``spend`` record.
- **Labels.** ``iron_labels`` indexes every agent's labels by (key, value), kept by triggers,
  so ``iter_states(labels=...)`` reads the matching agents only.
- **The dashboard.** ``page_agents`` is :mod:`.paging`; ``wait_audit`` polls
  ``PRAGMA data_version``, which changes when another connection commits, and reads the head
  only then.
- **Audit chain.** :mod:`.trail`.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from ... import events
from ...audit_chain import AuditChain, AuditRow
from ...errors import AgentNotFound, StateError, StateTypeError
from ...ids import AgentId
from ...ledger import SpendNote, SpendQuery, SpendTotal
from ...models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation, check_count
from ...money import MAX_MICROS, from_micros
from ...thresholds import DEFAULT_THRESHOLDS
from ..base import (
    AgentPage,
    AuditMarks,
    AuditQuery,
    Backend,
    BudgetChange,
    BudgetRow,
    Change,
    CommitResult,
    SpendResult,
    UpdateFn,
)
from ..sql_rows import audit_records, stored_id
from . import ledger, paging, spending
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
from .rows import AGENT_COLUMNS, CLOCK, HELD, LAPSED, OF_A, row_of, state_of
from .schema import RUNNING, STATUS_CODE, STATUSES
from .trail import (
    ROWS_PER_READ,
    SQL_APPEND,
    SQL_COUNT,
    SQL_FIRST_KEPT,
    SQL_HEAD_SEQ,
    SQL_LAST,
    SQL_LAST_BEFORE,
    SQL_MARKS,
    SQL_PRUNE,
    SQL_ROWS,
    SQL_SET_ANCHOR,
    append,
    audit_select,
)

__all__ = ["SQLiteBackend", "audit_select", "open_sqlite"]

# -- the statements ----------------------------------------------------------------------------

_SQL_GET: Final = spending.SQL_GET
_SQL_GET_IN: Final = f"SELECT agent_id, {AGENT_COLUMNS} FROM iron_agents WHERE agent_id IN ({{}})"
_SQL_UPSERT: Final = (
    "INSERT INTO iron_agents (agent_id, status, budget_spent, pii_detections, budget_limit, labels, "
    "budget_scopes, budget_period, budget_tz, period_start, budget_thresholds, changed_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent_id) DO UPDATE SET "
    "status = excluded.status, budget_spent = excluded.budget_spent, "
    "pii_detections = excluded.pii_detections, budget_limit = excluded.budget_limit, "
    "labels = excluded.labels, budget_scopes = excluded.budget_scopes, "
    "budget_period = excluded.budget_period, budget_tz = excluded.budget_tz, "
    "period_start = excluded.period_start, budget_thresholds = excluded.budget_thresholds, "
    "changed_at = excluded.changed_at"
)
# (An existing agent's alerted level is not a column of the state: a save keeps it.)
_SQL_SET_COUNTS: Final = (
    "UPDATE iron_agents SET status = ?, pii_detections = ?, changed_at = ? WHERE agent_id = ?"
)
_SQL_REMOVE: Final = "DELETE FROM iron_agents WHERE agent_id = ?"
_SQL_IDS: Final = "SELECT agent_id FROM iron_agents"
_SQL_PAGE: Final = (
    f"SELECT agent_id, {AGENT_COLUMNS} FROM iron_agents WHERE agent_id > ? ORDER BY agent_id LIMIT ?"
)
# The status is written into each statement, not bound: SQLite then knows when a partial index
# (iron_agents_finished, stopped and failed agents) holds every match.
_SQL_PAGE_STATUS: Final = {
    code: f"SELECT agent_id, {AGENT_COLUMNS} FROM iron_agents WHERE agent_id > ? AND status = {code} "
    "ORDER BY agent_id LIMIT ?"
    for code in range(len(STATUSES))
}
_SQL_STATS: Final = "SELECT running, stopped, failed, budget_spent, pii_detections FROM iron_stats"
# {}: "status = 1 OR status = 2", codes written in as for _SQL_PAGE_STATUS.
_SQL_PURGEABLE: Final = "SELECT agent_id FROM iron_agents WHERE ({}) AND changed_at < ?"
_SQL_PURGE: Final = "DELETE FROM iron_agents WHERE ({}) AND changed_at < ?"

# A hold that passes, as one statement, on an agent without scopes or period (the others need
# their scopes and periods, in spending.py): the hold is made only if the agent runs, has no
# lapsed hold (which the transaction drops with its hold_expired event), spent + open holds +
# amount (?3) passes no limit (budgets.passes), and the spend stays a total the store counts
# (budgets.check_total): the checks of spending._SQL_SPEND. It returns the hold's expiry, by the
# database's clock (rows.CLOCK), like the transaction's; no row sends the reservation to the
# transaction.
_SQL_HOLD: Final = (
    "INSERT INTO iron_holds (agent_id, reservation_id, amount, expires_at) "
    f"SELECT ?1, ?2, ?3, {CLOCK} + ?4 FROM iron_agents "
    f"WHERE agent_id = ?1 AND status = {RUNNING} AND budget_scopes IS NULL AND budget_period IS NULL "
    f"AND budget_spent + ?3 <= {MAX_MICROS} "
    f"AND (budget_limit IS NULL OR budget_spent + {HELD} + ?3 <= budget_limit) AND NOT {LAPSED} "
    "RETURNING expires_at"
)
# RETURNING came with SQLite 3.35; with an older library every spend and hold takes the
# transaction (and reads the agent first).
_SPEND_IN_ONE_STATEMENT: Final = sqlite3.sqlite_version_info >= (3, 35, 0)

_IN_CHUNK: Final = 500  # ids per "IN (...)" read
_LABEL_PAGE: Final = (
    f"SELECT {OF_A} FROM iron_labels l INDEXED BY iron_labels_by_value "
    "JOIN iron_agents a ON a.agent_id = l.agent_id "
    "WHERE l.key = ? AND l.value = ? AND l.agent_id > ?{}"
    " ORDER BY l.agent_id LIMIT ?"
)
_AND_LABEL: Final = (
    " AND EXISTS (SELECT 1 FROM iron_labels m WHERE m.agent_id = l.agent_id AND m.key = ? AND m.value = ?)"
)


#: Seconds between two looks at ``PRAGMA data_version`` while ``watch()`` waits: a record is
#: seen ~10 ms after its commit (median), and a waiting feed costs ~0.6% of a core (measured;
#: half of it is the sleep's own wake-up).
WAIT_TICK: Final = 0.02


def _label_page(status: AgentStatus | None, others: int) -> str:
    """The page of agents with one label (by its index), ``others`` more and ``status`` if given."""
    extra = _AND_LABEL * others
    if status is not None:
        extra += f" AND a.status = {STATUS_CODE[status._value_]}"
    return _LABEL_PAGE.format(extra)


def _maybe_plain(conn: Connection, key: str) -> bool:
    """Whether a spend or hold should first try its one statement (``spending._SQL_SPEND``,
    ``_SQL_HOLD``).

    A hint, never trusted for the rules: an agent this connection last saw with scopes or a
    period goes straight to the transaction, without first trying the one statement (which
    would decline it). Stale or missing, the hint costs one statement at most.
    """
    if not _SPEND_IN_ONE_STATEMENT:
        return False
    cache = conn.cache
    seen = None if cache is None else cache.get(key)
    return seen is None or (seen[5] is None and seen[6] is None)


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
        row = row_of(state)
        conn.forget(key)
        conn.db.execute(_SQL_UPSERT, (key, *row, now))
        conn.remember(key, row)

    def save_many(self, states: Sequence[AgentState], now: float) -> None:
        conn = self._connections.get()
        rows = [(state.agent_id._value, row_of(state)) for state in states]
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
        return state_of(AgentId._trusted(key), row)

    def get_many(self, keys: Sequence[str]) -> list[AgentState | None]:
        conn = self._connections.get()
        cache = conn.fresh_cache() or {}
        found = {key: cache[key] for key in keys if key in cache}
        missing = [key for key in keys if key not in found]
        for start in range(0, len(missing), _IN_CHUNK):
            chunk = missing[start : start + _IN_CHUNK]
            sql = _SQL_GET_IN.format(", ".join("?" * len(chunk)))
            for stored in conn.db.execute(sql, chunk).fetchall():
                key, row = stored[0], stored[1:]
                found[key] = row
                conn.remember(key, row)
        return [state_of(AgentId._trusted(key), found[key]) if key in found else None for key in keys]

    def remove(self, agent_id: AgentId) -> bool:
        conn = self._connections.get()
        key = agent_id._value
        conn.forget(key)
        removed: int = conn.db.execute(_SQL_REMOVE, (key,)).rowcount
        return removed > 0

    def list_ids(self) -> list[str]:
        return [key for (key,) in self._connections.get().db.execute(_SQL_IDS).fetchall()]

    def iter_states(
        self, status: AgentStatus | None, labels: Mapping[str, str] | None, batch_size: int
    ) -> Iterator[AgentState]:
        if labels:
            # From the label index: the agents with the first label, in id order, each checked
            # for the others by the index's key; no other agent is read.
            (key, value), *others = labels.items()
            sql = _label_page(status, len(others))
            more = [text for pair in others for text in pair]
            make: Callable[[str], tuple[object, ...]] = lambda after: (key, value, after, *more)  # noqa: E731
        elif status is None:
            sql = _SQL_PAGE
            make = lambda after: (after,)  # noqa: E731
        else:
            sql = _SQL_PAGE_STATUS[STATUS_CODE[status._value_]]
            make = lambda after: (after,)  # noqa: E731
        after = ""
        while True:
            db = self._connections.get().db  # per batch: the caller may move between threads
            rows = db.execute(sql, (*make(after), batch_size)).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield from [state_of(stored_id(row[0]), row[1:]) for row in rows]
            if len(rows) < batch_size:
                return

    def page_agents(self, page: AgentPage) -> list[AgentState]:
        """One page from the store's indexes, sorted by SQLite (:mod:`.paging`)."""
        with self._connections.get().snapshot() as db:
            rows = paging.page_rows(db, page)
        return [state_of(stored_id(row[0]), row[1:]) for row in rows]

    def stats(self) -> FleetStats:
        running, stopped, failed, spent, pii = self._connections.get().db.execute(_SQL_STATS).fetchone()
        return FleetStats(
            total=running + stopped + failed,
            running=running,
            stopped=stopped,
            failed=failed,
            budget_spent=from_micros(spent),
            pii_detections=pii,
        )

    def update(self, agent_id: AgentId, fn: UpdateFn, now: float, chain: AuditChain) -> Change:
        return spending.update(self._connections.get(), agent_id, fn, now, chain)

    def _rewrite(
        self,
        agent_id: AgentId,
        now: float,
        change: Callable[[Row], tuple[int, int]],
        chain: AuditChain,
        implied: Callable[[Row], list[AuditEvent]],
    ) -> Change:
        """Set the agent's status and PII count to ``change(row)`` under the write lock, and
        append the events ``implied(old row)`` with ``chain`` in the same transaction."""
        conn = self._connections.get()
        key = agent_id._value
        conn.forget(key)
        with conn as db:
            old: Row | None = db.execute(_SQL_GET, (key,)).fetchone()
            if old is None:
                raise AgentNotFound(key)
            status, pii = change(old)
            db.execute(_SQL_SET_COUNTS, (status, pii, now, key))
            records = append(conn, implied(old), chain, now)
        new: Row = (status, old[1], pii, *old[3:])
        conn.remember(key, new)
        return Change(state_of(agent_id, new), records)

    # -- atomic counters ----------------------------------------------------------------------

    def record_spend(
        self, agent_id: AgentId, amount: int, now: float, chain: AuditChain, note: SpendNote | None = None
    ) -> SpendResult:
        conn = self._connections.get()
        plain = _maybe_plain(conn, agent_id._value)
        return spending.record_spend(conn, agent_id, amount, now, chain, note, plain)

    def record_pii(
        self, agent_id: AgentId, count: int, now: float, event: AuditEvent, chain: AuditChain
    ) -> Change:
        def change(old: Row) -> tuple[int, int]:
            return old[0], check_count(old[2] + count, "the agent's pii_detections")

        return self._rewrite(agent_id, now, change, chain, lambda old: [event])

    def set_status(self, agent_id: AgentId, status: AgentStatus, now: float, chain: AuditChain) -> Change:
        code = STATUS_CODE[status._value_]

        def implied(old: Row) -> list[AuditEvent]:
            if old[0] == code:
                return []
            return [events.status_changed(agent_id, STATUSES[old[0]], status, now)]

        return self._rewrite(agent_id, now, lambda old: (code, old[2]), chain, implied)

    # -- reservations -------------------------------------------------------------------------

    def reserve(
        self, agent_id: AgentId, amount: int, ttl: float, now: float, reservation_id: str, chain: AuditChain
    ) -> Reservation | SpendResult:
        conn = self._connections.get()
        if _maybe_plain(conn, agent_id._value):
            # The hold leaves the agent's row as it was: the read cache keeps it.
            params = (agent_id._value, reservation_id, amount, ttl)
            for (expires_at,) in conn.db.execute(_SQL_HOLD, params).fetchall():
                return Reservation._trusted(reservation_id, agent_id, from_micros(amount), expires_at, ())
        # Missing, not running, with scopes, a period or lapsed holds, or refused: a transaction.
        return spending.reserve(conn, agent_id, amount, ttl, now, reservation_id, chain)

    def commit(
        self,
        reservation: Reservation,
        actual: int,
        now: float,
        chain: AuditChain,
        note: SpendNote | None = None,
    ) -> CommitResult:
        return spending.commit(self._connections.get(), reservation, actual, now, chain, note)

    def release(self, reservation: Reservation, now: float) -> None:
        spending.release(self._connections.get(), reservation)

    def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, int]:
        key = agent_id._value
        found = self._connections.get().db.execute(spending.SQL_BUDGET, (key,)).fetchone()
        if found is None:
            raise AgentNotFound(key)
        return state_of(agent_id, found[:10]), found[10]

    # -- budget scopes ------------------------------------------------------------------------

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
        conn = self._connections.get()
        return spending.set_budget(conn, scope, limit, period, tz, now, chain, thresholds)

    def get_budget(self, scope: str, now: float) -> BudgetRow | None:
        return spending.get_budget(self._connections.get(), scope)

    def list_budgets(self, now: float) -> list[BudgetRow]:
        return spending.list_budgets(self._connections.get())

    def remove_budget(self, scope: str, now: float, chain: AuditChain) -> BudgetChange:
        return spending.remove_budget(self._connections.get(), scope, now, chain)

    # -- audit trail --------------------------------------------------------------------------

    def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> list[AuditRecord]:
        conn = self._connections.get()
        if not events:
            return []
        hint = conn.watch.highest
        spends = any(event.event_type == "spend" for event in events)  # copied: index them too
        if len(events) == 1 and hint is not None and not chain.keyed and not spends:
            # One statement in autocommit, linked to the newest head this store object knows;
            # the chain trigger refuses it unless that is still the store's head (another
            # connection appended in between, or the head went back). A keyed chain also
            # stores the head's seal, so it takes the transaction below.
            rows, records = chain.seal_rows(events, *hint)
            try:
                conn.db.execute(SQL_APPEND, rows[0])
            except sqlite3.IntegrityError:
                pass  # the seq is taken or the head moved (the only constraints on the table)
            else:
                conn.watch.wrote((rows[0][0], rows[0][6]))
                return records
        with conn:  # under the write lock, reading the head in the same transaction
            records = append(conn, events, chain, time.time())
            if spends:
                ledger.index_appended(conn, records)
            return records

    def check_ledger(self) -> tuple[int, str] | None:
        return ledger.check(self._connections.get().db)

    def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        if query.limit == 0:
            return []
        sql, params = audit_select(query)
        rows = self._connections.get().db.execute(sql, params).fetchall()
        return audit_records(rows)

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Iterator[AuditRow]:
        # Verifying a trail goes through here once per record: the batches are flattened in C,
        # and kept small enough that their rows are still in the CPU's caches when checked
        # (5,000 rows at a time verify ~40% slower than 256).
        size = min(batch_size, ROWS_PER_READ)
        return itertools.chain.from_iterable(self._audit_batches(after_seq, size))

    def _audit_batches(self, after_seq: int, batch_size: int) -> Iterator[list[AuditRow]]:
        """Rows after ``after_seq`` in lists of ``batch_size``, each read whole (no cursor stays open)."""
        after = after_seq
        while True:
            db = self._connections.get().db
            rows: list[AuditRow] = db.execute(SQL_ROWS, (after, batch_size)).fetchall()
            if rows:
                yield rows
            if len(rows) < batch_size:
                return
            after = rows[-1][0]

    def audit_marks(self) -> AuditMarks:
        conn = self._connections.get()
        head_seq, head_hash, anchor_seq, anchor_hash, count, head_seal, anchor_seal = conn.db.execute(
            SQL_MARKS
        ).fetchone()
        conn.watch.saw((head_seq, head_hash))
        return AuditMarks((head_seq, head_hash), (anchor_seq, anchor_hash), count, head_seal, anchor_seal)

    def wait_audit(self, after_seq: int, timeout: float) -> bool:
        """Wait for the head to pass ``after_seq``, reading it only when the file changed.

        ``PRAGMA data_version`` of this thread's connection changes when any other connection
        (thread or process) commits, and costs no read of the file: it is polled every
        :data:`WAIT_TICK`. The version is read before the head, so a commit between the two is
        either in the head read or changes the version the next look compares.
        """
        conn = self._connections.get()
        deadline = time.monotonic() + timeout
        seen = None
        while True:
            version = conn.data_version()
            if version != seen:
                seen = version
                head: int = conn.db.execute(SQL_HEAD_SEQ).fetchone()[0]
                if head > after_seq:
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(WAIT_TICK, left))

    def audit_count(self) -> int:
        count: int = self._connections.get().db.execute(SQL_COUNT).fetchone()[0]
        return count

    def prune_audit(self, before: int, chain: AuditChain) -> int:
        with self._connections.get() as db:
            first_kept = db.execute(SQL_FIRST_KEPT, (before,)).fetchone()
            if first_kept is None:
                last = db.execute(SQL_LAST).fetchone()
            else:
                last = db.execute(SQL_LAST_BEFORE, (first_kept[0],)).fetchone()
            if last is None:
                return 0
            removed: int = db.execute(SQL_PRUNE, (last[0],)).rowcount
            db.execute(ledger.SQL_PRUNE, ledger.prune_params(before, last[0]))  # their ledger rows
            db.execute(SQL_SET_ANCHOR, (last[0], last[1], chain.seal_mark("anchor", last[0], last[1])))
        return removed

    def spend_totals(self, query: SpendQuery) -> list[SpendTotal]:
        """The ledger's totals from its index table, in one ``GROUP BY`` (:mod:`.ledger`)."""
        return ledger.totals(self._connections.get().db, query)

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
