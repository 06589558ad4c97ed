"""The indexes that let queries walk only what matches, and how a namespace gets them.

Two indexes answer queries that would otherwise read everything (the scripts keep both):

- each slot group's **status sets** (``status:<status>``, the group's agent ids with that
  status), which ``iter_agent_states(status=...)`` walks instead of every agent. Every script
  that saves, changes the status of, removes or purges an agent keeps them (``index_status`` in
  ``lua/_prelude.lua``);
- the audit trail's **time index** (``time_highs`` and ``time_lows``: per block of
  :data:`~.scripts.TIME_BLOCK` seqs, the highest timestamp up to it and the lowest from it on),
  from which a query by ``since``/``until`` learns the seqs where a match can be. Timestamps are
  the events' own and need not rise with seq: the bounds hold whatever the order, and are tight
  where timestamps mostly rise. Appends keep it, prunes trim it (``index_time`` and
  ``prune_time``).

A namespace written before them (by 0.4) gets them here, once, a chunk per script call: the
status sets on the first use of a store (:func:`build_status_sets`, marked done in ``meta``; a
namespace this version creates is marked from the start), the time index before the first query
by time (:func:`build_time_index`; it stays complete while only this version appends, and is
completed again after an older version appended). Writers of this version keep both while they
are built, so no change is missed; a writer of 0.4 keeps neither, so every writer of a
namespace must be upgraded before the status sets are relied on.
"""

from __future__ import annotations

from .keys import GroupWalk, RedisLayout
from .requests import Batch, Call, Op

__all__ = ["build_status_sets", "build_time_index"]


def build_status_sets(layout: RedisLayout) -> Op[None]:
    """Put every agent in its group's status set, a chunk per group per round, then mark the
    namespace. Safe to run by several processes at once and beside writers."""
    walk = GroupWalk(layout, layout.list_batch)
    while not walk.done:
        by_group: dict[int, list[str]] = {}
        for group, agent in walk.advance((yield Batch(walk.commands(), "list agents"))):
            by_group.setdefault(group, []).append(agent.decode())
        calls = [layout.index_status(group, ids) for group, ids in by_group.items()]
        yield Batch([(c.slot, c.command()) for c in calls], "build status sets")
    yield Call(*layout.status_indexed(), True, "mark the status sets built")


def build_time_index(layout: RedisLayout) -> Op[None]:
    """Index by time every record not indexed yet, :attr:`~.keys.RedisLayout.prune_chunk` a call."""
    call = layout.index_time()
    while (yield Call(call.slot, call.command(), True, "index the audit trail by time")) != 1:
        pass
