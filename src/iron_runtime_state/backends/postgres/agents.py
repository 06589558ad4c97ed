"""Agent states on PostgreSQL: saves and reads, listing by status and label, counters and status.

A write that is one statement runs in autocommit; a change that comes with an audit event (a
status change, a PII count, a period that rolled in ``update``) runs in one transaction with the
append, so both are kept or neither. ``stats`` adds the 64 rows of partial sums that a trigger
keeps in step with every change (see :mod:`.schema`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ... import events
from ...audit_chain import AuditChain
from ...budgets import rolled_start
from ...errors import AgentNotFound
from ...ids import AgentId
from ...models import MAX_COUNT, AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, check_count
from ...money import from_micros
from ..base import AgentPage, Change, UpdateFn
from ..sql_rows import stored_id
from .requests import AGENT_COLUMNS, BEGIN, COMMIT, Emit, Op, Sql, agent_params, restartable, state_of
from .schema import STATUS_CODE, STATUSES, render
from .trail import TrailOps

__all__ = ["AgentOps"]

_QUALIFIED: Final = ", ".join(f"a.{column}" for column in AGENT_COLUMNS.split(", "))
_WRITTEN: Final = (
    "status, spent, pii, budget_limit, labels, scopes, period, tz, period_start, period_end, "
    "thresholds, changed_at"
)

_STATEMENTS: Final = {
    "get": f"SELECT {AGENT_COLUMNS} FROM {{s}}.agents WHERE agent_id = %s",
    "get_many": f"SELECT agent_id, {AGENT_COLUMNS} FROM {{s}}.agents WHERE agent_id = ANY (%s)",
    "upsert": (
        f"INSERT INTO {{s}}.agents (agent_id, {_WRITTEN}) VALUES ({', '.join(['%s'] * 13)}) "
        "ON CONFLICT (agent_id) DO UPDATE SET "
        + ", ".join(f"{column} = excluded.{column}" for column in _WRITTEN.split(", "))
    ),
    # Many agents in one statement: the columns as arrays (scopes and thresholds as JSON arrays,
    # since PostgreSQL's arrays of arrays must be rectangular; a NULL stays NULL).
    "upsert_many": (
        f"INSERT INTO {{s}}.agents (agent_id, {_WRITTEN}) "
        "SELECT id, status, spent, pii, budget_limit, labels, "
        "ARRAY(SELECT jsonb_array_elements_text(scopes)), period, tz, period_start, period_end, "
        "CASE WHEN thresholds IS NOT NULL THEN "
        "ARRAY(SELECT jsonb_array_elements_text(thresholds)::float8) END, %s "
        "FROM unnest(%s::text[], %s::smallint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::jsonb[], "
        "%s::jsonb[], %s::text[], %s::text[], %s::float8[], %s::float8[], %s::jsonb[]) "
        "AS u(id, status, spent, pii, budget_limit, labels, scopes, period, tz, period_start, period_end, "
        "thresholds) "
        "ON CONFLICT (agent_id) DO UPDATE SET "
        + ", ".join(f"{column} = excluded.{column}" for column in _WRITTEN.split(", "))
    ),
    "replace": (
        "UPDATE {s}.agents SET "
        + ", ".join(f"{column} = %s" for column in _WRITTEN.split(", "))
        + " WHERE agent_id = %s"
    ),
    # The agent's state and its alerted level (see schema.py), locked.
    "lock": f"SELECT {AGENT_COLUMNS}, alerted FROM {{s}}.agents WHERE agent_id = %s FOR UPDATE",
    # An update whose agent's period rolled: the new period has alerted nothing yet.
    "reset_alerted": "UPDATE {s}.agents SET alerted = 0 WHERE agent_id = %s",
    "remove": "DELETE FROM {s}.agents WHERE agent_id = %s",
    # The holds of removed agents, everywhere they count (run after the agents' rows are locked).
    "drop_holds": (
        "WITH gone AS (DELETE FROM {s}.holds WHERE agent_id = ANY (%s) "
        "RETURNING reservation_id, expires_at, scopes) "
        "DELETE FROM {s}.hold_scopes h USING gone WHERE h.scope = ANY (gone.scopes) "
        "AND h.expires_at = gone.expires_at AND h.reservation_id = gone.reservation_id"
    ),
    "ids": "SELECT agent_id FROM {s}.agents",
    "stats": (
        "SELECT coalesce(sum(running), 0), coalesce(sum(stopped), 0), coalesce(sum(failed), 0), "
        "coalesce(sum(spent), 0), coalesce(sum(pii), 0) FROM {s}.stats"
    ),
    "add_pii": (
        f"UPDATE {{s}}.agents SET pii = pii + %s, changed_at = %s WHERE agent_id = %s AND pii < %s "
        f"RETURNING {AGENT_COLUMNS}"
    ),
    "pii": "SELECT pii FROM {s}.agents WHERE agent_id = %s",
    # The old status comes from the locked row, the new state from the updated one.
    "set_status": (
        "UPDATE {s}.agents a SET status = %s, changed_at = %s FROM (SELECT agent_id, status "
        "FROM {s}.agents WHERE agent_id = %s FOR UPDATE) old WHERE a.agent_id = old.agent_id "
        f"RETURNING old.status, {_QUALIFIED}"
    ),
}

#: How ``page_agents`` sorts by each column: a status by its name (failed, running, stopped).
_ORDERS: Final = {
    "status": "(CASE a.status WHEN 2 THEN 0 WHEN 0 THEN 1 ELSE 2 END)",
    "budget_spent": "a.spent",
    "pii_detections": "a.pii",
}


class AgentOps(TrailOps):
    """Agent states: every operation of the contract on agents, as generators of statements."""

    def __init__(self, quoted_schema: str) -> None:
        super().__init__(quoted_schema)
        self.sql.update({name: render(text, quoted_schema) for name, text in _STATEMENTS.items()})

    # -- reads and writes ---------------------------------------------------------------------

    def save(self, state: AgentState, now: float) -> Op[None]:
        # An UPDATE first: most saves rewrite an agent that exists, and an INSERT statement costs
        # more (the totals' trigger runs once per INSERT statement, even one that inserts nothing).
        key, params = state.agent_id._value, agent_params(state)
        if not (yield Sql(self.sql["replace"], (*params, now, key))):
            yield Sql(self.sql["upsert"], (key, *params, now))

    @restartable
    def save_many(self, states: Sequence[AgentState], now: float) -> Op[None]:
        # One statement: the last state of each agent (a statement may write a row once), in id
        # order (concurrent batches lock rows in one order).
        latest = {state.agent_id._value: state for state in states}
        if not latest:
            return
        keys = sorted(latest)
        rows = [agent_params(latest[key]) for key in keys]
        columns: list[list[Any]] = [keys, *map(list, zip(*rows, strict=True))]
        columns[6] = [json.dumps(scopes) for scopes in columns[6]]  # scopes, as JSON arrays
        columns[11] = [None if found is None else json.dumps(found) for found in columns[11]]  # thresholds
        yield Sql(self.sql["upsert_many"], (now, *columns))

    def get(self, key: str) -> Op[AgentState | None]:
        rows = yield Sql(self.sql["get"], (key,))
        return state_of(AgentId._trusted(key), rows[0]) if rows else None

    def get_many(self, keys: Sequence[str]) -> Op[list[AgentState | None]]:
        if not keys:
            return []
        rows = yield Sql(self.sql["get_many"], (list(keys),))
        found = {row[0]: row for row in rows}
        return [state_of(AgentId._trusted(key), found[key][1:]) if key in found else None for key in keys]

    @restartable
    def remove(self, agent_id: AgentId) -> Op[bool]:
        key = agent_id._value
        yield BEGIN
        removed = yield Sql(self.sql["remove"], (key,))
        if removed:  # the row is locked now: no hold can be added for it any more
            yield Sql(self.sql["drop_holds"], ([key],))
        yield COMMIT
        return bool(removed)

    def list_ids(self) -> Op[list[str]]:
        return [key for (key,) in (yield Sql(self.sql["ids"]))]

    def _filtered(
        self, status: AgentStatus | None, labels: Mapping[str, str] | None
    ) -> tuple[str, list[str], list[Any]]:
        """The rows a status and label filter reads (``a``: the agents), its conditions and parameters.

        With labels, one range of ``agent_labels``' key (the first label), in agent order, joined
        to the agents by their key; each other label is one more lookup of that key. (A test on
        the labels column itself would do, but the planner cannot tell how many rows it keeps,
        and may then scan every agent.)
        """
        where: list[str] = []
        params: list[Any] = []
        schema = self.quoted_schema
        source = f"{schema}.agents a"
        if labels:
            (key, value), *others = labels.items()
            source = f"{schema}.agent_labels l JOIN {source} ON a.agent_id = l.agent_id"
            where += ["l.key = %s", "l.value = %s"]
            params += [key, value]
            for key, value in others:
                where.append(
                    f"EXISTS (SELECT FROM {schema}.agent_labels o "
                    "WHERE o.key = %s AND o.value = %s AND o.agent_id = l.agent_id)"
                )
                params += [key, value]
        if status is not None:
            # Written in, not bound: the planner then knows the partial index of stopped and
            # failed agents holds every match, on every execution.
            where.append(f"a.status = {STATUS_CODE[status._value_]}")
        return source, where, params

    def iter_states(
        self, status: AgentStatus | None, labels: Mapping[str, str] | None, batch_size: int
    ) -> Op[None]:
        source, where, params = self._filtered(status, labels)
        # Keyset pages: each starts after the last id of the one before, from the index.
        key = "l.agent_id" if labels else "a.agent_id"
        sql = (
            f"SELECT a.agent_id, {_QUALIFIED} FROM {source} WHERE {' AND '.join([*where, f'{key} > %s'])} "
            f"ORDER BY {key} LIMIT %s"
        )
        after = ""
        while True:
            rows = yield Sql(sql, (*params, after, batch_size))
            if rows:
                yield Emit([state_of(stored_id(row[0]), row[1:]) for row in rows])
            if len(rows) < batch_size:
                return
            after = rows[-1][0]

    def page_agents(self, page: AgentPage) -> Op[list[AgentState]]:
        """One page, sorted in the server: in id order it walks the primary key (or the label's
        range); by status, spend or PII count the server sorts the matches, keeping the top of
        the page only. Spends and PII counts have no index, so that the writes that change them
        touch no index either."""
        source, where, params = self._filtered(page.status, page.labels)
        direction = " DESC" if page.descending else ""
        order = f"a.agent_id{direction}"
        if page.order_by != "agent_id":
            order = f"{_ORDERS[page.order_by]}{direction}, {order}"
        sql = f"SELECT a.agent_id, {_QUALIFIED} FROM {source}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = yield Sql(f"{sql} ORDER BY {order} LIMIT %s OFFSET %s", (*params, page.limit, page.offset))
        return [state_of(stored_id(row[0]), row[1:]) for row in rows]

    def stats(self) -> Op[FleetStats]:
        running, stopped, failed, spent, pii = (yield Sql(self.sql["stats"]))[0]
        return FleetStats(
            total=int(running + stopped + failed),
            running=int(running),
            stopped=int(stopped),
            failed=int(failed),
            budget_spent=from_micros(int(spent)),
            pii_detections=int(pii),
        )

    # -- changes that come with events --------------------------------------------------------

    def _commit(self, records: list[AuditRecord], head: tuple[int, str] | None) -> Op[list[AuditRecord]]:
        """Commit the transaction; once it holds, the watch learns the new head."""
        yield COMMIT
        if head is not None:
            self.watch.wrote(head)
        return records

    @restartable
    def update(self, agent_id: AgentId, fn: UpdateFn, now: float, chain: AuditChain) -> Op[Change]:
        key = agent_id._value
        yield BEGIN
        rows = yield Sql(self.sql["lock"], (key,))
        if not rows:
            raise AgentNotFound(key)
        current = state_of(agent_id, rows[0][:-1])
        implied: list[AuditEvent] = []
        start = rolled_start(current.budget_period, current.budget_tz, current.period_start, now)
        if start is not None and current.budget_period is not None:
            closed = start if current.period_start is None else current.period_start
            implied.append(
                events.budget_reset(
                    agent_id, None, current.budget_period, current.budget_tz, closed, rows[0][1], now
                )
            )
            current.budget_spent = 0.0
            current.period_start = start
            yield Sql(self.sql["reset_alerted"], (key,))
        new = fn(current)
        yield Sql(self.sql["replace"], (*agent_params(new), now, key))
        records, head = yield from self._append(implied, chain, now)
        return Change(new, (yield from self._commit(records, head)))

    @restartable
    def record_pii(
        self, agent_id: AgentId, count: int, now: float, event: AuditEvent, chain: AuditChain
    ) -> Op[Change]:
        key = agent_id._value
        yield BEGIN
        rows = yield Sql(self.sql["add_pii"], (count, now, key, MAX_COUNT - count))
        if not rows:
            found = yield Sql(self.sql["pii"], (key,))
            if not found:
                raise AgentNotFound(key)
            check_count(found[0][0] + count, "the agent's pii_detections")  # raises: nothing changed
        records, head = yield from self._append([event], chain, now)
        return Change(state_of(agent_id, rows[0]), (yield from self._commit(records, head)))

    @restartable
    def set_status(self, agent_id: AgentId, status: AgentStatus, now: float, chain: AuditChain) -> Op[Change]:
        key = agent_id._value
        yield BEGIN
        rows = yield Sql(self.sql["set_status"], (STATUS_CODE[status._value_], now, key))
        if not rows:
            raise AgentNotFound(key)
        old = STATUSES[rows[0][0]]
        implied = [] if old is status else [events.status_changed(agent_id, old, status, now)]
        records, head = yield from self._append(implied, chain, now)
        return Change(state_of(agent_id, rows[0][1:]), (yield from self._commit(records, head)))

    @restartable
    def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> Op[list[str]]:
        codes = sorted({STATUS_CODE[status._value_] for status in statuses})
        if not codes:
            return []
        wanted = ", ".join(str(code) for code in codes)
        yield BEGIN
        removed = yield Sql(
            f"DELETE FROM {self.quoted_schema}.agents WHERE status IN ({wanted}) AND changed_at < %s "
            "RETURNING agent_id",
            (changed_before,),
        )
        ids = [key for (key,) in removed]
        if ids:
            yield Sql(self.sql["drop_holds"], (ids,))
        yield COMMIT
        return ids
