"""The key layout of one namespace, and the commands and script calls that read and change it.

Plain computation: a driver only sends what this module builds and hands the replies to
:mod:`.decode`. Key layout of one namespace ``ns`` (what an operator sees with ``redis-cli``)::

    ns:meta                            hash    layout version and slot-group count
    ns:{ns:g<G>}:agent:<agent_id>      hash    status, budget_spent, pii_detections,
                                               budget_limit (absent: no limit), changed_at
    ns:{ns:g<G>}:holds:<agent_id>      zset    open reservations "<reservation_id>:<amount>",
                                               scored by expiry (Unix seconds, server clock)
    ns:{ns:g<G>}:stats                 hash    the group's running/stopped/failed counts,
                                               budget_spent and pii_detections totals
    ns:{ns:g<G>}:ids                   zset    the group's agent ids (score 0: walked by name)
    ns:{ns:g<G>}:finished              zset    stopped and failed agents, scored by last change
    ns:{ns:g<G>}:status:<status>       zset    the group's agent ids with that status (score 0)
    ns:{ns:g<G>}:outbox                stream  audit events of the group's changes on their way
                                               to the trail (see ops.py)
    ns:{ns:g<G>}:op:<op id>            string  the reply of one change, for a resend of its call;
                                               expires after the call's timeout (see ops.py)
    ns:{ns:audit}:log                  stream  the audit trail; entry id "<seq>-0"
    ns:{ns:audit}:head                 hash    seq, hash and seal of the newest record ever
                                               appended; anchor_seq, anchor_hash and anchor_seal
                                               after a prune (no seals: no audit key, or 0.4);
                                               time_indexed: the seq the time index reaches
    ns:{ns:audit}:drained              hash    per group: the id of its last outbox entry appended
    ns:{ns:audit}:landed               zset    "<group>/<outbox entry id>" of the newest records
                                               that came from outboxes, scored by their seq
    ns:{ns:audit}:by_agent:<agent_id>  zset    seqs of one agent's records
    ns:{ns:audit}:by_type:<event_type> zset    seqs of one event type's records
    ns:{ns:audit}:indexes              set     the index keys above, for cleanup after a prune
    ns:{ns:audit}:time_highs           zset    blocks of seqs by the highest timestamp up to
                                               them, where it rises (see lua/_prelude.lua)
    ns:{ns:audit}:time_lows            zset    blocks of seqs by the lowest timestamp from them on
    ns:{ns:audit}:op:<op id>           string  the reply of one prune, as the groups' op keys

An agent belongs to one of :data:`GROUPS` slot groups, fixed by its UUID. The part in braces is
the Redis Cluster hash tag, so an agent's keys and its group's aggregates share one slot and one
Lua script updates them together; groups spread over the masters of a cluster. ``stats()`` sums
the groups' small ``stats`` hashes and never reads an agent; ``iter_agent_states(status=...)``
walks the groups' status sets, and an audit query by time reads only the seqs the time index
leaves (see :mod:`.index`). ``meta``'s ``status_sets`` marks a namespace whose status sets are
complete. The audit trail and its indexes share a slot of their own; a change's audit event
reaches it through the group's outbox.
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from ...errors import ConfigurationError, SchemaError
from ...ids import AgentId
from ...models import AgentState, AgentStatus, AuditEvent, Reservation
from .scripts import OUTBOX_BATCH, ScriptCall, load_scripts
from .url import RedisConfig, check_namespace

__all__ = [
    "CLUSTER_SLOTS",
    "GROUPS",
    "LAYOUT_VERSION",
    "OP_TTL_MARGIN",
    "STATE_FIELDS",
    "STATS_FIELDS",
    "GroupKeys",
    "GroupWalk",
    "Origin",
    "RedisLayout",
    "Routed",
    "key_slot",
]

#: Version of the key layout; stored in ``<namespace>:meta`` and checked on first use.
LAYOUT_VERSION: Final = 1
#: Slot groups per namespace (a power of two). Fixed for the life of a namespace.
GROUPS: Final = 256
CLUSTER_SLOTS: Final = 16384
#: Seconds a change's reply outlives its call's timeout under its op key, for a resend whose
#: first copy the server runs late.
OP_TTL_MARGIN: Final = 2.0
#: The fields of an agent's hash that make its state, in the order the decoders read them.
STATE_FIELDS: Final = ("status", "budget_spent", "pii_detections", "budget_limit")
#: The fields of a group's statistics hash.
STATS_FIELDS: Final = ("running", "stopped", "failed", "budget_spent", "pii_detections")
#: The group of an agent is the low bits of its UUID, read from its last hex digits: eight of
#: them hold 32 bits, so the group count stays at or below 2**32.
_GROUP_DIGITS: Final = 8

#: One pipelined command: the slot of its keys, and the command.
Routed = tuple[int, tuple[Any, ...]]


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster slot of a key (CRC16 of its hash tag, or of the whole key)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % CLUSTER_SLOTS


class GroupKeys(NamedTuple):
    """The keys of one slot group: an agent's two keys (and a call's op key) are a prefix here and its id."""

    slot: int  # the cluster slot of every key of the group
    agent: str  # + agent id: the agent's state hash
    holds: str  # + agent id: the agent's open reservations
    stats: str
    ids: str
    finished: str
    outbox: str
    op: str  # + op id: the reply of one change, for a resend of its call
    status: str  # + status value: the group's agent ids with that status

    def status_keys(self) -> tuple[str, str, str]:
        """The group's running, stopped and failed sets (the scripts' ``status_sets``)."""
        return (self.status + "running", self.status + "stopped", self.status + "failed")

    @classmethod
    def of(cls, namespace: str, group: int) -> GroupKeys:
        """Group ``group``'s keys; the braces hold the Cluster hash tag that fixes its slot."""
        prefix = f"{namespace}:{{{namespace}:g{group}}}:"
        return cls(
            key_slot(prefix),
            f"{prefix}agent:",
            f"{prefix}holds:",
            f"{prefix}stats",
            f"{prefix}ids",
            f"{prefix}finished",
            f"{prefix}outbox",
            f"{prefix}op:",
            f"{prefix}status:",
        )


class Origin(NamedTuple):
    """Where the records of an append come from: entries of one group's outbox, oldest first."""

    group: int
    #: The outbox entry of each record, in order (``b""`` for a record no outbox holds).
    entry_ids: Sequence[bytes]
    #: The entry of the change being made, whose record the caller wants back (if any).
    own: bytes | None


def _hold(reservation: Reservation) -> str:
    """A hold's member in the holds sorted set: the reservation id and the amount, as reserved."""
    return f"{reservation.reservation_id}:{reservation.amount!r}"


class RedisLayout:
    """The keys of one namespace and the script calls that change them.

    Methods that build a :class:`~.scripts.ScriptCall` do no I/O; an operation runs the call
    and passes the reply to the matching decoder of :mod:`.decode`.
    """

    #: Ids per group per round trip when listing agents.
    list_batch = 1000
    #: Audit candidates a query script examines per call (bounds how long it blocks Redis).
    query_budget = 1000
    #: Audit records a prune script removes per call.
    prune_chunk = 1000
    #: Candidates per purge script call.
    purge_chunk = 200

    def __init__(self, namespace: str, groups: int = GROUPS, *, timeout: float = RedisConfig.timeout) -> None:
        """The layout of ``namespace``; ``timeout`` is the store's bound on one call, retries
        included: a change's reply is kept that long plus :data:`OP_TTL_MARGIN` for a resend."""
        if groups < 1 or groups & (groups - 1) or groups > 1 << (4 * _GROUP_DIGITS):
            raise ConfigurationError(f"the slot-group count must be a power of two up to 2**32, got {groups}")
        self.namespace = check_namespace(namespace)
        self.groups = groups
        self._mask = groups - 1
        ns = self.namespace
        #: The keys of each group, and their slot.
        self.group_keys: tuple[GroupKeys, ...] = tuple(GroupKeys.of(ns, g) for g in range(groups))
        self.meta = f"{ns}:meta"
        self.meta_slot = key_slot(self.meta)
        audit = f"{ns}:{{{ns}:audit}}:"
        self.audit_prefix = audit
        self.audit_log = audit + "log"
        self.audit_head = audit + "head"
        self.audit_indexes = audit + "indexes"
        self.audit_drained = audit + "drained"
        self.audit_landed = audit + "landed"
        self.audit_time = (audit + "time_highs", audit + "time_lows")
        self.audit_slot = key_slot(self.audit_log)
        #: Milliseconds a change's reply is kept under its op key.
        self.op_ttl = math.ceil((timeout + OP_TTL_MARGIN) * 1000)
        self._scripts = load_scripts()

    # -- keys --

    def group_of(self, key: str) -> int:
        """The slot group of the agent whose canonical id is ``key``; stable for the namespace's life.

        It is the low bits of the UUID, read from its last hex digits (``ValueError`` for text
        that does not end in hex digits).
        """
        return int(key[-_GROUP_DIGITS:], 16) & self._mask

    def keys_of(self, agent_id: AgentId) -> GroupKeys:
        """The keys of the agent's group (its own keys are the group's prefixes and its id)."""
        return self.group_keys[self.group_of(agent_id.as_str())]

    def slot_of(self, agent_id: AgentId) -> int:
        """The cluster slot of every key of the agent."""
        return self.keys_of(agent_id).slot

    def agent_key(self, agent_id: AgentId) -> str:
        """The agent's state hash."""
        return self.keys_of(agent_id).agent + agent_id.as_str()

    def agent_keys(self, agent_id: AgentId) -> dict[str, str]:
        """Every key that holds something of the agent or its group, by role."""
        g, a = self.keys_of(agent_id), agent_id.as_str()
        return {
            "agent": g.agent + a,
            "holds": g.holds + a,
            "stats": g.stats,
            "ids": g.ids,
            "finished": g.finished,
        }

    def audit_by_agent(self, agent_id: str) -> str:
        """The index of one agent's audit records."""
        return f"{self.audit_prefix}by_agent:{agent_id}"

    def audit_by_type(self, event_type: str) -> str:
        """The index of one event type's audit records."""
        return f"{self.audit_prefix}by_type:{event_type}"

    # -- plain commands --

    def get_command(self, key: str) -> Routed | None:
        """``HMGET`` of the :data:`STATE_FIELDS` of the agent whose canonical id is ``key``.

        Decode with ``decode_state``. ``None`` for text that cannot be an id: only ids are
        stored, so it would find nothing, and it must not break the read. Text that is not ASCII
        could not be sent, and text that does not end in hex digits has no group; any other text
        is read from its own group's slot (on the right master of a cluster) and finds nothing.
        """
        if not key.isascii():
            return None
        try:
            g = self.group_keys[self.group_of(key)]
        except ValueError:
            return None
        return g.slot, ("HMGET", g.agent + key, *STATE_FIELDS)

    def stats_commands(self) -> list[Routed]:
        """One ``HMGET`` per group's statistics hash (decode with ``decode_stats``)."""
        return [(g.slot, ("HMGET", g.stats, *STATS_FIELDS)) for g in self.group_keys]

    def stats_script(self) -> ScriptCall:
        """Every group's statistics hash in one call, for a standalone server, where every key is
        on one server (decode with ``decode_stats``)."""
        keys = [g.stats for g in self.group_keys]
        return ScriptCall(self._scripts["stats"], self.group_keys[0].slot, keys, STATS_FIELDS)

    def finished_commands(self, offsets: Mapping[int, int], changed_before: float) -> list[Routed]:
        """For each group, the next purge candidates: finished agents changed before the time."""
        cutoff = f"({changed_before!r}"
        commands: list[Routed] = []
        for g, offset in offsets.items():
            keys = self.group_keys[g]
            command = ("ZRANGEBYSCORE", keys.finished, "-inf", cutoff, "LIMIT", offset, self.purge_chunk)
            commands.append((keys.slot, command))
        return commands

    def head_command(self) -> Routed:
        """Read the audit head's ``seq, hash``; decode with ``decode_head``."""
        return self.audit_slot, ("HMGET", self.audit_head, "seq", "hash")

    def outbox_oldest(self, group: int) -> Routed:
        """The oldest :data:`~.scripts.OUTBOX_BATCH` entries of a group's outbox."""
        g = self.group_keys[group]
        return g.slot, ("XRANGE", g.outbox, "-", "+", "COUNT", OUTBOX_BATCH)

    def outbox_commands(self) -> list[Routed]:
        """The oldest entries of every group's outbox (see :meth:`outbox_oldest`)."""
        return [self.outbox_oldest(group) for group in range(self.groups)]

    def outbox_after(self, group: int, entry_id: bytes) -> Routed:
        """The next :data:`~.scripts.OUTBOX_BATCH` entries of a group's outbox after ``entry_id``."""
        g = self.group_keys[group]
        return g.slot, ("XRANGE", g.outbox, b"(" + entry_id, "+", "COUNT", OUTBOX_BATCH)

    def outbox_trim(self, group: int, upto: bytes) -> Routed:
        """Drop a group's outbox entries up to ``upto`` (appended to the trail); safe to repeat."""
        g = self.group_keys[group]
        ms, _, n = upto.partition(b"-")
        return g.slot, ("XTRIM", g.outbox, "MINID", b"%s-%d" % (ms, int(n) + 1))

    # -- agent states --

    def save(self, state: AgentState, now: float) -> ScriptCall:
        """Insert or replace a state."""
        a = state.agent_id.as_str()
        g = self.keys_of(state.agent_id)
        limit = state.budget_limit
        return ScriptCall(
            self._scripts["save"],
            g.slot,
            (g.agent + a, g.stats, g.ids, g.finished, *g.status_keys()),
            (
                a,
                state.status.value,
                repr(state.budget_spent),
                str(state.pii_detections),
                "" if limit is None else repr(limit),
                repr(now),
            ),
        )

    def update(self, read: Sequence[Any], new: AgentState, now: float) -> ScriptCall:
        """Store ``new`` if the agent still holds the fields ``read`` (from :meth:`get_command`).

        The reply is 1 when stored, 0 when the agent changed meanwhile, -1 when it is gone.
        """
        call = self.save(new, now)
        return call._replace(args=(*call.args, read[0], read[1], read[2], read[3] or b""))

    def remove(self, agent_id: AgentId) -> ScriptCall:
        """Remove an agent and its holds."""
        a, g = agent_id.as_str(), self.keys_of(agent_id)
        return ScriptCall(
            self._scripts["remove"],
            g.slot,
            (g.agent + a, g.stats, g.ids, g.finished, g.holds + a, *g.status_keys()),
            (a,),
        )

    def _change(
        self, name: str, g: GroupKeys, keys: tuple[str, ...], args: tuple[str, ...], op: str
    ) -> ScriptCall:
        """A script that changes an agent of group ``g`` once per ``op`` (a random id per call):
        ``keys``, then the group's outbox and the call's op key; ``args``, then the op key's
        time to live."""
        return ScriptCall(self._scripts[name], g.slot, (*keys, g.outbox, g.op + op), (*args, self.op_ttl))

    def record_spend(self, agent_id: AgentId, amount: float, now: float, op: str) -> ScriptCall:
        """Add to budget_spent within the limit (decode with ``decode_spend``)."""
        a, g = agent_id.as_str(), self.keys_of(agent_id)
        return self._change(
            "record_spend", g, (g.agent + a, g.stats, g.holds + a), (repr(amount), repr(now), a), op
        )

    def record_pii(self, agent_id: AgentId, count: int, now: float, event: AuditEvent, op: str) -> ScriptCall:
        """Add PII detections with their event (decode with ``decode_pii``)."""
        a, g = agent_id.as_str(), self.keys_of(agent_id)
        args = (str(count), repr(now), a, event.event_type, str(event.timestamp), event.details)
        return self._change("record_pii", g, (g.agent + a, g.stats, g.finished), args, op)

    def set_status(self, agent_id: AgentId, status: AgentStatus, now: float, op: str) -> ScriptCall:
        """Change the status (decode with ``decode_status``)."""
        a, g = agent_id.as_str(), self.keys_of(agent_id)
        keys = (g.agent + a, g.stats, g.finished, *g.status_keys())
        return self._change("set_status", g, keys, (status.value, repr(now), a), op)

    # -- reservations --

    def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str, op: str
    ) -> ScriptCall:
        """Hold part of the budget (decode with ``decode_reserve``)."""
        a, g = agent_id.as_str(), self.keys_of(agent_id)
        args = (repr(amount), repr(ttl), reservation_id, repr(now), a)
        return self._change("reserve", g, (g.agent + a, g.holds + a), args, op)

    def commit(self, reservation: Reservation, actual: float, now: float, op: str) -> ScriptCall:
        """Settle a hold with what was spent (decode with ``decode_commit``)."""
        a, g = reservation.agent_id.as_str(), self.keys_of(reservation.agent_id)
        hold, rid = _hold(reservation), reservation.reservation_id
        args = (hold, repr(actual), repr(now), a, rid, repr(reservation.amount))
        return self._change("commit", g, (g.agent + a, g.stats, g.holds + a, g.finished), args, op)

    def release(self, reservation: Reservation, op: str) -> ScriptCall:
        """Drop a hold (the reply is 1, or -3 when it was not open)."""
        a, g = reservation.agent_id.as_str(), self.keys_of(reservation.agent_id)
        return self._change("release", g, (g.holds + a,), (_hold(reservation),), op)

    def reserved(self, agent_id: AgentId) -> ScriptCall:
        """The state and the open holds' sum (decode with ``decode_reserved``)."""
        a, g = agent_id.as_str(), self.keys_of(agent_id)
        return ScriptCall(self._scripts["reserved"], g.slot, (g.agent + a, g.holds + a), ())

    def purge(
        self, group: int, candidates: Sequence[str], statuses: Sequence[AgentStatus], cutoff: float
    ) -> ScriptCall:
        """Remove those candidates of one group that still qualify (the reply lists them)."""
        g = self.group_keys[group]
        keys = [g.stats, g.ids, g.finished, *g.status_keys()]
        for a in candidates:
            keys += (g.agent + a, g.holds + a)
        return ScriptCall(
            self._scripts["purge"],
            g.slot,
            keys,
            (repr(cutoff), ",".join(s.value for s in statuses), *candidates),
        )

    def meta_check(self) -> ScriptCall:
        """Mark the namespace with this layout, reading back what it holds (see :meth:`check_meta`)."""
        return ScriptCall(self._scripts["meta"], self.meta_slot, (self.meta,), (LAYOUT_VERSION, self.groups))

    def check_meta(self, reply: Sequence[Any]) -> bool:
        """Whether the namespace keeps its status sets (else they are built: :meth:`index_status`);
        ``SchemaError`` when it was written with another layout."""
        layout, groups, status_sets = reply
        if layout != str(LAYOUT_VERSION).encode() or groups != str(self.groups).encode():
            raise SchemaError(
                f"namespace {self.namespace!r} holds data in Redis layout {layout!r} with {groups!r} "
                f"slot groups, but this version of iron-runtime-state uses layout {LAYOUT_VERSION} "
                f"with {self.groups}; use a matching version or another namespace"
            )
        return status_sets is not None

    def index_status(self, group: int, ids: Sequence[str]) -> ScriptCall:
        """Put agents of one group in their status's set (building the sets of an older namespace)."""
        g = self.group_keys[group]
        keys = [*g.status_keys(), *(g.agent + a for a in ids)]
        return ScriptCall(self._scripts["index_status"], g.slot, keys, ids)

    def status_indexed(self) -> Routed:
        """Mark the namespace's status sets as built."""
        return self.meta_slot, ("HSET", self.meta, "status_sets", "1")

    # -- audit trail --

    def append_audit(
        self,
        events: Sequence[AuditEvent],
        hashes: Sequence[str],
        head: tuple[int, str],
        seal: str | None,
        origin: Origin | None = None,
        trim: bool = False,
    ) -> ScriptCall:
        """Append sealed events if the trail's head is still ``head``, storing the new head's ``seal``.

        ``origin`` says which outbox entries the events come from (events given directly have
        none); ``trim`` drops them from the outbox in the same script, which only a standalone
        server can run (on a cluster the outbox lives in another slot). The reply is ``[1]``
        when appended, or ``[0, seq, hash, mark, ...]`` (see ``lua/append_audit.lua``).
        """
        keys = [
            self.audit_log,
            self.audit_head,
            self.audit_indexes,
            self.audit_drained,
            self.audit_landed,
            *self.audit_time,
        ]
        position: dict[str, int] = {}
        args: list[str | int | bytes] = [head[0], head[1], seal or "", "", b"", 0]
        entry_ids: Sequence[bytes] = (b"",) * len(events)
        if origin is not None:
            args[3], args[4], entry_ids = str(origin.group), origin.own or b"", origin.entry_ids
        for event, digest, entry_id in zip(events, hashes, entry_ids, strict=True):
            agent = event.agent_id.as_str()
            positions = []
            for key in (self.audit_by_agent(agent), self.audit_by_type(event.event_type)):
                at = position.get(key)
                if at is None:
                    keys.append(key)
                    at = position[key] = len(keys)
                positions.append(at)
            args += (agent, event.event_type, event.timestamp, event.details, digest, *positions, entry_id)
        if trim and origin is not None:
            keys.append(self.group_keys[origin.group].outbox)
            args[5] = len(keys)
        return ScriptCall(self._scripts["append_audit"], self.audit_slot, keys, args)

    def audit_marks(self) -> ScriptCall:
        """Read the head, the anchor, their seals and the count at once (decode with ``decode_marks``)."""
        return ScriptCall(
            self._scripts["audit_marks"], self.audit_slot, (self.audit_log, self.audit_head), ()
        )

    def query_audit(
        self,
        agent_id: AgentId | None,
        event_type: str | None,
        since: int | None,
        until: int | None,
        after: int,
        want: int,
    ) -> ScriptCall:
        """One page of a query: at most ``want`` records, :attr:`query_budget` candidates examined.

        An agent's or a type's index is used when the query names one, and the time index when it
        gives ``since`` or ``until``.
        """
        if agent_id is not None:
            index, mode = self.audit_by_agent(agent_id.as_str()), "index"
        elif event_type is not None:
            index, mode, event_type = self.audit_by_type(event_type), "index", None  # all match
        else:
            index, mode = self.audit_log, "all"
        return ScriptCall(
            self._scripts["query_audit"],
            self.audit_slot,
            (self.audit_log, index, self.audit_head, *self.audit_time),
            (
                after,
                min(want, self.query_budget),
                self.query_budget,
                event_type or "",
                "" if since is None else since,
                "" if until is None else until,
                mode,
            ),
        )

    def prune_audit(self, before: int, last: bytes, last_hash: str, seal: str | None, op: str) -> ScriptCall:
        """Remove the oldest records up to the entry ``last`` (all before ``before``), which becomes
        the anchor with its ``seal``; once per ``op``. The reply is how many were removed, or -1
        (read again)."""
        return ScriptCall(
            self._scripts["prune_audit"],
            self.audit_slot,
            (self.audit_log, self.audit_head, f"{self.audit_prefix}op:{op}", *self.audit_time),
            (before, last, last_hash, seal or "", self.prune_chunk, self.op_ttl),
        )

    def index_time(self) -> ScriptCall:
        """Index by time the next :attr:`prune_chunk` records not indexed yet (reply: 1 when done)."""
        return ScriptCall(
            self._scripts["index_time"],
            self.audit_slot,
            (self.audit_log, self.audit_head, *self.audit_time),
            (self.prune_chunk,),
        )

    def oldest_command(self) -> Routed:
        """The oldest :attr:`prune_chunk` records (decode each with ``decode_audit_row``)."""
        return self.audit_slot, ("XRANGE", self.audit_log, "-", "+", "COUNT", self.prune_chunk)

    def prune_indexes(self, index_keys: Sequence[str], anchor_seq: int) -> ScriptCall:
        """Drop pruned seqs from some index keys."""
        return ScriptCall(
            self._scripts["prune_indexes"], self.audit_slot, (self.audit_indexes, *index_keys), (anchor_seq,)
        )


class GroupWalk:
    """Paging through every group's id set, ``count`` ids per group per round.

    Each round is one pipelined read per server: :meth:`commands`, then :meth:`advance` with the
    replies, until :attr:`done`. Ids come in name order within a group, each exactly once.
    """

    def __init__(
        self,
        layout: RedisLayout,
        count: int,
        groups: Sequence[int] | None = None,
        status: AgentStatus | None = None,
    ) -> None:
        """Walk the ``groups`` (all by default): their agents, or those with ``status``."""
        self._layout = layout
        self._count = count
        self._status = status
        self._starts: dict[int, bytes] = dict.fromkeys(
            range(layout.groups) if groups is None else groups, b"-"
        )
        self._order: list[tuple[int, bytes]] = []

    @property
    def done(self) -> bool:
        """Whether every group has been walked to its end."""
        return not self._starts

    def commands(self) -> list[Routed]:
        """The next round's reads."""
        lay = self._layout
        self._order = list(self._starts.items())
        commands: list[Routed] = []
        for g, start in self._order:
            keys = lay.group_keys[g]
            key = keys.ids if self._status is None else keys.status + self._status.value
            commands.append((keys.slot, ("ZRANGEBYLEX", key, start, "+", "LIMIT", 0, self._count)))
        return commands

    def advance(self, replies: Sequence[Sequence[bytes]]) -> list[tuple[int, bytes]]:
        """The ids of this round with their groups; the groups not finished go on."""
        starts: dict[int, bytes] = {}
        batch: list[tuple[int, bytes]] = []
        for (g, _), ids in zip(self._order, replies, strict=True):
            batch.extend((g, agent) for agent in ids)
            if len(ids) == self._count:
                starts[g] = b"(" + ids[-1]
        self._starts = starts
        return batch
