"""The Redis store's operations, written once for the sync and the asyncio driver, with no I/O.

Each operation is a generator (an :data:`Op`) with the name and arguments of the store contract
(:class:`~iron_runtime_state.backends.base.Backend`): it yields requests, receives their
replies, and returns the result; a driver only carries the requests to Redis and back::

    def get(self, key):                                  # here
        reply = yield Call(slot, ("HMGET", ...), True, "read an agent")
        return decode_state(AgentId._trusted(key), reply)

    store.get(key)        # sync.py: derived, self._drive(self.ops.get(key))
    await store.get(key)  # aio.py: store.call("get", key), which drives the same generator

Requests: :class:`~.policy.Call` (one command; the reply), :class:`Batch` (commands that
are safe to repeat, pipelined per server; the replies in order), :class:`Gather` (reads sent
once per server, a failed server's error as its replies), :class:`Block` (a read that waits on
the server, ``XREAD BLOCK``, on a connection of its own), :class:`Pause` (back off for a
moment while another client wins a compare-and-set) and, in the two iterators only,
:class:`Emit` (items for the consumer). So the compare-and-set loops of ``update`` and of audit
appends, the paging of walks, queries, prunes and purges, and every encoding and decoding exist
once, whatever drives them. A driver that raises while a request is out closes the operation
(``close()``), so an operation can clean up in ``except BaseException``.

By concern: a change and its audit event are one write, through an outbox drained into the
audit trail (:mod:`.trail`); spends and holds on an agent and its budget scopes, and how periods
roll without time zones in Lua, are in :mod:`.spend`; the scopes themselves in :mod:`.scopes`.

A namespace 0.4 or 0.5 wrote (layout 1, money as floats) reads as it is; its agents and scopes
change only once :meth:`RedisOps.migrate` (``iron-state migrate``) has converted it (see
:mod:`.migrate`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from typing import ClassVar, Final

from ... import events
from ...audit_chain import AuditChain
from ...budgets import rolled_start
from ...errors import AgentNotFound, BackendError, StateError
from ...ids import AgentId
from ...models import AgentState, AgentStatus, AuditEvent, FleetStats
from ..base import AgentPage, Change, UpdateFn
from ..head_watch import HeadWatch
from .decode import (
    decode_agent_id,
    decode_pii,
    decode_state,
    decode_stats,
    decode_status,
    legacy_error,
)
from .decode import queued as queued_tail
from .index import build_status_sets
from .keys import GroupWalk, RedisLayout, Routed
from .migrate import migrate_namespace
from .policy import RetryPolicy, rexc
from .requests import Batch, Block, Call, Emit, Gather, Op, Pause, Request, contended, op_id, script
from .scopes import ScopeOps
from .spend import SpendOps, legacy_held
from .trail import TrailOps
from .url import RedisConfig

__all__ = [
    "MAX_BLOCK",
    "Batch",
    "Block",
    "Call",
    "Emit",
    "Gather",
    "Op",
    "Pause",
    "RedisOps",
    "RedisStore",
    "Request",
]

#: The longest one ``XREAD BLOCK`` of ``wait_audit`` waits on the server (seconds).
MAX_BLOCK: Final = 1.0


class RedisOps(SpendOps, ScopeOps, TrailOps):
    """Every operation of the Redis store, over one namespace's layout.

    Holds the only state the operations share: the audit head this process saw last (so a lone
    writer appends in one round trip, and an append notices a head that went back), and the
    chain it last sealed with (to drain outboxes before audit reads; see :mod:`.trail`).
    """

    def __init__(
        self, layout: RedisLayout, timeout: float, cluster: bool = False, block: float = 1.0
    ) -> None:
        self.layout = layout
        self._timeout = timeout
        #: The longest one blocking read of ``wait_audit`` waits (seconds): a reply must come
        #: well within the socket timeout, and a sync wait holds a pooled connection meanwhile.
        self._block = block
        #: Whether the keys spread over masters: outboxes are then trimmed by the next change of
        #: their group (their slot is not the trail's; see :mod:`.trail`), and ``stats``
        #: pipelines its reads.
        self._cluster = cluster
        self._landed: dict[int, bytes] = {}  # (cluster) outboxes' entries to trim: see .trail
        #: The highest head this store object saw or wrote (as ``_watch`` keeps it, but readable).
        #: An append seals on it first, so a lone writer appends in one round trip; and compares
        #: the head it finds with the one known *before* it asked, so that a head another thread
        #: moved meanwhile is not taken for a rewind.
        self._head: tuple[int, str] | None = None
        self._watch = HeadWatch()
        #: The chain this store object last sealed with: audit reads drain the outboxes with it.
        self._chain: AuditChain | None = None
        self._swept = False  # this store object drained every outbox once, at its first write
        #: Whether the namespace is still in the layout 0.4/0.5 wrote (reads only; see migrate).
        self.legacy = False
        #: Settled markers of cluster steps, deleted in batches (see :mod:`.spend`).
        self._garbage: list[Routed] = []
        self._prefix = "" if cluster else layout.budgets.prefix
        self._stats_commands = layout.stats_commands()
        self._stats_script = layout.stats_script()

    def prepare(self) -> Op[None]:
        """Check that the namespace uses this version's key layout (once per store)."""
        call = self.layout.meta_check()
        status_sets, self.legacy = self.layout.check_meta((yield script(call, True, "check the namespace")))
        if not status_sets:
            yield from build_status_sets(self.layout)  # a namespace written before them

    def _writable(self) -> Op[None]:
        """Before a change that stores agents or scopes: a namespace 0.4/0.5 wrote must be migrated
        first (its meta is read again, in case another process migrated it meanwhile)."""
        if self.legacy:
            lay = self.layout
            layout = yield Call(lay.meta_slot, ("HGET", lay.meta, "layout"), True, "check the namespace")
            if layout == b"1":
                raise legacy_error(lay.namespace)
            self.legacy = False

    def migrate(self) -> Op[str]:
        """See ``Backend.migrate``: convert a namespace 0.4/0.5 wrote to this layout (see :mod:`.migrate`)."""
        report = yield from migrate_namespace(self.layout)
        self.legacy = False
        return report

    # -- agent states --------------------------------------------------------------------------

    def save(self, state: AgentState, now: float) -> Op[None]:
        """See ``Backend.save``."""
        yield from self._writable()
        yield script(self.layout.save(state, now), True, "save an agent state")

    def save_many(self, states: Sequence[AgentState], now: float) -> Op[None]:
        """See ``Backend.save_many``."""
        yield from self._writable()
        calls = [self.layout.save(state, now) for state in states]
        yield Batch([(c.slot, c.command()) for c in calls], "save agent states")

    def get(self, key: str) -> Op[AgentState | None]:
        """See ``Backend.get``."""
        read = self.layout.get_command(key)
        if read is None:
            return None
        reply = yield Call(*read, True, "read an agent")
        return decode_state(AgentId._trusted(key), reply)

    def get_many(self, keys: Sequence[str]) -> Op[list[AgentState | None]]:
        """See ``Backend.get_many``: one pipelined read."""
        reads = [self.layout.get_command(key) for key in keys]
        replies = iter((yield Batch([r for r in reads if r is not None], "read agent states")))
        return [
            None if read is None else decode_state(AgentId._trusted(key), next(replies))
            for key, read in zip(keys, reads, strict=True)
        ]

    def remove(self, agent_id: AgentId) -> Op[bool]:
        """See ``Backend.remove``: on a cluster, the agent's holds on scopes are dropped next."""
        yield from self._writable()
        reply = yield script(self.layout.remove(agent_id, self._prefix), False, "remove an agent")
        yield from self._drop_scope_holds(reply[1:])
        return bool(reply[0] == 1)

    def _drop_scope_holds(self, members: Sequence[bytes]) -> Op[None]:
        """(cluster) Drop holds of removed agents from the scopes (their expiry would, later)."""
        if members:
            entries = [value for member in members for value in (member, "")]
            yield from self._settle_scopes(entries, 0.0, None, "drop the holds of removed agents")

    def _walk_round(self, walk: GroupWalk) -> Op[list[tuple[int, bytes]]]:
        """The next round of a walk over the groups' id sets: one pipelined read per server."""
        return walk.advance((yield Batch(walk.commands(), "list agents")))

    def list_ids(self) -> Op[list[str]]:
        """See ``Backend.list_ids``."""
        walk = GroupWalk(self.layout, self.layout.list_batch)
        ids: list[str] = []
        while not walk.done:
            ids += [agent.decode() for _, agent in (yield from self._walk_round(walk))]
        return ids

    def iter_states(
        self, status: AgentStatus | None, labels: Mapping[str, str] | None, batch_size: int
    ) -> Op[None]:
        """See ``Backend.iter_states`` (an iterator: the states come as :class:`Emit`).

        With labels, the walk goes over the groups' set of the first label (``label:<key>=<value>``),
        else over their status sets (with a status) or their id sets.
        """
        label = next(iter(labels.items())) if labels else None
        walk = GroupWalk(self.layout, max(batch_size, 100), status=status, label=label)
        wanted = dict(labels or {})
        while not walk.done:
            batch = yield from self._walk_round(walk)
            for start in range(0, len(batch), batch_size):
                # Ids read back are checked: garbage in the id set is a SchemaError, not a miss.
                keys = [decode_agent_id(agent).as_str() for _, agent in batch[start : start + batch_size]]
                states = yield from self.get_many(keys)
                # Checked again: an agent changed since the walk read the set.
                yield Emit(
                    [
                        s
                        for s in states
                        if s is not None
                        and (status is None or s.status is status)
                        and all(s.labels.get(k) == v for k, v in wanted.items())
                    ]
                )

    def page_agents(self, page: AgentPage) -> Op[list[AgentState]]:
        """See ``Backend.page_agents``: the matching agents, walked through the label or status
        sets as :meth:`iter_states` walks them, then sorted."""
        walk = self.iter_states(page.status, page.labels, 1000)
        states: list[AgentState] = []
        request = next(walk, None)
        while request is not None:
            reply = None
            if type(request) is Emit:
                states += request.items
            else:
                reply = yield request
            try:
                request = walk.send(reply)
            except StopIteration:
                break
        states.sort(key=page.sort_key, reverse=page.descending)
        return states[page.offset : page.offset + page.limit]

    def stats(self) -> Op[FleetStats]:
        """See ``Backend.stats``: one script on a standalone server, one pipeline per master of a
        cluster (a script cannot read the slots of other masters)."""
        if self._cluster:
            return decode_stats((yield Batch(self._stats_commands, "read fleet statistics")))
        return decode_stats((yield script(self._stats_script, True, "read fleet statistics")))

    def update(self, agent_id: AgentId, fn: UpdateFn, now: float, chain: AuditChain) -> Op[Change]:
        """See ``Backend.update``: read, roll the agent's period if it ended (its ``budget_reset``
        queued with the write, its alerted level cleared), apply ``fn``, store if unchanged
        meanwhile, else again."""
        yield from self._writable()
        if not self._swept:
            yield from self._first_use(chain)
        lay = self.layout
        command = lay.get_command(agent_id.as_str())
        assert command is not None  # an id always has a group
        read = Call(*command, True, "read an agent")
        group = lay.group_of(agent_id.as_str())
        started = time.monotonic()
        for attempt in itertools.count():
            fields = yield read
            current = decode_state(agent_id, fields)
            if current is None:
                raise AgentNotFound(agent_id.as_str())
            if fields[1] is None:  # stored by 0.4/0.5: migrate first
                raise legacy_error(lay.namespace)
            event: list[str] = []
            period, start = current.budget_period, current.period_start
            rolled = rolled_start(period, current.budget_tz, start, now)
            if period is not None and rolled is not None:
                if start is not None:
                    reset = events.budget_reset(
                        agent_id, None, period, current.budget_tz, start, int(fields[1]), now
                    )
                    event = ["kind", "event", "agent", agent_id.as_str(), "type", reset.event_type,
                             "timestamp", str(reset.timestamp), "details", reset.details]  # fmt: skip
                current.budget_spent, current.period_start = 0.0, rolled
            new = fn(current)
            landed = self._trim_point(group)
            if event and landed:  # save.lua cannot trim the outbox it queues in (see .trail)
                yield Call(*lay.outbox_trim(group, landed), True, "trim an audit outbox")
                self._trimmed(group, landed)
            call = lay.update(fields, new, now, event, rolled=period is not None and rolled is not None)
            reply = yield script(call, False, "update an agent")
            if reply[0] == 1:
                return Change(new.copy(), (yield from self._events(group, queued_tail(reply, 1), chain)))
            if reply[0] == -1:
                raise AgentNotFound(agent_id.as_str())
            pause = contended(started, self._timeout, attempt)
            if pause is None:
                break
            if pause.seconds:
                yield pause
        raise BackendError(
            f"update_agent_state of {agent_id} kept losing to concurrent writers for "
            f"{time.monotonic() - started:.0f} s; retry later"
        )

    # -- changes and their events -----------------------------------------------------------------
    # Each script runs once per op key (op_id()), so it is resent after a lost reply (_once).

    def record_pii(
        self, agent_id: AgentId, count: int, now: float, event: AuditEvent, chain: AuditChain
    ) -> Op[Change]:
        """See ``Backend.record_pii``."""
        call = self.layout.record_pii(agent_id, count, now, event, op_id())
        group = self.layout.group_of(agent_id.as_str())
        reply = yield from self._change(call, "record PII detections", chain, group)
        state, queued = decode_pii(agent_id, count, reply, self.layout.namespace)
        return Change(state, (yield from self._events(group, queued, chain)))

    def set_status(self, agent_id: AgentId, status: AgentStatus, now: float, chain: AuditChain) -> Op[Change]:
        """See ``Backend.set_status``."""
        call = self.layout.set_status(agent_id, status, now, op_id())
        group = self.layout.group_of(agent_id.as_str())
        reply = yield from self._change(call, "set a status", chain, group)
        state, queued = decode_status(agent_id, reply, self.layout.namespace)
        return Change(state, (yield from self._events(group, queued, chain)))

    def _legacy_reserved(self, agent_id: AgentId, now: float) -> Op[tuple[AgentState, int]]:
        """``reserved`` of an agent 0.4/0.5 stored (float holds), read as it is."""
        a, g = agent_id.as_str(), self.layout.keys_of(agent_id)
        command = self.layout.get_command(a)
        assert command is not None
        fields, members = yield Batch(
            [command, (g.slot, ("ZRANGEBYSCORE", g.holds + a, f"({now!r}", "+inf"))], "read holds"
        )
        state = decode_state(agent_id, fields)
        if state is None:
            raise AgentNotFound(a)
        return state, legacy_held(members)

    def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> Op[list[str]]:
        """See ``Backend.purge_agents``."""
        yield from self._writable()
        wanted = tuple(dict.fromkeys(statuses))
        if not wanted:
            return []
        lay = self.layout
        removed: list[str] = []
        if AgentStatus.RUNNING in wanted:
            # Running agents are not indexed by change time: consider every agent.
            walk = GroupWalk(lay, lay.purge_chunk)
            while not walk.done:
                by_group: dict[int, list[str]] = {}
                for g, agent in (yield from self._walk_round(walk)):
                    by_group.setdefault(g, []).append(agent.decode())
                for g, ids in by_group.items():
                    removed += yield from self._purge(g, ids, wanted, changed_before)
            return removed
        # Candidates come from each group's index of finished agents, a chunk at a time; those
        # the script keeps (another status) are skipped by the offset next time.
        offsets = dict.fromkeys(range(lay.groups), 0)
        while offsets:
            replies = yield Batch(lay.finished_commands(offsets, changed_before), "find agents to purge")
            pending, offsets = offsets, {}
            for (g, offset), candidates in zip(pending.items(), replies, strict=True):
                if not candidates:
                    continue
                gone = yield from self._purge(g, [c.decode() for c in candidates], wanted, changed_before)
                removed += gone
                if len(candidates) == lay.purge_chunk:
                    offsets[g] = offset + len(candidates) - len(gone)
        return removed

    def _purge(
        self, group: int, ids: list[str], statuses: Sequence[AgentStatus], cutoff: float
    ) -> Op[list[str]]:
        call = self.layout.purge(group, ids, statuses, cutoff, self._prefix)
        removed, dropped = yield script(call, False, "purge agents")
        yield from self._drop_scope_holds(dropped)
        return [agent.decode() for agent in removed]


class RedisStore:
    """What both drivers hold for one store: its settings, key layout, operations and policy.

    The sync and the asyncio driver add only how they carry requests to Redis and back.
    """

    #: Driver exception types that the store contract's wrapper maps with :meth:`map_driver_error`.
    driver_errors: ClassVar[tuple[type[BaseException], ...]] = (rexc.RedisError,)

    def __init__(self, config: RedisConfig) -> None:
        """The store ``config`` describes; nothing connects until the first call."""
        self._config = config
        self._layout = RedisLayout(config.namespace, timeout=config.timeout)
        #: Every operation of the store, as I/O-free generators.
        self.ops = RedisOps(
            self._layout, config.timeout, config.cluster, block=min(MAX_BLOCK, config.socket_timeout / 2)
        )
        self._policy = RetryPolicy(config)
        self._ready = False  # the namespace's layout was checked; False again after close()
        self._closed = False

    @property
    def url(self) -> str:
        """The store's URL with any password masked."""
        return self._policy.url

    @property
    def layout(self) -> RedisLayout:
        """The namespace's key layout (for tools and tests that read Redis directly)."""
        return self._layout

    def map_driver_error(self, exc: BaseException) -> StateError:
        """The library error for a redis-py exception that escaped the retry logic."""
        return self._policy.map_error(exc)
