"""How an agent and a budget scope are stored in a row, and read back (schema version 5).

Amounts are whole micro-units (:mod:`...money`). An agent's labels are a JSON object with
sorted keys, so two equal label sets are equal texts (the label index's trigger compares them);
its budget scopes a JSON array in the agent's order; ``NULL`` for none of either, the case of
most agents, which then cost nothing to read. Labels and scope lists repeat across a fleet
(every agent of a team has the team's), so their parsed forms are cached by text. Thresholds
are the text of :func:`...thresholds.thresholds_text` (``NULL``: the default, as for most).

The fragments of SQL that several modules build their statements from live here too: the
agent's columns, the database's clock, and an agent's open holds.
"""

from __future__ import annotations

import functools
import json
from typing import Final

from ...ids import AgentId
from ...models import AgentState
from ...money import from_micros, to_micros
from ...thresholds import DEFAULT_THRESHOLDS, parse_thresholds, thresholds_text
from ..base import BudgetRow
from .connection import Row
from .schema import STATUS_CODE, STATUSES

__all__ = [
    "AGENT_COLUMNS",
    "BUDGET_COLUMNS",
    "CLOCK",
    "HELD",
    "LAPSED",
    "OF_A",
    "SCOPE_HELD",
    "SCOPE_READ",
    "ScopeRow",
    "budget_row",
    "label_pattern",
    "labels_of",
    "labels_text",
    "row_of",
    "scopes_of",
    "scopes_text",
    "state_of",
    "thresholds_of",
]

#: An agent's stored columns, in the order of :data:`.connection.Row`.
AGENT_COLUMNS: Final = (
    "status, budget_spent, pii_detections, budget_limit, labels, budget_scopes, budget_period, "
    "budget_tz, period_start, budget_thresholds"
)
#: An agent's id and stored columns, of the table aliased ``a`` (for joins).
OF_A: Final = "a.agent_id, " + ", ".join(f"a.{name.strip()}" for name in AGENT_COLUMNS.split(","))
#: A budget scope's columns, in the order of :class:`..base.BudgetRow` (held and the
#: thresholds come apart: see :data:`SCOPE_READ`).
BUDGET_COLUMNS: Final = "scope, budget_limit, period, tz, period_start, spent"

# Holds expire by one clock, the database's: SQLite's own time (Unix seconds), read where the
# statement runs, never a caller's ``now``. A caller whose clock is ahead would otherwise drop
# another's open hold, and one that is behind would keep lapsed holds. A hold is open while the
# clock is before its expires_at. (Budget periods, which need calendars, go by ``now``.)
CLOCK: Final = "((julianday('now') - 2440587.5) * 86400.0)"
#: The total of the open holds of agent ?1, in micro-units (0 when none).
HELD: Final = (
    f"(SELECT coalesce(sum(amount), 0) FROM iron_holds WHERE agent_id = ?1 AND expires_at > {CLOCK})"
)
#: Whether agent ?1 has holds that lapsed unsettled: left out of :data:`HELD`, they wait for the
#: agent's next spend, hold or commit to drop them, with a ``hold_expired`` event each.
LAPSED: Final = f"EXISTS (SELECT 1 FROM iron_holds WHERE agent_id = ?1 AND expires_at <= {CLOCK})"
#: The total of the open holds on the scope of the row ``b`` of iron_budgets: a range of
#: iron_scope_holds' key, which orders each scope's holds by expiry.
SCOPE_HELD: Final = (
    "(SELECT coalesce(sum(h.amount), 0) FROM iron_scope_holds h "
    f"WHERE h.scope = b.scope AND h.expires_at > {CLOCK})"
)


def labels_text(labels: dict[str, str]) -> str | None:
    """The stored form of an agent's labels (``None``: none)."""
    if not labels:
        return None
    return json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def label_pattern(key: str, value: str) -> str:
    """The text ``"key":"value"`` that the stored labels (:func:`labels_text`) of exactly the
    agents with that label contain.

    Exact, not a guess: the pair is encoded as the stored text encodes it, and in that JSON an
    unescaped quote followed by a valid key (``a-z0-9_.-``: nothing to escape) and ``":`` can
    only open a key, since a string ends before ``:``, ``,`` or ``}`` and a quote inside one
    is escaped. So ``instr(labels, pattern)`` checks a label without reading the label table.
    """
    return json.dumps(key, ensure_ascii=False) + ":" + json.dumps(value, ensure_ascii=False)


@functools.lru_cache(maxsize=4096)
def _label_items(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(json.loads(text).items())


def labels_of(text: str | None) -> dict[str, str]:
    """The labels stored as ``text``."""
    return {} if text is None else dict(_label_items(text))


@functools.lru_cache(maxsize=256)
def thresholds_of(text: str | None) -> tuple[float, ...]:
    """The thresholds stored as ``text`` (a handful of distinct texts across a fleet)."""
    return DEFAULT_THRESHOLDS if text is None else parse_thresholds(text)


def scopes_text(scopes: tuple[str, ...]) -> str | None:
    """The stored form of a list of scope names (``None``: none).

    Scope names are ``[a-z0-9_.:-]`` (``names.check_scope``): nothing in them needs escaping.
    """
    return '["' + '","'.join(scopes) + '"]' if scopes else None


@functools.lru_cache(maxsize=4096)
def _scope_names(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def scopes_of(text: str | None) -> tuple[str, ...]:
    """The scope names stored as ``text``."""
    return () if text is None else _scope_names(text)


def state_of(agent_id: AgentId, row: Row) -> AgentState:
    """The state a stored row holds."""
    status, spent, pii, limit, labels, scopes, period, tz, start, thresholds = row
    return AgentState._trusted(
        agent_id,
        STATUSES[status],
        from_micros(spent),
        pii,
        None if limit is None else from_micros(limit),
        None if labels is None else dict(_label_items(labels)),
        () if scopes is None else _scope_names(scopes),
        period,
        tz,
        start,
        DEFAULT_THRESHOLDS if thresholds is None else thresholds_of(thresholds),
    )


def row_of(state: AgentState) -> Row:
    """The row that stores ``state`` (already validated)."""
    limit = state.budget_limit
    return (
        STATUS_CODE[state.status._value_],
        to_micros(state.budget_spent),
        state.pii_detections,
        None if limit is None else to_micros(limit),
        labels_text(state.labels),
        scopes_text(state.budget_scopes),
        state.budget_period,
        state.budget_tz,
        state.period_start,
        thresholds_text(state.budget_thresholds),
    )


#: A scope as :func:`budget_row` reads it, of iron_budgets aliased ``b``: its columns, its held
#: total, its thresholds' text and its alerted level.
SCOPE_READ: Final = f"{BUDGET_COLUMNS}, {SCOPE_HELD}, b.thresholds, b.alerted"

#: A row of :data:`SCOPE_READ`.
ScopeRow = tuple[str, int | None, str | None, str, float | None, int, int, str | None, float]


def budget_row(found: ScopeRow) -> BudgetRow:
    """A scope from a row of :data:`SCOPE_READ` (its alerted level is the store's own)."""
    return BudgetRow(*found[:7], thresholds_of(found[7]))
