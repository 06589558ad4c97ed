"""Budgets in the SQLite store: spends, holds, periods and budget scopes.

Each operation here is one ``BEGIN IMMEDIATE`` transaction (:class:`~.connection.Connection`):
it takes the write lock before it reads, so the agent, its scopes and their holds are read and
changed without any other writer in between, in any thread or process. Inside it the rules are
those of :mod:`...budgets`, applied in Python to the numbers just read: the agent's holds that
lapsed unsettled are dropped (one ``hold_expired`` event each; reads only leave them out of the
held totals, so each expiry is written once, by the first spend, hold or commit that finds it),
periods that ended roll (:func:`...budgets.rolled_start`, one ``budget_reset`` event each), then
each budget is checked (:func:`...budgets.passes`, the agent's first, then its scopes in the
order it lists them), then everything is charged, the thresholds the charge reached are
alerted (:func:`...budgets.alerts`, each budget's ``alerted`` level raised, and set back to 0
by a period's roll), and the events are appended in the same transaction, the ``spend``
record with its ledger row (:func:`.ledger.append_spend`). Whatever is raised inside rolls the
whole transaction back, so a missing scope, a total past :data:`...money.MAX_MICROS` or a
commit of a hold that is not open changes nothing.

The common spend, on an agent without scopes, period or lapsed holds, is charged by one
``UPDATE`` that checks it (:data:`_SQL_SPEND`) inside its transaction, which then appends the
record; the common hold is one statement in :mod:`.store`. Likewise a commit of a hold on such
an agent charges it with one ``UPDATE`` inside its transaction (:data:`_SQL_CHARGE_PLAIN`). A
hold is a row of ``iron_holds`` naming its scopes; triggers (schema version 4) copy it into
``iron_scope_holds`` once per scope and drop the copies with it, so a scope's held total is a
range of that table's key, and a hold removed in any way (commit, release, lapsed hold dropped,
agent removed) leaves no scope entry behind.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ... import events
from ...audit_chain import AuditChain
from ...budgets import alerts, check_total, current_start, passes, rolled_start
from ...errors import AgentNotFound, AgentNotRunning, BudgetNotFound, ReservationError
from ...ids import AgentId
from ...ledger import SpendNote
from ...models import AuditEvent, Reservation
from ...money import MAX_MICROS, from_micros
from ...names import MAX_SCOPES
from ...thresholds import DEFAULT_THRESHOLDS, thresholds_text
from ..base import BudgetChange, BudgetRow, Change, CommitResult, SpendResult, UpdateFn
from .connection import Connection, Row
from .ledger import append_spend, spend
from .rows import (
    AGENT_COLUMNS,
    CLOCK,
    HELD,
    LAPSED,
    SCOPE_READ,
    ScopeRow,
    budget_row,
    row_of,
    scopes_of,
    scopes_text,
    state_of,
    thresholds_of,
)
from .schema import RUNNING, STATUSES
from .trail import append

__all__ = [
    "SQL_BUDGET",
    "SQL_GET",
    "commit",
    "get_budget",
    "list_budgets",
    "record_spend",
    "release",
    "remove_budget",
    "reserve",
    "set_budget",
    "update",
]

# -- the statements ------------------------------------------------------------------------------

SQL_GET: Final = f"SELECT {AGENT_COLUMNS} FROM iron_agents WHERE agent_id = ?1"
#: The same and the agent's alerted level (store-internal: not part of the cached row).
_SQL_GET_ALERTED: Final = f"SELECT {AGENT_COLUMNS}, alerted FROM iron_agents WHERE agent_id = ?1"
#: An agent with the total of its open holds: what every budget check reads.
SQL_BUDGET: Final = f"SELECT {AGENT_COLUMNS}, {HELD} FROM iron_agents WHERE agent_id = ?1"
#: The same, the database's clock (by which holds lapse, and for a new hold's expiry) and
#: whether the agent has lapsed holds to clear, in one statement.
_SQL_CHECK: Final = (
    f"SELECT {AGENT_COLUMNS}, {HELD}, {CLOCK}, {LAPSED}, alerted FROM iron_agents WHERE agent_id = ?1"
)
# An update keeps the agent's alerted level, unless its period rolled (the flag before changed_at).
_SQL_REPLACE: Final = (
    "UPDATE iron_agents SET status = ?, budget_spent = ?, pii_detections = ?, budget_limit = ?, "
    "labels = ?, budget_scopes = ?, budget_period = ?, budget_tz = ?, period_start = ?, "
    "budget_thresholds = ?, alerted = CASE WHEN ? THEN 0 ELSE alerted END, changed_at = ? "
    "WHERE agent_id = ?"
)
# A spend that passes, as one statement, on an agent without scopes or period (the others need
# their scopes and periods, read by _Checked): the agent runs, has no lapsed hold (which the
# transaction drops with its hold_expired event), spent + open holds + amount (?2) passes no
# limit (budgets.passes), and the new spent stays a total the store counts (budgets.check_total).
# It returns the new row, the holds and the alerted level; no row when any of that fails, and
# the spend then reads the agent and its scopes in the same transaction.
_SQL_SPEND: Final = (
    "UPDATE iron_agents SET budget_spent = budget_spent + ?2, changed_at = ?3 "
    f"WHERE agent_id = ?1 AND status = {RUNNING} AND budget_scopes IS NULL AND budget_period IS NULL "
    f"AND budget_spent + ?2 <= {MAX_MICROS} "
    f"AND (budget_limit IS NULL OR budget_spent + {HELD} + ?2 <= budget_limit) AND NOT {LAPSED} "
    f"RETURNING {AGENT_COLUMNS}, {HELD}, alerted"
)
# A commit's charge to an agent without a period, as one statement (else: no row, and the
# commit reads the agent, rolls its period and writes it back). The new spend stays a total the
# store counts, as budgets.check_total asks.
_SQL_CHARGE_PLAIN: Final = (
    "UPDATE iron_agents SET budget_spent = budget_spent + ?2, changed_at = ?3 "
    f"WHERE agent_id = ?1 AND budget_period IS NULL AND budget_spent + ?2 <= {MAX_MICROS} "
    f"RETURNING {AGENT_COLUMNS}, alerted"
)
_SQL_SET_SPENT: Final = (
    "UPDATE iron_agents SET budget_spent = ?, period_start = ?, alerted = ?, changed_at = ? "
    "WHERE agent_id = ?"
)
#: The scopes named (1 to MAX_SCOPES of them) with their held totals, by the number named.
_SQL_SCOPES: Final = {
    n: f"SELECT {SCOPE_READ} FROM iron_budgets b WHERE scope IN ({', '.join('?' * n)})"
    for n in range(1, MAX_SCOPES + 1)
}
_SQL_SCOPE: Final = f"SELECT {SCOPE_READ} FROM iron_budgets b WHERE scope = ?"
_SQL_ALL_SCOPES: Final = f"SELECT {SCOPE_READ} FROM iron_budgets b ORDER BY scope"
_SQL_SET_SCOPE_SPENT: Final = (
    "UPDATE iron_budgets SET spent = ?, period_start = ?, alerted = ? WHERE scope = ?"
)
_SQL_PUT_SCOPE: Final = (
    "INSERT INTO iron_budgets (scope, budget_limit, period, tz, period_start, spent, thresholds, alerted) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (scope) DO UPDATE SET "
    "budget_limit = excluded.budget_limit, period = excluded.period, tz = excluded.tz, "
    "period_start = excluded.period_start, thresholds = excluded.thresholds, alerted = excluded.alerted"
)
_SQL_DROP_SCOPE: Final = "DELETE FROM iron_budgets WHERE scope = ?"
_SQL_DROP_SCOPE_HOLDS: Final = "DELETE FROM iron_scope_holds WHERE scope = ?"

_SQL_HOLD: Final = (
    "INSERT INTO iron_holds (agent_id, reservation_id, amount, expires_at, scopes) VALUES (?, ?, ?, ?, ?)"
)
#: A hold as these statements read it: its id, amount, expiry and scopes (a JSON array or NULL).
_Hold = tuple[str, int, float, str | None]
_HOLD_COLUMNS: Final = "reservation_id, amount, expires_at, scopes"
# The agent's holds that lapsed by the clock ?2: the one read with the held total they were left
# out of, so each hold is counted or dropped (with its hold_expired event), never neither.
_SQL_LAPSED: Final = f"SELECT {_HOLD_COLUMNS} FROM iron_holds WHERE agent_id = ?1 AND expires_at <= ?2"
_SQL_DROP_LAPSED: Final = (
    f"DELETE FROM iron_holds WHERE agent_id = ?1 AND expires_at <= ?2 RETURNING {_HOLD_COLUMNS}"
)
_SQL_DROP_HOLD: Final = "DELETE FROM iron_holds WHERE agent_id = ? AND reservation_id = ?"
_SQL_TAKE_HOLD: Final = (
    f"DELETE FROM iron_holds WHERE agent_id = ?1 AND reservation_id = ?2 AND expires_at > {CLOCK}"
)
# What a commit reads of its open hold: amount, scopes, the clock, and whether the agent has
# lapsed holds to drop by it (a probe of the key's range: the common commit has none, and a
# search by the whole key keeps the DELETE one pass).
_OPEN_HOLD: Final = f"amount, scopes, {CLOCK}, {LAPSED}"
_SQL_OPEN_HOLD: Final = (
    f"SELECT {_OPEN_HOLD} FROM iron_holds "
    f"WHERE agent_id = ?1 AND reservation_id = ?2 AND expires_at > {CLOCK}"
)
# A commit takes its open hold and reads it in one statement where SQLite has RETURNING (3.35).
_SQL_TAKE_HOLD_RETURNING: Final = f"{_SQL_TAKE_HOLD} RETURNING {_OPEN_HOLD}"
_TAKE_IN_ONE_STATEMENT: Final = sqlite3.sqlite_version_info >= (3, 35, 0)


# -- one budget ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Budget:
    """A budget a spend or hold is checked against: the agent's own (``scope`` None) or a scope's."""

    scope: str | None
    limit: int | None
    period: str | None
    tz: str
    period_start: float | None
    spent: int
    held: int
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    alerted: float = 0.0  # the highest threshold alerted in the current period
    changed: bool = False  # its period rolled, it was charged or alerted: it is written back

    def roll(self, agent_id: AgentId, now: float) -> AuditEvent | None:
        """Start the new period if this one ended by ``now``; the ``budget_reset`` event, if any."""
        start = rolled_start(self.period, self.tz, self.period_start, now)
        if start is None:
            return None
        old_start, old_spent = self.period_start, self.spent
        self.period_start, self.changed = start, True
        if old_start is None or self.period is None:
            # Stored without a period start (only a state saved past the manager): its period
            # starts now, and nothing is known to have ended.
            return None
        self.spent, self.alerted = 0, 0.0
        return events.budget_reset(
            agent_id if self.scope is None else None,
            self.scope,
            self.period,
            self.tz,
            old_start,
            old_spent,
            now,
        )

    def alert(self, agent_id: AgentId, now: float) -> list[AuditEvent]:
        """The ``budget_threshold`` events of the thresholds the spend reached (its level raised)."""
        found, level = alerts(
            agent_id,
            now,
            self.thresholds,
            self.alerted,
            self.limit,
            self.spent,
            self.period_start,
            self.scope,
        )
        if found:
            self.alerted, self.changed = level, True
        return found

    def row(self) -> BudgetRow:
        """The scope as it stands (``scope`` must be set)."""
        assert self.scope is not None
        return BudgetRow(
            self.scope,
            self.limit,
            self.period,
            self.tz,
            self.period_start,
            self.spent,
            self.held,
            self.thresholds,
        )


def _agent_budget(row: Row, held: int, alerted: float) -> _Budget:
    return _Budget(None, row[3], row[6], row[7], row[8], row[1], held, thresholds_of(row[9]), alerted)


def _scope_budget(row: ScopeRow) -> _Budget:
    return _Budget(*row[:7], thresholds_of(row[7]), row[8])


def _scopes(conn: Connection, names: Sequence[str], agent: str | None) -> list[_Budget]:
    """The scopes ``names``, in that order, with their held totals.

    A scope that does not exist raises ``BudgetNotFound`` naming ``agent``; with ``agent``
    ``None`` (a commit, whose hold may outlive a scope) it is left out.
    """
    if not names:
        return []
    found = {row[0]: row for row in conn.db.execute(_SQL_SCOPES[len(names)], names).fetchall()}
    budgets: list[_Budget] = []
    for name in names:
        row = found.get(name)
        if row is not None:
            budgets.append(_scope_budget(row))
        elif agent is not None:
            raise BudgetNotFound(name, agent)
    return budgets


def _write(conn: Connection, key: str, row: Row, agent: _Budget, scopes: list[_Budget], now: float) -> Row:
    """Write back every budget that changed; the agent's row as it now stands."""
    db = conn.db
    if agent.changed:
        row = (row[0], agent.spent, *row[2:8], agent.period_start, row[9])
        db.execute(_SQL_SET_SPENT, (agent.spent, agent.period_start, agent.alerted, now, key))
    changed = [(b.spent, b.period_start, b.alerted, b.scope) for b in scopes if b.changed]
    if changed:
        db.executemany(_SQL_SET_SCOPE_SPENT, changed)
    return row


def _expired(agent_id: AgentId, lapsed: Sequence[_Hold], now: float) -> list[AuditEvent]:
    """One ``hold_expired`` event per lapsed hold (rows of ``_HOLD_COLUMNS``), earliest first."""
    return [
        events.hold_expired(agent_id, reservation_id, amount, expires_at, scopes_of(scopes), now)
        for reservation_id, amount, expires_at, scopes in sorted(lapsed, key=lambda hold: (hold[2], hold[0]))
    ]


def _drop_lapsed(conn: Connection, agent_id: AgentId, clock: float, now: float) -> list[AuditEvent]:
    """Drop the agent's holds that lapsed by ``clock`` (their scope entries go by trigger); their
    ``hold_expired`` events, which the caller appends in the same transaction."""
    key = agent_id._value
    if _TAKE_IN_ONE_STATEMENT:
        lapsed: list[_Hold] = conn.db.execute(_SQL_DROP_LAPSED, (key, clock)).fetchall()
    else:
        lapsed = conn.db.execute(_SQL_LAPSED, (key, clock)).fetchall()
        conn.db.executemany(_SQL_DROP_HOLD, [(key, hold[0]) for hold in lapsed])
    return _expired(agent_id, lapsed, now)


def _what(budget: _Budget, key: str) -> str:
    return (
        f"the spend of agent {key}" if budget.scope is None else f"the spend of budget scope {budget.scope!r}"
    )


def _roll(budgets: list[_Budget], agent_id: AgentId, now: float) -> list[AuditEvent]:
    """Roll every budget whose period ended; their ``budget_reset`` events, in order."""
    resets: list[AuditEvent] = []
    for budget in budgets:
        if budget.period is not None:
            event = budget.roll(agent_id, now)
            if event is not None:
                resets.append(event)
    return resets


def _bound(budgets: list[_Budget], amount: int, key: str) -> None:
    """``ValidationError`` (the transaction then rolls back: nothing changes) if adding ``amount``
    would take a budget's spend past :data:`...money.MAX_MICROS`.

    Checked on the spends as stored, before any period rolls, as every store does.
    """
    for budget in budgets:
        if budget.spent + amount > MAX_MICROS:
            check_total(budget.spent + amount, _what(budget, key))


def _charge(budgets: list[_Budget], amount: int) -> None:
    """Add ``amount`` to every budget (in memory: they are written back by :func:`_write`)."""
    for budget in budgets:
        budget.spent += amount
        budget.changed = True


def _alerts(budgets: list[_Budget], agent_id: AgentId, now: float) -> list[AuditEvent]:
    """The thresholds a charge reached, budget by budget in order (the agent's first)."""
    found: list[AuditEvent] = []
    for budget in budgets:
        found += budget.alert(agent_id, now)
    return found


class _Checked:
    """An agent and its scopes read under the write lock, for one amount: its lapsed holds
    dropped, their periods rolled, the first budget that refuses found."""

    __slots__ = ("agent", "clock", "key", "refused", "resets", "row", "scopes")

    def __init__(self, conn: Connection, agent_id: AgentId, amount: int, now: float, action: str) -> None:
        key = self.key = agent_id._value
        found = conn.db.execute(_SQL_CHECK, (key,)).fetchone()
        if found is None:
            raise AgentNotFound(key)
        #: The database's clock, by which holds lapse (read with the held total).
        self.clock: float = found[11]
        row: Row = found[:10]
        if row[0] != RUNNING:
            raise AgentNotRunning(key, STATUSES[row[0]].value, action)
        self.row = row
        agent = self.agent = _agent_budget(row, found[10], found[13])
        scopes = self.scopes = _scopes(conn, scopes_of(row[5]), key)
        budgets = [agent, *scopes]
        _bound(budgets, amount, key)
        # The holds the held total left out go first, each with its event (found[12]: any?).
        expired = _drop_lapsed(conn, agent_id, self.clock, now) if found[12] else []
        #: The events the checks imply, in order: lapsed holds, then periods rolled.
        self.resets = expired + _roll(budgets, agent_id, now)
        #: The first budget, in order, that ``amount`` would take past its limit.
        self.refused: _Budget | None = None
        for budget in budgets:
            if passes(budget.limit, budget.spent + budget.held + amount):
                self.refused = budget
                break

    def refusal(
        self, conn: Connection, agent_id: AgentId, amount: int, now: float, action: str, chain: AuditChain
    ) -> SpendResult:
        """Refuse: nothing charged (the rolls stand), the ``budget_exceeded`` event appended."""
        refused = self.refused
        assert refused is not None
        row = _write(conn, self.key, self.row, self.agent, self.scopes, now)
        event = events.budget_exceeded(
            agent_id,
            now,
            action,
            limit=refused.limit or 0,
            spent=refused.spent,
            reserved=refused.held,
            requested=amount,
            scope=refused.scope,
        )
        records = append(conn, [*self.resets, event], chain, now)
        self.row = row
        return SpendResult(
            state_of(agent_id, row),
            True,
            self.agent.held,
            records,
            None if refused.scope is None else refused.row(),
        )


# -- spends and holds ----------------------------------------------------------------------------


def record_spend(
    conn: Connection,
    agent_id: AgentId,
    amount: int,
    now: float,
    chain: AuditChain,
    note: SpendNote | None,
    plain: bool,
) -> SpendResult:
    """Charge ``amount`` to the agent and its scopes in one transaction, with its ``spend``
    record and ledger row (``Backend.record_spend``). ``plain``: first try :data:`_SQL_SPEND`
    (a hint that the agent has no scopes or period; never trusted for the rules)."""
    key = agent_id._value
    conn.forget(key)
    with conn as db:
        quick = db.execute(_SQL_SPEND, (key, amount, now)).fetchall() if plain else None
        if quick:
            row: Row = quick[0][:10]
            agent = _agent_budget(row, quick[0][10], quick[0][11])
            crossed = agent.alert(agent_id, now)
            row = _write(conn, key, row, agent, [], now)  # only when a threshold was reached
            charged = spend(agent_id, now, amount, None, row[4], None, note)
            records = append_spend(conn, (), charged, crossed, chain, now)
            result = SpendResult(state_of(agent_id, row), False, agent.held, records)
        else:
            checked = _Checked(conn, agent_id, amount, now, "record spend")
            if checked.refused is not None:
                result = checked.refusal(conn, agent_id, amount, now, "spend", chain)
            else:
                budgets = [checked.agent, *checked.scopes]
                _charge(budgets, amount)
                crossed = _alerts(budgets, agent_id, now)
                checked.row = _write(conn, key, checked.row, checked.agent, checked.scopes, now)
                # Every scope the agent lists exists (else BudgetNotFound): all were charged.
                charged = spend(agent_id, now, amount, checked.row[5], checked.row[4], None, note)
                records = append_spend(conn, checked.resets, charged, crossed, chain, now)
                result = SpendResult(state_of(agent_id, checked.row), False, checked.agent.held, records)
            row = checked.row
    conn.remember(key, row)
    return result


def reserve(
    conn: Connection,
    agent_id: AgentId,
    amount: int,
    ttl: float,
    now: float,
    reservation_id: str,
    chain: AuditChain,
) -> Reservation | SpendResult:
    """Hold ``amount`` on the agent and its scopes in one transaction (``Backend.reserve``)."""
    key = agent_id._value
    conn.forget(key)
    with conn as db:
        checked = _Checked(conn, agent_id, amount, now, "reserve budget")
        expires_at = checked.clock + ttl
        if checked.refused is not None:
            refusal = checked.refusal(conn, agent_id, amount, now, "reserve", chain)
        else:
            checked.row = _write(conn, key, checked.row, checked.agent, checked.scopes, now)
            # The hold names the agent's scopes; iron_holds_made enters it on each of them.
            db.execute(_SQL_HOLD, (key, reservation_id, amount, expires_at, checked.row[5]))
            append(conn, checked.resets, chain, now)
    conn.remember(key, checked.row)
    if checked.refused is not None:
        return refusal
    scopes = scopes_of(checked.row[5])
    return Reservation._trusted(reservation_id, agent_id, from_micros(amount), expires_at, scopes)


def commit(
    conn: Connection,
    reservation: Reservation,
    actual: int,
    now: float,
    chain: AuditChain,
    note: SpendNote | None,
) -> CommitResult:
    """Charge ``actual`` for an open hold and drop it, with the ``spend`` record and ledger row,
    in one transaction (``Backend.commit``)."""
    agent_id = reservation.agent_id
    key = agent_id._value
    conn.forget(key)
    with conn as db:
        held, hold_scopes, expired = _settle(conn, agent_id, reservation, now)
        charged = None
        if hold_scopes is None and _TAKE_IN_ONE_STATEMENT:
            # A hold on the agent alone, of an agent without a period: one UPDATE charges it.
            charged = db.execute(_SQL_CHARGE_PLAIN, (key, actual, now)).fetchall()
        scopes: list[_Budget] = []
        if charged:
            row: Row = charged[0][:10]
            agent = _agent_budget(row, 0, charged[0][10])
            budgets, resets = [agent], []
        else:
            found = db.execute(_SQL_GET_ALERTED, (key,)).fetchone()
            if found is None:  # removing an agent removes its holds: only a hand-edited file
                raise AgentNotFound(key)
            row = found[:10]
            agent = _agent_budget(row, 0, found[10])
            scopes = _scopes(conn, scopes_of(hold_scopes), None)  # scopes removed since are skipped
            budgets = [agent, *scopes]
            _bound(budgets, actual, key)
            resets = _roll(budgets, agent_id, now)
            _charge(budgets, actual)
        overspent = [
            events.overspent(
                agent_id,
                now,
                reservation.reservation_id,
                limit=budget.limit or 0,
                spent=budget.spent,
                committed=actual,
                reserved=held,
                scope=budget.scope,
            )
            for budget in budgets
            if passes(budget.limit, budget.spent)
        ]
        crossed = _alerts(budgets, agent_id, now)
        row = _write(conn, key, row, agent, scopes, now)
        names = scopes_text(tuple(budget.scope for budget in scopes if budget.scope is not None))
        charged_record = spend(agent_id, now, actual, names, row[4], reservation.reservation_id, note)
        records = append_spend(conn, [*expired, *resets], charged_record, [*overspent, *crossed], chain, now)
    conn.remember(key, row)
    return CommitResult(state_of(agent_id, row), bool(overspent), records)


def _settle(
    conn: Connection, agent_id: AgentId, reservation: Reservation, now: float
) -> tuple[int, str | None, list[AuditEvent]]:
    """Drop the reservation's hold and the agent's lapsed holds (and, by trigger, their scope
    entries): the hold's amount and scopes, and the lapsed holds' ``hold_expired`` events.

    ``ReservationError`` if the hold is not open; raised inside the commit's transaction, it
    rolls everything back, so an expired hold stays for the next spend, hold or commit to drop.
    """
    params = (agent_id._value, reservation.reservation_id)
    if _TAKE_IN_ONE_STATEMENT:
        taken = conn.db.execute(_SQL_TAKE_HOLD_RETURNING, params).fetchall()
        hold = taken[0] if taken else None
    else:
        hold = conn.db.execute(_SQL_OPEN_HOLD, params).fetchone()
        if hold is not None:
            conn.db.execute(_SQL_DROP_HOLD, params)
    if hold is None:
        raise _not_open(reservation, "commit")
    amount, scopes, clock, lapsed = hold
    return amount, scopes, _drop_lapsed(conn, agent_id, clock, now) if lapsed else []


def release(conn: Connection, reservation: Reservation) -> None:
    """Drop an open hold (its scope entries go with it, by trigger); one statement."""
    params = (reservation.agent_id._value, reservation.reservation_id)
    if conn.db.execute(_SQL_TAKE_HOLD, params).rowcount == 0:
        raise _not_open(reservation, "release")


def _not_open(reservation: Reservation, action: str) -> ReservationError:
    return ReservationError(
        f"cannot {action} reservation {reservation.reservation_id}: it is not open (already "
        "committed or released, expired after its ttl, or its agent was removed); if money was "
        "spent after the hold expired, record it with record_spend"
    )


# -- read-modify-write -----------------------------------------------------------------------------


def update(conn: Connection, agent_id: AgentId, fn: UpdateFn, now: float, chain: AuditChain) -> Change:
    """Replace the state with ``fn(copy)`` after rolling its period, in one transaction."""
    key = agent_id._value
    conn.forget(key)
    with conn as db:
        found = db.execute(SQL_GET, (key,)).fetchone()
        if found is None:
            raise AgentNotFound(key)
        row: Row = found
        agent = _agent_budget(row, 0, 0.0)
        reset = agent.roll(agent_id, now)
        if agent.changed:
            row = (row[0], agent.spent, *row[2:8], agent.period_start, row[9])
        # fn runs holding the write lock: it must be quick.
        new = row_of(fn(state_of(agent_id, row)))
        db.execute(_SQL_REPLACE, (*new, reset is not None, now, key))
        records = [] if reset is None else append(conn, [reset], chain, now)
    conn.remember(key, new)
    return Change(state_of(agent_id, new), records)


# -- budget scopes -------------------------------------------------------------------------------


def set_budget(
    conn: Connection,
    scope: str,
    limit: int | None,
    period: str | None,
    tz: str,
    now: float,
    chain: AuditChain,
    thresholds: tuple[float, ...],
) -> BudgetChange:
    """Create or change a scope, appending ``budget_set`` (``Backend.set_budget``)."""
    with conn as db:
        found: ScopeRow | None = db.execute(_SQL_SCOPE, (scope,)).fetchone()
        if found is None:
            start, spent, held, alerted = current_start(period, tz, now), 0, 0, 0.0
        else:
            _, _, old_period, old_tz, start, spent, held, _, alerted = found
            if (old_period, old_tz) != (period, tz):
                # Its spend counts in the period of now, and nothing is alerted in it yet.
                start, alerted = current_start(period, tz, now), 0.0
        text = thresholds_text(thresholds)
        db.execute(_SQL_PUT_SCOPE, (scope, limit, period, tz, start, spent, text, alerted))
        event = events.budget_set(scope, limit, period, tz, now, thresholds)
        records = append(conn, [event], chain, now)
    return BudgetChange(BudgetRow(scope, limit, period, tz, start, spent, held, thresholds), records)


def get_budget(conn: Connection, scope: str) -> BudgetRow | None:
    """The scope as stored, with its open holds (``Backend.get_budget``)."""
    found = conn.db.execute(_SQL_SCOPE, (scope,)).fetchone()
    return None if found is None else budget_row(found)


def list_budgets(conn: Connection) -> list[BudgetRow]:
    """Every scope, by name (``Backend.list_budgets``)."""
    return [budget_row(found) for found in conn.db.execute(_SQL_ALL_SCOPES).fetchall()]


def remove_budget(conn: Connection, scope: str, now: float, chain: AuditChain) -> BudgetChange:
    """Remove a scope and its holds' entries, appending ``budget_removed`` (``Backend.remove_budget``)."""
    with conn as db:
        found = db.execute(_SQL_SCOPE, (scope,)).fetchone()
        if found is None:
            return BudgetChange(None)
        budget = budget_row(found)
        db.execute(_SQL_DROP_SCOPE, (scope,))
        db.execute(_SQL_DROP_SCOPE_HOLDS, (scope,))
        records = append(conn, [events.budget_removed(scope, budget.spent, now)], chain, now)
    return BudgetChange(budget, records)
