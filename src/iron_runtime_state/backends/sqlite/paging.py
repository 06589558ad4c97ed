"""One page of agents, filtered and sorted (``Backend.page_agents``), for the dashboard's table.

A page reads what it needs from the indexes the store keeps, and is sorted the way
:meth:`..base.AgentPage.sort_key` sorts (ties by agent id, in the page's direction):

- **By agent id** it is read in that order from an index and only until it is full: the range
  of the label index (``iron_labels_by_value``) of the rarest label asked for, else the stopped
  and failed agents' index (``iron_agents_finished``), else the table's own key.
- **By status** the statuses come in the order of their names (failed, running, stopped), each
  in agent id order as above; a page that starts past a status skips it by its count (from
  ``iron_stats``, or counted through the label index).
- **By spend or PII count** SQLite sorts the matches keeping only the ``offset + limit`` first
  (a bounded sort, no temporary copy of the table): the rarest label's agents when that label
  is rare enough, else every agent (the stopped or failed ones through their index).

Spends and PII counts have no index on purpose: every ``record_spend`` would then move an index
entry too, 1.6x the time of a spend (20 µs to 33 µs measured in raw SQLite; a save with three
such indexes 2.3x), for a sort that is a scan of ~100 ms at 1,000,000 agents (docs/sqlite.md).

A label other than the one an index walks is checked on the agent's own labels text with
``instr`` (:func:`.rows.label_pattern`, exact), which costs no lookup. A page's statements read
one snapshot (:meth:`.connection.Connection.snapshot`), so counts and rows agree.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

from ..base import AgentPage
from .rows import OF_A, label_pattern
from .schema import STATUS_CODE, STATUSES

__all__ = ["page_rows"]

#: What a page sorts by (before the agent id), for the orders that have a column.
_COLUMN: Final = {"budget_spent": "a.budget_spent", "pii_detections": "a.pii_detections"}
#: The status codes in the order of the statuses' names (how the contract sorts by status).
_BY_NAME: Final = tuple(sorted(range(len(STATUSES)), key=lambda code: STATUSES[code].value))
#: The stopped and failed codes: iron_agents_finished holds exactly these agents.
_FINISHED: Final = frozenset({STATUS_CODE["stopped"], STATUS_CODE["failed"]})
_SQL_COUNTS: Final = "SELECT running, stopped, failed FROM iron_stats"
# The order of iron_stats' columns, by status code.
_COUNT_COLUMN: Final = {STATUS_CODE["running"]: 0, STATUS_CODE["stopped"]: 1, STATUS_CODE["failed"]: 2}
_SQL_LABEL_COUNT: Final = (
    "SELECT count(*) FROM (SELECT 1 FROM iron_labels INDEXED BY iron_labels_by_value "
    "WHERE key = ? AND value = ? LIMIT ?)"
)
# CROSS JOIN: SQLite keeps the left table outside, so the label's range drives the page.
_FROM_LABEL: Final = (
    "iron_labels l INDEXED BY iron_labels_by_value CROSS JOIN iron_agents a ON a.agent_id = l.agent_id"
)
#: A label whose range holds fewer agents than this share of the fleet (or than
#: ``_RARE_AT_LEAST``: a small fleet's scan is quick anyway) drives a sorted page, as does a
#: status's index: reading an agent through an index costs ~16 times reading it in a scan.
_RARE_SHARE: Final = 16
_RARE_AT_LEAST: Final = 1_000
#: Labels walked in id order are counted up to this to pick the rarest (a few ms each at most).
_WALK_COUNT: Final = 10_000


class _Filter:
    """The agents a page asks for, and where to read them from: the label index or the table."""

    __slots__ = ("driver", "params", "source")

    def __init__(
        self, labels: list[tuple[str, str]], driver: int | None, code: int | None, *, scan: bool = False
    ) -> None:
        #: The label whose index range is walked (``None``: the table).
        self.driver = driver
        where: list[str] = []
        self.params: list[object] = []
        for index, (key, value) in enumerate(labels):
            if index == driver:
                where += ["l.key = ?", "l.value = ?"]
                self.params += [key, value]
            else:
                where.append("instr(a.labels, ?) > 0")
                self.params.append(label_pattern(key, value))
        if code is not None:
            # Written in, not bound: SQLite then knows when iron_agents_finished holds every match.
            where.append(f"a.status = {code}")
        #: ``FROM ... WHERE ...`` of the matches.
        # scan: read the table itself even where the stopped and failed agents' index would do.
        table = "iron_agents a NOT INDEXED" if scan else "iron_agents a"
        self.source = "FROM " + (table if driver is None else _FROM_LABEL)
        if where:
            self.source += " WHERE " + " AND ".join(where)

    def rows(self, db: sqlite3.Connection, order: str, limit: int, offset: int) -> list[Any]:
        """The matches in ``order``, from ``offset`` on, at most ``limit``."""
        sql = f"SELECT {OF_A} {self.source} ORDER BY {order} LIMIT ? OFFSET ?"
        rows: list[Any] = db.execute(sql, (*self.params, limit, offset)).fetchall()
        return rows

    def count(self, db: sqlite3.Connection, most: int) -> int:
        """How many agents match, counted up to ``most``."""
        sql = f"SELECT count(*) FROM (SELECT 1 {self.source} LIMIT ?)"
        found: int = db.execute(sql, (*self.params, most)).fetchone()[0]
        return found

    def id_order(self, descending: bool) -> str:
        """Agent id order, by the column of the index walked (so SQLite reads it in order)."""
        return ("a.agent_id" if self.driver is None else "l.agent_id") + (" DESC" if descending else "")


def page_rows(db: sqlite3.Connection, page: AgentPage) -> list[Any]:
    """The rows (agent id, then :data:`.connection.Row`) of ``page``, in its order.

    ``db`` must be in a read transaction, so that every statement sees the same state.
    """
    labels = list(page.labels.items()) if page.labels else []
    code = None if page.status is None else STATUS_CODE[page.status._value_]
    order = page.order_by
    if order == "status" and code is not None:
        order = "agent_id"  # one status: its agents in id order
    if order == "status":
        return _by_status(db, page, labels)
    if order == "agent_id":
        where = _Filter(labels, _rarest(db, labels, _WALK_COUNT, walk=True), code)
        return where.rows(db, where.id_order(page.descending), page.limit, page.offset)
    # Sorted by SQLite: every match is read, so the fewest possible. A label, or a status
    # through its index, is worth it only when it selects a small share of the fleet: an agent
    # found through an index costs a lookup of its row, one in a scan does not.
    counts = db.execute(_SQL_COUNTS).fetchone()
    rare = max(_RARE_AT_LEAST, sum(counts) // _RARE_SHARE)
    driver = _rarest(db, labels, rare, walk=False)
    scan = driver is None and code in _FINISHED and counts[_COUNT_COLUMN[code]] >= rare
    where = _Filter(labels, driver, code, scan=scan)
    direction = " DESC" if page.descending else ""
    return where.rows(db, f"{_COLUMN[order]}{direction}, a.agent_id{direction}", page.limit, page.offset)


def _by_status(db: sqlite3.Connection, page: AgentPage, labels: list[tuple[str, str]]) -> list[Any]:
    """The statuses in the order of their names (reversed when descending), each in id order."""
    driver = _rarest(db, labels, _WALK_COUNT, walk=True)
    counts = None if labels else db.execute(_SQL_COUNTS).fetchone()
    skip, wanted = page.offset, page.limit
    rows: list[Any] = []
    for code in reversed(_BY_NAME) if page.descending else _BY_NAME:
        where = _Filter(labels, driver, code)
        if skip:
            # The status's agents, counted up to the rows still to skip: all skipped if fewer.
            here = where.count(db, skip) if counts is None else min(counts[_COUNT_COLUMN[code]], skip)
            if here < skip:
                skip -= here
                continue
        found = where.rows(db, where.id_order(page.descending), wanted, skip)
        skip = 0
        rows += found
        wanted -= len(found)
        if not wanted:
            break
    return rows


def _rarest(db: sqlite3.Connection, labels: list[tuple[str, str]], most: int, *, walk: bool) -> int | None:
    """Which label's index range to read: the one with the fewest agents (each counted through
    its index, up to ``most``), or ``None`` (the table).

    In id order (``walk``) a label always drives: its range is a part of the table, in the same
    order (a lone label needs no count). A sorted page reads every match, so there a label
    drives only if it has fewer than ``most`` agents.
    """
    if not labels:
        return None
    if walk and len(labels) == 1:
        return 0
    counts = [db.execute(_SQL_LABEL_COUNT, (key, value, most)).fetchone()[0] for key, value in labels]
    fewest = min(range(len(labels)), key=counts.__getitem__)
    return fewest if walk or counts[fewest] < most else None
