"""Spends, holds and budget scopes on PostgreSQL.

**The fast path.** ``record_spend``, ``reserve`` and ``commit`` first call the schema's function
of the same job (``spend``, ``reserve``, ``commit_hold``: one round trip, see :mod:`.schema`).
It locks the agent and then the scopes it draws on, in name order, reads their open holds after
taking the locks, and either makes the whole change or makes none and returns no row: when a
period has ended, a limit would be passed, a threshold would be reached, a scope is missing, or
the agent is missing or not running.

A settled spend's ledger record (``events.spend``) goes in the same statement: sealed by the
server on an unkeyed chain, by the client (after the head it predicts) on a keyed one; see
:mod:`.sealing`. One process writing alone pays one round trip per spend, as before the ledger.

**The general path** then runs the same operation in one transaction here, with the same locks
in the same order, applying :mod:`...budgets`' rules in Python: periods that ended start anew
(``budget_reset``), the checks run agent first and then scopes in the order the agent lists them,
and a refusal (``budget_exceeded``) or an overspent commit appends its events in the same
transaction. An error (``BudgetNotFound``, ``ValidationError``) rolls everything back.

Holds expire by the database's clock; periods turn by the manager's (``now``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ... import events
from ...audit_chain import AuditChain
from ...budgets import alerts, check_total, current_start, passes, rolled_start
from ...errors import AgentNotFound, AgentNotRunning, BudgetNotFound, ReservationError
from ...ids import AgentId
from ...ledger import SpendNote
from ...models import AuditEvent, AuditRecord, Reservation
from ...money import from_micros
from ...thresholds import DEFAULT_THRESHOLDS
from ..base import BudgetChange, BudgetRow, CommitResult, SpendResult
from .requests import (
    AGENT_COLUMNS,
    BEGIN,
    BUDGET_COLUMNS,
    CLOCK,
    Op,
    Sql,
    budget_row,
    period_end,
    restartable,
    state_of,
    stored_thresholds,
    thresholds_of,
)
from .schema import RUNNING, STATUSES, render
from .sealing import SealOps

__all__ = ["BudgetOps"]

_DROP_HOLDS: Final = (
    "DELETE FROM {s}.hold_scopes h USING gone WHERE h.scope = ANY (gone.scopes) "
    "AND h.expires_at = gone.expires_at AND h.reservation_id = gone.reservation_id"
)
_HELD: Final = (
    "(SELECT coalesce(sum(h.amount), 0) FROM {s}.hold_scopes h "
    f"WHERE h.scope = b.scope AND h.expires_at > {CLOCK})"
)

_STATEMENTS: Final = {
    "reserve": "SELECT * FROM {s}.reserve(%s, %s, %s, %s, %s)",
    "lock_budgets": (
        f"SELECT {BUDGET_COLUMNS}, alerted FROM {{s}}.budgets WHERE scope = ANY (%s) ORDER BY scope "
        "FOR UPDATE"
    ),
    # The general path reads the database's clock once, after its first lock, and decides by
    # that one reading which holds are open and which lapsed: each is counted or dropped.
    "clock": f"SELECT {CLOCK}",
    "agent_held": "SELECT coalesce(sum(amount), 0) FROM {s}.holds WHERE agent_id = %s AND expires_at > %s",
    "scopes_held": (
        "SELECT scope, sum(amount) FROM {s}.hold_scopes WHERE scope = ANY (%s) AND expires_at > %s "
        "GROUP BY scope"
    ),
    "drop_lapsed": (
        "WITH gone AS (DELETE FROM {s}.holds WHERE agent_id = %s AND expires_at <= %s "
        f"RETURNING reservation_id, amount, expires_at, scopes), scoped AS ({_DROP_HOLDS}) "
        "SELECT reservation_id, amount, expires_at, scopes FROM gone ORDER BY expires_at, reservation_id"
    ),
    "set_spent": (
        "UPDATE {s}.agents SET spent = %s, period_start = %s, period_end = %s, alerted = %s, "
        "changed_at = %s WHERE agent_id = %s"
    ),
    "set_scope_spent": (
        "UPDATE {s}.budgets SET spent = %s, period_start = %s, period_end = %s, alerted = %s, "
        "changed_at = %s WHERE scope = %s"
    ),
    "hold": (
        "INSERT INTO {s}.holds (agent_id, reservation_id, amount, expires_at, scopes) "
        "VALUES (%s, %s, %s, %s, %s)"
    ),
    "hold_scopes": (
        "INSERT INTO {s}.hold_scopes (scope, expires_at, reservation_id, amount) "
        "SELECT scope, %s, %s, %s FROM unnest(%s::text[]) AS scope"
    ),
    "open_hold": (
        "SELECT amount, scopes FROM {s}.holds WHERE agent_id = %s AND reservation_id = %s AND expires_at > %s"
    ),
    "take_hold": (
        "WITH gone AS (DELETE FROM {s}.holds WHERE agent_id = %s AND reservation_id = %s "
        f"RETURNING reservation_id, expires_at, scopes) {_DROP_HOLDS}"
    ),
    "release": (
        "WITH gone AS (DELETE FROM {s}.holds WHERE agent_id = %s AND reservation_id = %s "
        f"AND expires_at > {CLOCK} RETURNING reservation_id, expires_at, scopes), "
        f"scoped AS ({_DROP_HOLDS}) SELECT count(*) FROM gone"
    ),
    "reserved": (
        f"SELECT {AGENT_COLUMNS}, (SELECT coalesce(sum(h.amount), 0) FROM {{s}}.holds h "
        f"WHERE h.agent_id = a.agent_id AND h.expires_at > {CLOCK}) FROM {{s}}.agents a WHERE agent_id = %s"
    ),
    "budget": f"SELECT {BUDGET_COLUMNS}, {_HELD} FROM {{s}}.budgets b WHERE scope = %s",
    "budgets": f"SELECT {BUDGET_COLUMNS}, {_HELD} FROM {{s}}.budgets b ORDER BY scope",
    "lock_budget": f"SELECT {BUDGET_COLUMNS} FROM {{s}}.budgets WHERE scope = %s FOR UPDATE",
    "new_budget": (
        "INSERT INTO {s}.budgets (scope, budget_limit, period, tz, period_start, period_end, spent, "
        "thresholds, changed_at) VALUES (%s, %s, %s, %s, %s, %s, 0, %s, %s) ON CONFLICT (scope) DO NOTHING"
    ),
    # alerted = %s: kept, or 0 when the period or time zone changed.
    "change_budget": (
        "UPDATE {s}.budgets SET budget_limit = %s, period = %s, tz = %s, period_start = %s, "
        "period_end = %s, thresholds = %s, alerted = CASE WHEN %s THEN 0 ELSE alerted END, "
        "changed_at = %s WHERE scope = %s"
    ),
    "remove_budget": f"DELETE FROM {{s}}.budgets WHERE scope = %s RETURNING {BUDGET_COLUMNS}",
    "drop_scope_holds": (
        f"DELETE FROM {{s}}.hold_scopes WHERE scope = %s RETURNING amount, expires_at > {CLOCK}"
    ),
}

_NOT_OPEN: Final = (
    "cannot {action} reservation {rid}: it is not open (already committed or released, expired "
    "after its ttl, or its agent was removed); if money was spent after the hold expired, record "
    "it with record_spend"
)


@dataclass(slots=True)
class _Budget:
    """One budget a charge involves, as read under its lock: the agent's own (``scope=None``) or a scope."""

    scope: str | None
    limit: int | None
    period: str | None
    tz: str
    start: float | None
    spent: int
    held: int
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    alerted: float = 0.0
    rolled: bool = False
    raised: bool = False  # alerted rose: a threshold was reached

    def what(self) -> str:
        return (
            "the agent's budget_spent" if self.scope is None else f"the spend of budget scope {self.scope!r}"
        )

    def row(self) -> BudgetRow:
        assert self.scope is not None
        return BudgetRow(
            self.scope, self.limit, self.period, self.tz, self.start, self.spent, self.held, self.thresholds
        )


def _roll(agent_id: AgentId, budgets: Sequence[_Budget], now: float) -> list[AuditEvent]:
    """Start the new period of every budget whose period ended by ``now``; their reset events."""
    implied: list[AuditEvent] = []
    for budget in budgets:
        start = rolled_start(budget.period, budget.tz, budget.start, now)
        if start is None or budget.period is None:
            continue
        owner = agent_id if budget.scope is None else None
        closed = start if budget.start is None else budget.start
        implied.append(
            events.budget_reset(owner, budget.scope, budget.period, budget.tz, closed, budget.spent, now)
        )
        budget.spent, budget.start, budget.alerted, budget.rolled = 0, start, 0.0, True
    return implied


def _alerts(agent_id: AgentId, budgets: Sequence[_Budget], charge: int, now: float) -> list[AuditEvent]:
    """The ``budget_threshold`` events of charging ``charge`` to ``budgets`` (the agent's first,
    then its scopes in its order), raising the alerted level of each budget that reached one."""
    found: list[AuditEvent] = []
    for budget in budgets:
        more, budget.alerted = alerts(
            agent_id,
            now,
            budget.thresholds,
            budget.alerted,
            budget.limit,
            budget.spent + charge,
            budget.start,
            budget.scope,
        )
        if more:
            found += more
            budget.raised = True
    return found


def _agent_budget(row: Sequence[Any], held: int) -> _Budget:
    """The agent's own budget, from its locked row (the ``lock`` statement's columns)."""
    return _Budget(None, row[3], row[6], row[7], row[8], row[1], held, thresholds_of(row[9]), row[10])


def _scope_budget(row: Sequence[Any], held: int) -> _Budget:
    """A scope's budget, from its locked row (``lock_budgets``: its columns, then ``alerted``)."""
    scope, limit, period, tz, start, spent, thresholds, alerted = row
    return _Budget(scope, limit, period, tz, start, spent, held, thresholds_of(thresholds), alerted)


class BudgetOps(SealOps):
    """Spends, holds and budget scopes, as generators of statements."""

    def __init__(self, quoted_schema: str) -> None:
        super().__init__(quoted_schema)
        self.sql.update({name: render(text, quoted_schema) for name, text in _STATEMENTS.items()})

    # -- the general path ---------------------------------------------------------------------

    def _lock_budgets(
        self, key: str, row: Sequence[Any], scopes: Sequence[str], clock: float
    ) -> Op[list[_Budget]]:
        """The agent's budget (its row is locked; ``row``: the ``lock`` statement's) and its
        scopes', locked in name order, with their holds open at ``clock`` read after the locks;
        ``BudgetNotFound`` for a missing scope."""
        held = (yield Sql(self.sql["agent_held"], (key, clock)))[0][0]
        budgets = [_agent_budget(row, int(held))]
        if scopes:
            locked = {found[0]: found for found in (yield Sql(self.sql["lock_budgets"], (list(scopes),)))}
            for scope in scopes:
                if scope not in locked:
                    raise BudgetNotFound(scope, key)
            found = yield Sql(self.sql["scopes_held"], (list(scopes), clock))
            holds = {scope: int(total) for scope, total in found}
            budgets += [_scope_budget(locked[scope], holds.get(scope, 0)) for scope in scopes]
        return budgets

    def _drop_lapsed(self, agent_id: AgentId, clock: float, now: float) -> Op[list[AuditEvent]]:
        """Drop the agent's holds that lapsed unsettled by ``clock`` (everywhere they count);
        one ``hold_expired`` event each, earliest first, for the caller's transaction."""
        gone = yield Sql(self.sql["drop_lapsed"], (agent_id._value, clock))
        return [
            events.hold_expired(agent_id, rid, amount, expires_at, tuple(scopes or ()), now)
            for rid, amount, expires_at, scopes in gone
        ]

    def _write(self, key: str, budgets: Sequence[_Budget], charge: int, now: float) -> Op[None]:
        """Store the budgets that rolled, reached a threshold or are charged ``charge`` micro-units
        (in the transaction)."""
        for budget in budgets:
            if not (budget.rolled or budget.raised or charge):
                continue
            budget.spent += charge
            end = period_end(budget.period, budget.tz, budget.start)
            name, target = ("set_spent", key) if budget.scope is None else ("set_scope_spent", budget.scope)
            yield Sql(self.sql[name], (budget.spent, budget.start, end, budget.alerted, now, target))

    def _settle(
        self,
        agent_id: AgentId,
        budgets: Sequence[_Budget],
        amount: int,
        now: float,
        chain: AuditChain,
        implied: list[AuditEvent],
        overs: list[AuditEvent],
        labels: Mapping[str, str],
        reservation_id: str | None,
        note: SpendNote | None,
    ) -> Op[list[AuditRecord]]:
        """Charge ``amount`` to ``budgets`` and commit, appending ``implied``, the ledger's
        ``spend`` record (with its ledger row in the same transaction), ``overs`` (a commit's
        ``overspent`` events), then the ``budget_threshold`` events; the records."""
        key = agent_id._value
        scopes = [budget.scope for budget in budgets if budget.scope is not None]
        record = events.spend(agent_id, now, amount, scopes, labels, reservation_id, note)
        reached = _alerts(agent_id, budgets, amount, now)
        yield from self._write(key, budgets, amount, now)
        return (
            yield from self._logged(
                key, implied, record, amount, scopes, labels, note, chain, [*overs, *reached]
            )
        )

    @restartable
    def _charge(
        self,
        agent_id: AgentId,
        amount: int,
        now: float,
        chain: AuditChain,
        hold: tuple[float, str] | None = None,
        note: SpendNote | None = None,
    ) -> Op[SpendResult | Reservation]:
        """A spend (``hold`` is ``None``) or a hold (``(ttl, reservation_id)``) on the general path."""
        key = agent_id._value
        sql = self.sql
        yield BEGIN
        rows = yield Sql(sql["lock"], (key,))
        if not rows:
            raise AgentNotFound(key)
        row = rows[0]
        if row[0] != RUNNING:
            raise AgentNotRunning(
                key, STATUSES[row[0]].value, "record spend" if hold is None else "reserve budget"
            )
        scopes: tuple[str, ...] = tuple(row[5] or ())
        clock: float = (yield Sql(sql["clock"]))[0][0]
        budgets = yield from self._lock_budgets(key, row, scopes, clock)
        for budget in budgets:  # raises before anything changes (the transaction rolls back)
            check_total(budget.spent + amount, budget.what())
        # In order: holds that lapsed, periods that ended, then the refusal if any.
        implied = yield from self._drop_lapsed(agent_id, clock, now)
        implied += _roll(agent_id, budgets, now)
        state = state_of(agent_id, row[:-1])
        agent = budgets[0]
        refusal = next((b for b in budgets if passes(b.limit, b.spent + b.held + amount)), None)
        if refusal is None and hold is None:  # a spend: charged, with its record
            self._learn(key, row[4] or {}, scopes)
            records = yield from self._settle(
                agent_id, budgets, amount, now, chain, implied, [], row[4] or {}, None, note
            )
            state.budget_spent = from_micros(agent.spent)
            state.period_start = agent.start
            return SpendResult(state, False, agent.held, records)
        if refusal is not None:
            action = "spend" if hold is None else "reserve"
            implied.append(
                events.budget_exceeded(
                    agent_id,
                    now,
                    action,
                    limit=refusal.limit or 0,
                    spent=refusal.spent,
                    reserved=refusal.held,
                    requested=amount,
                    scope=refusal.scope,
                )
            )
        yield from self._write(key, budgets, 0, now)
        expires_at = 0.0
        if refusal is None and hold is not None:
            ttl, reservation_id = hold
            expires_at = clock + ttl
            yield Sql(sql["hold"], (key, reservation_id, amount, expires_at, list(scopes)))
            if scopes:
                yield Sql(sql["hold_scopes"], (expires_at, reservation_id, amount, list(scopes)))
        records, head = yield from self._append(implied, chain, now)
        records = yield from self._commit(records, head)
        state.budget_spent = from_micros(agent.spent)
        state.period_start = agent.start
        if refusal is None and hold is not None:
            return Reservation._trusted(hold[1], agent_id, from_micros(amount), expires_at, scopes)
        refused = None if refusal is None or refusal.scope is None else refusal.row()
        return SpendResult(state, refusal is not None, agent.held, records, refused)

    # -- spends and holds ---------------------------------------------------------------------

    def record_spend(
        self, agent_id: AgentId, amount: int, now: float, chain: AuditChain, note: SpendNote | None = None
    ) -> Op[SpendResult]:
        def record(labels: Mapping[str, str], scopes: Sequence[str]) -> AuditEvent:
            return events.spend(agent_id, now, amount, scopes, labels, None, note)

        key = agent_id._value
        labels = self._predicted(key)
        found = yield from self._fast(
            self.sql["spend"], (key, amount, now), amount, record, labels, None, note, chain
        )
        if found is not None:
            return SpendResult(state_of(agent_id, found[0]), records=(found[1],))
        result = yield from self._charge(agent_id, amount, now, chain, None, note)
        assert isinstance(result, SpendResult)
        return result

    def reserve(
        self, agent_id: AgentId, amount: int, ttl: float, now: float, reservation_id: str, chain: AuditChain
    ) -> Op[Reservation | SpendResult]:
        rows = yield Sql(self.sql["reserve"], (agent_id._value, amount, ttl, now, reservation_id))
        if rows:
            expires_at, scopes = rows[0]
            return Reservation._trusted(
                reservation_id, agent_id, from_micros(amount), expires_at, tuple(scopes) if scopes else ()
            )
        return (yield from self._charge(agent_id, amount, now, chain, (ttl, reservation_id)))

    def commit(
        self,
        reservation: Reservation,
        actual: int,
        now: float,
        chain: AuditChain,
        note: SpendNote | None = None,
    ) -> Op[CommitResult]:
        agent_id = reservation.agent_id
        key, rid = agent_id._value, reservation.reservation_id

        def record(labels: Mapping[str, str], scopes: Sequence[str]) -> AuditEvent:
            return events.spend(agent_id, now, actual, scopes, labels, rid, note)

        labels = self._predicted(key)
        params = (key, rid, actual, now)
        found = yield from self._fast(
            self.sql["commit"], params, actual, record, labels, reservation.scopes, note, chain
        )
        if found is not None:
            return CommitResult(state_of(agent_id, found[0]), False, (found[1],))
        return (yield from self._commit_hold(reservation, actual, now, chain, note))

    @restartable
    def _commit_hold(
        self, reservation: Reservation, actual: int, now: float, chain: AuditChain, note: SpendNote | None
    ) -> Op[CommitResult]:
        """``commit`` on the general path: periods roll, and overspends append their events."""
        agent_id = reservation.agent_id
        key, rid = agent_id._value, reservation.reservation_id
        sql = self.sql
        yield BEGIN
        rows = yield Sql(sql["lock"], (key,))
        clock: float = (yield Sql(sql["clock"]))[0][0]
        held = (yield Sql(sql["open_hold"], (key, rid, clock))) if rows else []
        if not held:
            raise ReservationError(_NOT_OPEN.format(action="commit", rid=rid))
        row, (amount, hold_scopes) = rows[0], held[0]
        # The hold's scopes that still exist (a removed scope is skipped), in the hold's order.
        locked = {}
        if hold_scopes:
            locked = {found[0]: found for found in (yield Sql(sql["lock_budgets"], (list(hold_scopes),)))}
        budgets = [_agent_budget(row, 0)]
        budgets += [_scope_budget(locked[scope], 0) for scope in hold_scopes if scope in locked]
        for budget in budgets:
            check_total(budget.spent + actual, budget.what())
        implied = yield from self._drop_lapsed(agent_id, clock, now)
        implied += _roll(agent_id, budgets, now)
        over = [budget for budget in budgets if passes(budget.limit, budget.spent + actual)]
        overs: list[AuditEvent] = []
        for budget in over:
            overs.append(
                events.overspent(
                    agent_id,
                    now,
                    rid,
                    limit=budget.limit or 0,
                    spent=budget.spent + actual,
                    committed=actual,
                    reserved=amount,
                    scope=budget.scope,
                )
            )
        yield Sql(sql["take_hold"], (key, rid))
        self._learn(key, row[4] or {}, tuple(row[5] or ()))
        records = yield from self._settle(
            agent_id, budgets, actual, now, chain, implied, overs, row[4] or {}, rid, note
        )
        state = state_of(agent_id, row[:-1])
        state.budget_spent = from_micros(budgets[0].spent)
        state.period_start = budgets[0].start
        return CommitResult(state, bool(over), records)

    def release(self, reservation: Reservation, now: float) -> Op[None]:
        rid = reservation.reservation_id
        rows = yield Sql(self.sql["release"], (reservation.agent_id._value, rid))
        if not rows[0][0]:
            raise ReservationError(_NOT_OPEN.format(action="release", rid=rid))

    def reserved(self, agent_id: AgentId, now: float) -> Op[tuple[Any, int]]:
        rows = yield Sql(self.sql["reserved"], (agent_id._value,))
        if not rows:
            raise AgentNotFound(agent_id._value)
        return state_of(agent_id, rows[0][:-1]), int(rows[0][-1])

    # -- budget scopes ------------------------------------------------------------------------

    @restartable
    def set_budget(
        self,
        scope: str,
        limit: int | None,
        period: str | None,
        tz: str,
        now: float,
        chain: AuditChain,
        thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    ) -> Op[BudgetChange]:
        sql = self.sql
        stored = stored_thresholds(thresholds)
        yield BEGIN
        found = yield Sql(sql["lock_budget"], (scope,))
        if not found:
            start = current_start(period, tz, now)
            end = period_end(period, tz, start)
            if (yield Sql(sql["new_budget"], (scope, limit, period, tz, start, end, stored, now))):
                spent = 0
            else:  # created by another writer meantime: change it instead
                found = yield Sql(sql["lock_budget"], (scope,))
        if found:
            _, _, old_period, old_tz, start, spent, _ = found[0]
            moved = (old_period, old_tz) != (period, tz)
            if moved:
                start = current_start(period, tz, now)  # the spend counts in the period of now
            end = period_end(period, tz, start)
            yield Sql(sql["change_budget"], (limit, period, tz, start, end, stored, moved, now, scope))
        held = (yield Sql(sql["budget"], (scope,)))[0][-1]
        event = events.budget_set(scope, limit, period, tz, now, thresholds)
        records, head = yield from self._append([event], chain, now)
        records = yield from self._commit(records, head)
        row = BudgetRow(scope, limit, period, tz, start, spent, int(held), thresholds_of(stored))
        return BudgetChange(row, records)

    def get_budget(self, scope: str, now: float) -> Op[BudgetRow | None]:
        rows = yield Sql(self.sql["budget"], (scope,))
        return budget_row(rows[0][:-1], rows[0][-1]) if rows else None

    def list_budgets(self, now: float) -> Op[list[BudgetRow]]:
        return [budget_row(row[:-1], row[-1]) for row in (yield Sql(self.sql["budgets"]))]

    @restartable
    def remove_budget(self, scope: str, now: float, chain: AuditChain) -> Op[BudgetChange]:
        sql = self.sql
        yield BEGIN
        removed = yield Sql(sql["remove_budget"], (scope,))
        if not removed:
            yield from self._commit([], None)
            return BudgetChange(None)
        # The row is locked now: no hold can be added to the scope any more.
        dropped = yield Sql(sql["drop_scope_holds"], (scope,))
        row = budget_row(removed[0], sum(amount for amount, is_open in dropped if is_open))
        ended = rolled_start(row.period, row.tz, row.period_start, now) is not None
        event = events.budget_removed(scope, 0 if ended else row.spent, now)
        records, head = yield from self._append([event], chain, now)
        return BudgetChange(row, (yield from self._commit(records, head)))
