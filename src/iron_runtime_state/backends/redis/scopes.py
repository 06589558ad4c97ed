"""Budget scopes (``team:support``, ``org:acme``): set, read, list and remove, as I/O-free
operations of :class:`~.ops.RedisOps` (a mixin).

Every scope of a namespace lives in the budgets slot (:class:`~.keys.BudgetKeys`): its hash, its
holds, the set of every scope's name and an outbox of its own, drained into the audit trail as a
slot group's is (:attr:`~.keys.RedisLayout.budgets_group`). Spending from scopes is in
:mod:`.spend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...audit_chain import AuditChain
from ...models import AuditRecord
from ...periods import bounds
from ...thresholds import DEFAULT_THRESHOLDS, thresholds_text
from ..base import BudgetChange, BudgetRow
from .decode import Queued, decode_row, queued
from .keys import RedisLayout
from .requests import Call, Op, op_id
from .scripts import ABSENT, ScriptCall, load_scripts

__all__ = ["ScopeOps"]


def _or_absent(text: str | None) -> str:
    return ABSENT if text is None else text


class ScopeOps:
    """The budget scope operations of :class:`~.ops.RedisOps`."""

    layout: RedisLayout

    if TYPE_CHECKING:

        def _change(self, call: ScriptCall, what: str, chain: AuditChain, group: int) -> Op[Any]: ...

        def _events(self, group: int, queued: Queued | None, chain: AuditChain) -> Op[list[AuditRecord]]: ...

        def _writable(self) -> Op[None]: ...

    def _budget_call(self, name: str, scope: str, args: Sequence[str | int], op: str) -> ScriptCall:
        """A script on one scope: its hash, its holds, the names, the outbox and the op key."""
        b = self.layout.budgets
        keys = (b.scope + scope, b.holds + scope, b.names, b.outbox, b.op + op)
        return ScriptCall(load_scripts()[name], b.slot, keys, args)

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
        """See ``Backend.set_budget``."""
        yield from self._writable()
        start, end = ("", "") if period is None else (repr(t) for t in bounds(now, period, tz))
        op = op_id()
        args = (
            scope,
            "" if limit is None else str(limit),
            period or "",
            tz,
            start,
            end,
            repr(now),
            self.layout.op_ttl,
            _or_absent(thresholds_text(thresholds)),
        )
        call = self._budget_call("budget_set", scope, args, op)
        reply = yield from self._change(call, "set a budget", chain, self.layout.budgets_group)
        records = yield from self._events(self.layout.budgets_group, queued(reply, 2), chain)
        return BudgetChange(decode_row(reply[1]), records)

    def remove_budget(self, scope: str, now: float, chain: AuditChain) -> Op[BudgetChange]:
        """See ``Backend.remove_budget``."""
        yield from self._writable()
        op = op_id()
        call = self._budget_call("budget_remove", scope, (scope, repr(now), self.layout.op_ttl), op)
        reply = yield from self._change(call, "remove a budget", chain, self.layout.budgets_group)
        if reply[0] != 1:
            return BudgetChange(None)
        records = yield from self._events(self.layout.budgets_group, queued(reply, 2), chain)
        return BudgetChange(decode_row(reply[1]), records)

    def _read_budgets(self, names: Sequence[str]) -> Op[list[BudgetRow]]:
        b = self.layout.budgets
        call = ScriptCall(load_scripts()["budgets_read"], b.slot, (b.names,), (b.prefix, *names))
        return [decode_row(row) for row in (yield Call(call.slot, call.command(), True, "read budgets"))]

    def get_budget(self, scope: str, now: float) -> Op[BudgetRow | None]:
        """See ``Backend.get_budget`` (holds expire by the server's clock)."""
        rows = yield from self._read_budgets((scope,))
        return rows[0] if rows else None

    def list_budgets(self, now: float) -> Op[list[BudgetRow]]:
        """See ``Backend.list_budgets``: every scope in one script, by name."""
        return (yield from self._read_budgets(()))
