"""Migrating a namespace 0.4 or 0.5 wrote (layout 1) to this version's layout (2).

Layout 1 kept money as floats (``budget_spent``, ``budget_limit``, hold members
``<reservation id>:<float>``, the groups' ``budget_spent`` totals). Layout 2 keeps whole
micro-units (``spent_micros``, ``limit_micros``, ``<reservation id>:<micro-units>``), and adds
labels, budget scopes and periods, whose absence reads as none. This version reads a layout 1
namespace as it is (the decoders convert each float to the micro-units nearest it), but changes its
agents and scopes only once it is migrated: a 0.4/0.5 process still writing floats beside it would
corrupt the totals. So the migration is explicit: stop every 0.4/0.5 process of the namespace,
then run ``iron-state migrate`` (the store's ``migrate()``).

:func:`migrate_namespace` walks every group, a chunk of agents per group per round: it reads each
agent's float fields and holds (one pipelined read per server), converts them in Python
(:func:`~...money.to_micros`, exact), and stores them with ``migrate.lua``, which converts an agent
only if it still holds what was read and is not converted yet, and moves its spend into the
group's exact total in the same step. So migrations may run at once, or again after a crash,
and each agent is converted once. A limit past :data:`~...money.MAX_MICROS` (0.4 allowed a
trillion) becomes that largest limit, which never refuses less than it did. Last, the groups'
float totals are dropped and ``meta`` takes layout 2, after which 0.4/0.5 refuses the namespace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from ...money import MAX_MICROS, to_micros
from .keys import LAYOUT_VERSION, LEGACY_LAYOUT, GroupWalk, RedisLayout, Routed
from .requests import Batch, Call, Op
from .scripts import ScriptCall, load_scripts

__all__ = ["migrate_namespace"]

#: Agents per group per round.
CHUNK: Final = 200


def _converted(member: bytes) -> bytes:
    """A hold member of layout 1 (``<id>:<float>``) in layout 2 (``<id>:<micro-units>``)."""
    rid, _, amount = member.rpartition(b":")
    if amount.isdigit():  # converted already
        return member
    return rid + b":" + str(to_micros(float(amount))).encode()


def _convert(layout: RedisLayout, group: int, ids: Sequence[str], reads: Sequence[Any]) -> ScriptCall | None:
    """The ``migrate.lua`` call for the agents of one group still in layout 1 (``None``: none)."""
    g = layout.group_keys[group]
    keys: list[str] = [g.stats]
    args: list[str | bytes | int] = []
    for agent, (fields, holds) in zip(ids, reads, strict=True):
        status, spent_micros, spent, limit = fields
        if status is None or spent_micros is not None or spent is None:
            continue
        micros_limit = "" if limit is None else str(min(to_micros(float(limit)), MAX_MICROS))
        changed = [(m, _converted(m)) for m in holds if _converted(m) != m]
        keys += (g.agent + agent, g.holds + agent)
        args += (agent, spent, limit or b"", str(to_micros(float(spent))), micros_limit, len(changed))
        args += [value for pair in changed for value in pair]
    if not args:
        return None
    return ScriptCall(load_scripts()["migrate"], g.slot, keys, args)


def _reads(layout: RedisLayout, group: int, ids: Sequence[str]) -> list[Routed]:
    """Each agent's float fields and its holds, as read for :func:`_convert`."""
    g = layout.group_keys[group]
    commands: list[Routed] = []
    for agent in ids:
        commands.append(
            (g.slot, ("HMGET", g.agent + agent, "status", "spent_micros", "budget_spent", "budget_limit"))
        )
        commands.append((g.slot, ("ZRANGE", g.holds + agent, 0, -1)))
    return commands


def migrate_namespace(layout: RedisLayout) -> Op[str]:
    """Convert the namespace to this version's layout if 0.4/0.5 wrote it; a report of what was done."""
    ns = layout.namespace
    found = yield Call(layout.meta_slot, ("HGET", layout.meta, "layout"), True, "read the namespace's layout")
    if found is None or found == str(LAYOUT_VERSION).encode():
        return f"namespace {ns!r} uses Redis layout {LAYOUT_VERSION} already: nothing to migrate"
    if found != str(LEGACY_LAYOUT).encode():
        return f"namespace {ns!r} uses Redis layout {found!r}, which this version does not know: nothing done"
    converted = 0
    walk = GroupWalk(layout, CHUNK)
    while not walk.done:
        by_group: dict[int, list[str]] = {}
        for group, agent in walk.advance((yield Batch(walk.commands(), "list agents"))):
            by_group.setdefault(group, []).append(agent.decode())
        pending = by_group
        for _ in range(10):  # an agent changed between its read and its conversion is read again
            commands = [c for group, ids in pending.items() for c in _reads(layout, group, ids)]
            replies = iter((yield Batch(commands, "read agents to migrate")))
            calls = []
            for group, ids in pending.items():
                reads = [(next(replies), next(replies)) for _ in ids]
                call = _convert(layout, group, ids, reads)
                if call is not None:
                    calls.append((group, call))
            if not calls:
                break
            results = yield Batch([(c.slot, c.command()) for _, c in calls], "migrate agents")
            pending = {}
            for (group, _), (count, changed) in zip(calls, results, strict=True):
                converted += int(count)
                if changed:
                    pending[group] = [agent.decode() for agent in changed]
            if not pending:
                break
    yield Batch([(g.slot, ("HDEL", g.stats, "budget_spent")) for g in layout.group_keys], "drop float totals")
    yield Call(
        layout.meta_slot, ("HSET", layout.meta, "layout", LAYOUT_VERSION), True, "mark the namespace migrated"
    )
    return (
        f"namespace {ns!r} migrated from Redis layout {LEGACY_LAYOUT} (0.4/0.5, money as floats) to "
        f"{LAYOUT_VERSION} (whole micro-units): {converted} agents converted"
    )
