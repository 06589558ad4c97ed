"""The key layout of one namespace, and the commands and script calls that read and change it.

Plain computation: a driver only sends what this module builds and hands the replies to
:mod:`.decode`. Key layout of one namespace ``ns`` (what an operator sees with ``redis-cli``)::

    ns:meta                            hash    layout version and slot-group count
    ns:{ns:g<G>}:agent:<agent_id>      hash    status, spent_micros, pii_detections, changed_at;
                                               limit_micros, labels (JSON), scopes (comma-
                                               separated), period, tz, period_start, period_end,
                                               thresholds ("0.5,0.9"; "" none) when not the
                                               default, alerted (highest threshold alerted in
                                               the period) when any (money in micro-units)
    ns:{ns:g<G>}:holds:<agent_id>      zset    open reservations "<reservation_id>:<micro-units>
                                               [:<scopes>]", scored by expiry (server clock)
    ns:{ns:g<G>}:pending:<agent_id>    zset    (cluster) spends whose scopes are being charged,
                                               "<op id>:<micro-units>:<now>\n<scopes>\n<note>"
                                               scored by expiry
    ns:{ns:g<G>}:committed:<res id>    string  (cluster) the amount a commit charged, until its
                                               scopes are charged too (see spend.py)
    ns:{ns:g<G>}:stats                 hash    the group's running/stopped/failed counts,
                                               spent_micros and pii_detections totals
    ns:{ns:g<G>}:ids                   zset    the group's agent ids (score 0: walked by name)
    ns:{ns:g<G>}:finished              zset    stopped and failed agents, scored by last change
    ns:{ns:g<G>}:status:<status>       zset    the group's agent ids with that status (score 0)
    ns:{ns:g<G>}:label:<key>=<value>   zset    the group's agent ids with that label (score 0)
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
    ns:{ns:budgets}:scope:<name>       hash    a budget scope: spent_micros, tz; limit_micros,
                                               period, period_start, period_end, thresholds,
                                               alerted when set (as an agent's)
    ns:{ns:budgets}:holds:<name>       zset    its holds "<reservation_id>:<micro-units>:
                                               <agent_id>:<scopes>", scored by expiry
    ns:{ns:budgets}:names              zset    every scope's name (score 0)
    ns:{ns:budgets}:outbox             stream  audit events of scope changes (as a group's)
    ns:{ns:budgets}:op:<op id>         string  the reply of one scope change (see spend.py)

An agent belongs to one of :data:`GROUPS` slot groups, fixed by its UUID. The part in braces is
the Redis Cluster hash tag, so an agent's keys and its group's aggregates share one slot and one
Lua script updates them together; groups spread over the masters of a cluster. ``stats()`` sums
the groups' small ``stats`` hashes and never reads an agent; ``iter_agent_states(status=...)``
walks the groups' status sets, and an audit query by time reads only the seqs the time index
leaves (see :mod:`.index`). ``meta``'s ``status_sets`` marks a namespace whose status sets are
complete. The audit trail and its indexes share a slot of their own; a change's audit event
reaches it through the group's outbox. Every budget scope of a namespace shares one more slot,
so one script checks and charges all the scopes an agent draws on (see :mod:`.spend`).
"""

from __future__ import annotations

import binascii
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from ...errors import ConfigurationError, SchemaError
from ...ids import AgentId
from ...models import AgentState, AgentStatus, AuditEvent
from ...money import to_micros
from ...periods import bounds
from ...thresholds import thresholds_text
from .scripts import ABSENT, AGENT_FIELDS, OUTBOX_BATCH, ScriptCall, load_scripts
from .url import RedisConfig, check_namespace

__all__ = [
    "CLUSTER_SLOTS",
    "GROUPS",
    "LAYOUT_VERSION",
    "LEGACY_LAYOUT",
    "OP_TTL_MARGIN",
    "READ_FIELDS",
    "STATS_FIELDS",
    "BudgetKeys",
    "GroupKeys",
    "GroupWalk",
    "Origin",
    "RedisLayout",
    "Routed",
    "key_slot",
]

#: Version of the key layout; stored in ``<namespace>:meta`` and checked on first use. Layout 2
#: keeps money as whole micro-units and adds labels, budget scopes and periods.
LAYOUT_VERSION: Final = 2
#: The layout 0.4 and 0.5 wrote (money as floats): read as it is, changed after ``migrate``.
LEGACY_LAYOUT: Final = 1
#: Slot groups per namespace (a power of two). Fixed for the life of a namespace.
GROUPS: Final = 256
CLUSTER_SLOTS: Final = 16384
#: Seconds a change's reply outlives its call's timeout under its op key, for a resend whose
#: first copy the server runs late.
OP_TTL_MARGIN: Final = 2.0
#: The fields of an agent's hash a read asks for, in the order the decoders read them: its state
#: (as the scripts reply it), then 0.4/0.5's float spend and limit (present until migrated).
READ_FIELDS: Final = (*AGENT_FIELDS[:10], "budget_spent", "budget_limit")
#: The fields of a group's statistics hash (``budget_spent``: 0.4/0.5's float total).
STATS_FIELDS: Final = ("running", "stopped", "failed", "spent_micros", "pii_detections", "budget_spent")
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
    """The keys of one slot group: an agent's keys (and a call's op key) are a prefix here and its id."""

    slot: int  # the cluster slot of every key of the group
    agent: str  # + agent id: the agent's state hash
    holds: str  # + agent id: the agent's open reservations
    stats: str
    ids: str
    finished: str
    outbox: str
    op: str  # + op id: the reply of one change, for a resend of its call
    status: str  # + status value: the group's agent ids with that status
    label: str  # + "<key>=<value>": the group's agent ids with that label
    pending: str  # + agent id: (cluster) spends under way whose scopes are being charged
    committed: str  # + reservation id: (cluster) a commit whose scopes are not charged yet

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
            f"{prefix}label:",
            f"{prefix}pending:",
            f"{prefix}committed:",
        )


class BudgetKeys(NamedTuple):
    """The keys of a namespace's budget scopes, all in one slot: a scope's keys are a prefix and
    its name. Scripts on a standalone server name them from :attr:`prefix`."""

    slot: int
    prefix: str
    scope: str  # + name: the scope's hash
    holds: str  # + name: the holds on it
    names: str  # every scope's name
    outbox: str
    op: str  # + op id

    @classmethod
    def of(cls, namespace: str) -> BudgetKeys:
        """The budget scopes' keys of ``namespace`` (hash tag ``{<ns>:budgets}``)."""
        prefix = f"{namespace}:{{{namespace}:budgets}}:"
        return cls(
            key_slot(prefix),
            prefix,
            f"{prefix}scope:",
            f"{prefix}holds:",
            f"{prefix}names",
            f"{prefix}outbox",
            f"{prefix}op:",
        )


class Origin(NamedTuple):
    """Where the records of an append come from: entries of one group's outbox, oldest first."""

    group: int
    #: The outbox entry of each record, in order (``b""`` for a record no outbox holds).
    entry_ids: Sequence[bytes]
    #: The entries of the change being made, whose records the caller wants back (if any).
    own: Sequence[bytes]


def _text(value: str | None, absent: str = "") -> str:
    return absent if value is None else value


def _labels_text(labels: Mapping[str, str]) -> str:
    """Labels as stored: one JSON object, keys sorted (so equal labels are equal text), or ''."""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False) if labels else ""


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
        #: The budget scopes' keys, and the number their outbox goes by (after the groups').
        self.budgets = BudgetKeys.of(ns)
        self.budgets_group = groups
        #: Milliseconds a change's reply is kept under its op key.
        self.op_ttl = math.ceil((timeout + OP_TTL_MARGIN) * 1000)
        #: Seconds a pending spend holds its agent on a cluster while its scopes are charged
        #: (see :mod:`.spend`): as long as the call may take, and a resend of it.
        self.pending_ttl = str(self.op_ttl / 1000)
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
        """``HMGET`` of the :data:`READ_FIELDS` of the agent whose canonical id is ``key``.

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
        return g.slot, ("HMGET", g.agent + key, *READ_FIELDS)

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

    def outbox(self, group: int) -> tuple[int, str]:
        """The slot and key of outbox ``group``: a slot group's, or :attr:`budgets_group`, the
        budget scopes' (which drains as a group's does)."""
        if group == self.budgets_group:
            return self.budgets.slot, self.budgets.outbox
        g = self.group_keys[group]
        return g.slot, g.outbox

    def outbox_oldest(self, group: int) -> Routed:
        """The oldest :data:`~.scripts.OUTBOX_BATCH` entries of an outbox (see :meth:`outbox`)."""
        slot, key = self.outbox(group)
        return slot, ("XRANGE", key, "-", "+", "COUNT", OUTBOX_BATCH)

    def outbox_commands(self) -> list[Routed]:
        """The oldest entries of every outbox, the budget scopes' last (see :meth:`outbox_oldest`)."""
        return [self.outbox_oldest(group) for group in range(self.groups + 1)]

    def outbox_after(self, group: int, entry_id: bytes) -> Routed:
        """The next :data:`~.scripts.OUTBOX_BATCH` entries of an outbox after ``entry_id``."""
        slot, key = self.outbox(group)
        return slot, ("XRANGE", key, b"(" + entry_id, "+", "COUNT", OUTBOX_BATCH)

    def outbox_trim(self, group: int, upto: bytes) -> Routed:
        """Drop an outbox's entries up to ``upto`` (appended to the trail); safe to repeat."""
        slot, key = self.outbox(group)
        ms, _, n = upto.partition(b"-")
        return slot, ("XTRIM", key, "MINID", b"%s-%d" % (ms, int(n) + 1))

    # -- agent states --

    def save(self, state: AgentState, now: float, rolled: bool = False) -> ScriptCall:
        """Insert or replace a state (money as micro-units; ``period_end`` computed here);
        ``rolled``: the caller rolled the agent's period (its alerted level starts again)."""
        a = state.agent_id.as_str()
        g = self.keys_of(state.agent_id)
        limit = state.budget_limit
        period, start = state.budget_period, state.period_start
        end = "" if period is None or start is None else repr(bounds(start, period, state.budget_tz)[1])
        return ScriptCall(
            self._scripts["save"],
            g.slot,
            (g.agent + a, g.stats, g.ids, g.finished, *g.status_keys(), g.outbox),
            (
                a,
                state.status.value,
                str(to_micros(state.budget_spent)),
                str(state.pii_detections),
                "" if limit is None else str(to_micros(limit)),
                repr(now),
                _labels_text(state.labels),
                ",".join(state.budget_scopes),
                _text(period),
                state.budget_tz,
                "" if period is None or start is None else repr(start),
                end,
                g.label,
                _text(thresholds_text(state.budget_thresholds), ABSENT),
                "1" if rolled else "",
            ),
        )

    def update(
        self,
        read: Sequence[Any],
        new: AgentState,
        now: float,
        event: Sequence[str] = (),
        rolled: bool = False,
    ) -> ScriptCall:
        """Store ``new`` if the agent still holds the fields ``read`` (from :meth:`get_command`),
        queueing the outbox entry ``event`` (flat fields) with it (``rolled``: see :meth:`save`).

        The reply is ``[1]`` (then the events queued) when stored, ``[0]`` when the agent changed
        meanwhile, ``[-1]`` when it is gone.
        """
        call = self.save(new, now, rolled)
        expected = [ABSENT if value is None else value for value in read[:10]]
        return call._replace(args=(*call.args, *expected, *event))

    def remove(self, agent_id: AgentId, prefix: str) -> ScriptCall:
        """Remove an agent and its holds (``prefix``: the budgets prefix, '' on a cluster)."""
        a, g = agent_id.as_str(), self.keys_of(agent_id)
        return ScriptCall(
            self._scripts["remove"],
            g.slot,
            (g.agent + a, g.stats, g.ids, g.finished, g.holds + a, g.pending + a, *g.status_keys()),
            (a, g.label, prefix),
        )

    def change(
        self, name: str, g: GroupKeys, keys: tuple[str, ...], args: tuple[str, ...], op: str
    ) -> ScriptCall:
        """A script that changes an agent of group ``g`` once per ``op`` (a random id per call):
        ``keys``, then the group's outbox and the call's op key; ``args``, then the op key's
        time to live."""
        return ScriptCall(self._scripts[name], g.slot, (*keys, g.outbox, g.op + op), (*args, self.op_ttl))

    def record_pii(self, agent_id: AgentId, count: int, now: float, event: AuditEvent, op: str) -> ScriptCall:
        """Add PII detections with their event (decode with ``decode_pii``)."""
        a, g = agent_id.as_str(), self.keys_of(agent_id)
        args = (str(count), repr(now), a, event.event_type, str(event.timestamp), event.details)
        return self.change("record_pii", g, (g.agent + a, g.stats, g.finished), args, op)

    def set_status(self, agent_id: AgentId, status: AgentStatus, now: float, op: str) -> ScriptCall:
        """Change the status (decode with ``decode_status``)."""
        a, g = agent_id.as_str(), self.keys_of(agent_id)
        keys = (g.agent + a, g.stats, g.finished, *g.status_keys())
        return self.change("set_status", g, keys, (status.value, repr(now), a), op)

    def purge(
        self,
        group: int,
        candidates: Sequence[str],
        statuses: Sequence[AgentStatus],
        cutoff: float,
        prefix: str,
    ) -> ScriptCall:
        """Remove those candidates of one group that still qualify (the reply lists them, and on a
        cluster, ``prefix`` '', the holds on scopes left to drop)."""
        g = self.group_keys[group]
        keys = [g.stats, g.ids, g.finished, *g.status_keys()]
        for a in candidates:
            keys += (g.agent + a, g.holds + a, g.pending + a)
        return ScriptCall(
            self._scripts["purge"],
            g.slot,
            keys,
            (repr(cutoff), ",".join(s.value for s in statuses), g.label, prefix, *candidates),
        )

    def meta_check(self) -> ScriptCall:
        """Mark the namespace with this layout, reading back what it holds (see :meth:`check_meta`)."""
        return ScriptCall(self._scripts["meta"], self.meta_slot, (self.meta,), (LAYOUT_VERSION, self.groups))

    def check_meta(self, reply: Sequence[Any]) -> tuple[bool, bool]:
        """Whether the namespace keeps its status sets (else they are built: :meth:`index_status`),
        and whether it is in the layout 0.4 and 0.5 wrote (:data:`LEGACY_LAYOUT`: read as it is,
        changed only after ``migrate``); ``SchemaError`` for any other layout."""
        layout, groups, status_sets = reply
        legacy = layout == str(LEGACY_LAYOUT).encode()
        if (layout != str(LAYOUT_VERSION).encode() and not legacy) or groups != str(self.groups).encode():
            raise SchemaError(
                f"namespace {self.namespace!r} holds data in Redis layout {layout!r} with {groups!r} "
                f"slot groups, but this version of iron-runtime-state uses layout {LAYOUT_VERSION} "
                f"with {self.groups}; use a matching version or another namespace"
            )
        return status_sets is not None, legacy

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
        none), and which of them the caller wants the records of; ``trim`` drops them from the
        outbox in the same script, which only a standalone server can run (on a cluster the
        outbox lives in another slot). The reply is ``[1]`` when appended, or
        ``[0, seq, hash, mark, ...]`` (see ``lua/append_audit.lua``).
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
            args[3], args[4], entry_ids = str(origin.group), b",".join(origin.own), origin.entry_ids
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
            keys.append(self.outbox(origin.group)[1])
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
        label: tuple[str, str] | None = None,
    ) -> None:
        """Walk the ``groups`` (all by default): their agents, those with ``status``, or those with
        the ``label`` (key, value)."""
        self._layout = layout
        self._count = count
        self._status = status
        self._label = None if label is None else f"{label[0]}={label[1]}"
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
            if self._label is not None:
                key = keys.label + self._label
            elif self._status is not None:
                key = keys.status + self._status.value
            else:
                key = keys.ids
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
