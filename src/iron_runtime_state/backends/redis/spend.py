"""Spends and holds on an agent and on the budget scopes it draws on, on a standalone server and
on a Redis Cluster, as I/O-free operations (see :mod:`.ops` for how operations run).

Money is whole micro-units everywhere (``money.py``); every comparison in Lua is of integers.
Every budget scope of a namespace lives in one slot (``{<ns>:budgets}``, :class:`~.keys.BudgetKeys`),
so one script checks and charges all the scopes of an agent at once; an agent's keys live in its
slot group.

Periods. A budget with a period stores the start and the end of the period its spend belongs
to. Lua knows no time zones, so a script that finds ``now >= period_end`` for a budget, and was
not given its new period, changes nothing and replies ``ROLL`` with the budgets concerned; the
client computes their new bounds (``periods.bounds``) and runs the same call again with them
(the same op id: a ``ROLL`` reply is not kept under it). The script applies a new period only
if the stored ``period_start`` is still the one the client saw, so however many processes race
past a boundary, exactly one ``budget_reset`` is written per budget and boundary.

Standalone server: one script per call. ``record_spend.lua``, ``reserve.lua``, ``commit.lua``
and ``release.lua`` read the agent, name its scopes' keys from the budgets prefix (a standalone
server does not enforce slots), roll, check the agent then each scope in order, and charge or
hold everywhere, or refuse, atomically: one round trip, as for an agent without scopes.

Redis Cluster: an agent's slot and the budgets slot may be on different masters, so a call takes
steps, each one script, ordered so that a process killed between any two of them can never let a
budget pass its limit, never holds budget past the hold's ttl, and leaves totals that converge:

- ``record_spend``: (A1) the agent's script checks the agent (first, as the rules want) and puts
  a *pending hold* of the amount on it, scored by a short expiry (the call's ``timeout`` + 2 s),
  whose member carries what the ledger's record needs (time, scopes, note), and replies with the
  agent's scopes; (S) ``scope_spend.lua`` checks and charges every scope at once, queues the
  scopes' ``budget_threshold`` events in the budgets outbox, and keeps its reply under its op key
  in the budgets slot; (A2) ``settle_pending.lua`` turns the pending hold into a charge, with the
  ``spend`` record and the agent's thresholds in the group's outbox (or drops it after a
  refusal). A pending hold counts as
  held until settled. One found expired by a later call is *resolved*: ``resolve_ops.lua`` reads
  the scope step's reply, or, if that step never ran, stores a ``LATE`` reply in its place so
  that it can never run after all; the agent is then charged or not to match. A scope step that
  comes after the pending hold's expiry (by the budgets master's clock) refuses too (``LATE``).
- ``reserve``: (A1) the agent's script holds on the agent (a hold that simply expires if the
  process dies), (S) ``scope_spend.lua`` holds on every scope, scored by the agent hold's expiry;
  a scope that refuses has the agent's hold released (a third step).
- ``commit``: (A1) the agent's script takes its hold and charges the agent, queues the ``spend``
  record (naming the hold's scopes), the agent's ``overspent`` and thresholds, and records the
  amount under ``committed:<reservation id>`` in the agent's slot; (S) ``scope_settle.lua``
  takes the scope holds and charges them, with the scopes' ``overspent`` and thresholds. A scope
  hold that expires before it is settled is
  resolved the same way: ``resolve_holds.lua`` asks the agent's slot whether it was committed
  (charge the scopes), is still open there (keep it), or neither (drop it); until then it counts
  as held. ``release`` is the same without a charge.

The ledger. Each step queues its events in an outbox of its own slot in the same script as its
change (see :mod:`.trail`): the ``spend`` record with the agent's charge, a scope's thresholds
with the scope's. An outbox entry is appended to the trail exactly once, by this call's drain or,
if the process dies first, by the next drain of that outbox (any later change of the group, or
the first write of any store object), so a process killed between two steps never loses nor
duplicates a record: the records of a spend still being settled are in the trail once it is.
On a cluster the trail therefore shows a spend's scope thresholds before its ``spend`` record.

Markers (a scope step's reply, a ``committed`` amount) are deleted once settled, a batch of
:data:`GARBAGE_BATCH` at a time, and otherwise expire after :data:`MARKER_TTL_MS`: a hold left
unresolved longer than that (a process killed between two steps and no call on the budget for
30 days) is resolved as not charged. Round trips per call on a cluster: a spend on an agent with
scopes 3 (1 without), a reserve 2, a commit 2, a release 2; resolving expired holds adds 2 to the
call that finds them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from ...audit_chain import AuditChain
from ...errors import AgentNotFound, BackendError
from ...ids import AgentId
from ...ledger import SpendNote
from ...models import AgentState, AuditRecord, Reservation
from ...money import from_micros, to_micros
from ...periods import bounds
from ..base import CommitResult, SpendResult
from .decode import (
    LATE,
    LEGACY,
    RESOLVE,
    ROLL,
    Queued,
    decode_row,
    decode_state,
    float_micros,
    queued,
    refused_change,
    reservation_error,
)
from .keys import GroupKeys, RedisLayout, Routed
from .requests import Batch, Call, Op, once, op_id
from .scripts import ScriptCall, load_scripts

__all__ = [
    "GARBAGE_BATCH",
    "MARKER_TTL_MS",
    "SpendOps",
    "agent_member",
    "note_text",
    "record_spend_call",
    "scope_member",
]

#: How long a marker of a cluster step is kept when nobody settles it (milliseconds): 30 days.
MARKER_TTL_MS: Final = 30 * 86_400 * 1000
#: Settled markers deleted per round trip (each call adds one or two).
GARBAGE_BATCH: Final = 32
#: Times a call runs again after a ROLL or RESOLVE reply before giving up.
_MAX_ROUNDS: Final = 8

_SCRIPTS: Final = load_scripts()


def _flat(rolls: dict[str, tuple[str, str, str, str]]) -> tuple[str, ...]:
    return tuple(value for roll in rolls.values() for value in roll)


def _asked(reply: Sequence[Any], now: float, rolls: dict[str, tuple[str, str, str, str]]) -> None:
    """The new periods a ``ROLL`` reply asks for (name, period, time zone, period_start each)."""
    for i in range(1, len(reply), 4):
        name, period, tz, start = (value.decode() for value in reply[i : i + 4])
        first, end = bounds(now, period, tz)
        rolls[name] = (name, start, repr(first), repr(end))


def note_text(note: SpendNote | None) -> str:
    """A spend's note as the scripts carry it into the ``spend`` record: the JSON of
    ``note.fields()`` ('' for none; decoded by ``decode.outbox_event``)."""
    if note is None:
        return ""
    fields = note.fields()
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False) if fields else ""


def record_spend_call(
    layout: RedisLayout,
    agent_id: AgentId,
    amount: int,
    now: float,
    op: str,
    prefix: str,
    rolls: Sequence[str] = (),
    g: GroupKeys | None = None,
    note: str = "",
) -> ScriptCall:
    """The agent's ``record_spend.lua`` call (``prefix``: the budgets prefix, '' on a cluster;
    ``g``: the agent's group keys, when the caller has them; ``note``: see :func:`note_text`),
    but for its last argument, the outbox's trim point (``TrailOps._trimming`` adds it)."""
    a = agent_id.as_str()
    if g is None:
        g = layout.keys_of(agent_id)
    keys = (g.agent + a, g.stats, g.holds + a, g.pending + a, g.outbox, g.op + op)
    args = (str(amount), repr(now), a, layout.op_ttl, prefix, layout.pending_ttl, op, note)
    return ScriptCall(_SCRIPTS["record_spend"], g.slot, keys, (*args, *rolls) if rolls else args)


def split_thresholds(events: Queued | None) -> tuple[Queued | None, Queued | None]:
    """A cluster step's queued events: those to append at once, and its ``budget_threshold``
    events (queued last by every script), appended after the other steps' events, so that a
    spend's records keep the contract's order (``spend``, ``overspent``..., thresholds: the
    agent's, then its scopes'). Either may be ``None``; the first also drains what older entries
    wait in the outbox (see ``TrailOps._events``), so nothing is ever passed over."""
    if events is None:
        return None, None
    entries = events.entries
    cut = next((i for i, (_, fields) in enumerate(entries) if fields[1] == b"threshold"), len(entries))
    if cut == len(entries):
        return events, None
    later = entries[cut:]
    return Queued(entries[:cut], events.waiting - len(later)), Queued(later, len(later))


def agent_member(reservation: Reservation) -> str:
    """A hold's member in the agent's holds set: ``<id>:<micro-units>[:<scopes>]``."""
    member = f"{reservation.reservation_id}:{to_micros(reservation.amount)}"
    return f"{member}:{','.join(reservation.scopes)}" if reservation.scopes else member


def scope_member(reservation: Reservation) -> str:
    """A hold's member in a scope's holds set: ``<id>:<micro-units>:<agent id>:<scopes>``."""
    held = to_micros(reservation.amount)
    return (
        f"{reservation.reservation_id}:{held}:{reservation.agent_id.as_str()}:{','.join(reservation.scopes)}"
    )


class SpendOps:
    """The spending operations of :class:`~.ops.RedisOps` (a mixin: it runs them)."""

    layout: RedisLayout
    _cluster: bool
    _garbage: list[Routed]

    if TYPE_CHECKING:
        _swept: bool

        def _change(self, call: ScriptCall, what: str, chain: AuditChain, group: int) -> Op[Any]: ...

        def _trimming(self, call: ScriptCall, group: int) -> tuple[ScriptCall, bytes]: ...

        def _trimmed(self, group: int, landed: bytes) -> None: ...

        def _first_use(self, chain: AuditChain) -> Op[None]: ...

        def _events(self, group: int, queued: Queued | None, chain: AuditChain) -> Op[list[AuditRecord]]: ...

        def _legacy_reserved(self, agent_id: AgentId, now: float) -> Op[tuple[AgentState, int]]: ...

    # -- the shared steps --

    #: What the agent scripts get as the budgets prefix: '' on a cluster (scopes are steps).
    _prefix: str

    def _agent_keys(self, g: GroupKeys, a: str) -> tuple[str, ...]:
        return (g.agent + a, g.stats, g.holds + a, g.pending + a, g.outbox)

    def _rolling(
        self,
        build: Callable[[tuple[str, ...]], ScriptCall],
        now: float,
        what: str,
        chain: AuditChain,
        group: int,
        resolve: Callable[[Sequence[bytes]], Op[None]] | None = None,
        reply: Any = None,
    ) -> Op[Any]:
        """Run the call ``build`` makes (given the rolls), a script that queues in outbox
        ``group``, until it neither asks for new periods (``ROLL``) nor for expired holds to be
        settled first (``RESOLVE``, by ``resolve``). ``reply``: the first run's, when the caller
        made it."""
        rolls: dict[str, tuple[str, str, str, str]] = {}
        for _ in range(_MAX_ROUNDS):
            if reply is None:
                reply = yield from self._change(build(_flat(rolls)), what, chain, group)
            code = reply[0] if isinstance(reply, list) else reply
            if code == ROLL:
                _asked(reply, now, rolls)
            elif code == RESOLVE and resolve is not None:
                yield from resolve(reply[1:])
            else:
                return reply
            reply = None
        raise BackendError(f"{what} kept meeting new periods or expired holds to settle; retry")

    def _discard(self, slot: int, key: str) -> Op[None]:
        """Delete a settled marker, in a batch with others once :data:`GARBAGE_BATCH` wait."""
        self._garbage.append((slot, ("DEL", key)))
        if len(self._garbage) >= GARBAGE_BATCH:
            batch, self._garbage = self._garbage, []
            yield Batch(batch, "delete settled markers")

    def _scope_call(self, name: str, op: str, args: Sequence[str | int | bytes]) -> ScriptCall:
        b = self.layout.budgets
        return ScriptCall(_SCRIPTS[name], b.slot, (b.outbox, b.op + op), args)

    # -- record_spend --

    def record_spend(
        self, agent_id: AgentId, amount: int, now: float, chain: AuditChain, note: SpendNote | None = None
    ) -> Op[SpendResult]:
        """See ``Backend.record_spend``."""
        if not self._swept:
            yield from self._first_use(chain)
        lay, a = self.layout, agent_id.as_str()
        group = lay.group_of(a)
        g = lay.group_keys[group]
        op, text = op_id(), note_text(note)
        call = record_spend_call(lay, agent_id, amount, now, op, self._prefix, (), g, text)
        call, landed = self._trimming(call, group)
        reply = yield Call(call.slot, call.command(), True, "record spend", changes=True)
        self._trimmed(group, landed)
        code = reply[0]
        if code in (ROLL, RESOLVE):

            def build(rolls: tuple[str, ...]) -> ScriptCall:
                return record_spend_call(lay, agent_id, amount, now, op, self._prefix, rolls, g, text)

            def resolve(expired: Sequence[bytes]) -> Op[None]:
                yield from self._resolve_pending(g, a, expired, now, chain)

            reply = yield from self._rolling(build, now, "record spend", chain, group, resolve, reply)
            code = reply[0]
        if code not in (0, 1, 2):
            raise refused_change(reply, agent_id, lay.namespace, "record spend")
        state = decode_state(agent_id, reply, 1)
        assert state is not None
        held = int(reply[11])
        if code == 1:
            return SpendResult(
                state, reserved=held, records=(yield from self._events(group, queued(reply, 12), chain))
            )
        if code == 0:
            budget = None if reply[12] is None else decode_row(reply[12])
            records = yield from self._events(group, queued(reply, 13), chain)
            return SpendResult(state, True, held, records, budget)
        records = yield from self._events(group, queued(reply, 14), chain)
        pending = (reply[12], reply[13])
        return (
            yield from self._spend_scopes(agent_id, state, amount, now, op, pending, held, records, chain)
        )

    def _spend_scopes(
        self,
        agent_id: AgentId,
        state: AgentState,
        amount: int,
        now: float,
        op: str,
        pending: tuple[bytes, bytes],
        held: int,
        records: list[AuditRecord],
        chain: AuditChain,
    ) -> Op[SpendResult]:
        """The scopes' step and the agent's settling step of a spend on a cluster (``pending``:
        the pending hold's expiry, the fence of the scopes' step, and its member)."""
        lay, a = self.layout, agent_id.as_str()
        g = lay.keys_of(agent_id)
        fence, member = pending
        head = ("spend", str(amount), repr(now), a, MARKER_TTL_MS, lay.budgets.prefix, fence.decode(), "", "")
        scopes = ",".join(state.budget_scopes)

        def build(rolls: tuple[str, ...]) -> ScriptCall:
            return self._scope_call("scope_spend", op, (*head, scopes, *rolls))

        def resolve(expired: Sequence[bytes]) -> Op[None]:
            yield from self._resolve_scope_holds(expired, now, chain)

        reply = yield from self._rolling(
            build, now, "charge budget scopes", chain, lay.budgets_group, resolve
        )
        code = reply[0]
        scoped, scope_alerts = split_thresholds(queued(reply, 2 - code) if code in (0, 1) else None)
        records += yield from self._events(lay.budgets_group, scoped, chain)
        settled, charged = yield from self._settle_pending(g, a, [(member, code == 1)], now)
        charged, agent_alerts = split_thresholds(charged)
        group = lay.group_of(a)
        records += yield from self._events(group, charged, chain)
        records += yield from self._events(group, agent_alerts, chain)
        records += yield from self._events(lay.budgets_group, scope_alerts, chain)
        yield from self._discard(lay.budgets.slot, lay.budgets.op + op)
        if code == LATE:
            raise BackendError(
                f"record_spend of agent {agent_id} took longer than its pending hold "
                f"({lay.op_ttl / 1000:g} s) between its steps; nothing was charged; retry"
            )
        if code not in (0, 1):
            raise refused_change(reply, agent_id, lay.namespace, "record spend")
        if code == 1:
            return SpendResult(settled, reserved=held, records=records)
        return SpendResult(settled, True, held, records, decode_row(reply[1]))

    def _settle_pending(
        self, g: GroupKeys, a: str, holds: Sequence[tuple[bytes, bool]], now: float
    ) -> Op[tuple[AgentState, Queued | None]]:
        """Charge the agent the pending holds whose scopes were charged (with their ``spend``
        records and the agent's thresholds), drop the others; the state and the events queued."""
        pairs = [value for member, charged in holds for value in (member, "1" if charged else "0")]
        keys = (g.agent + a, g.stats, g.pending + a, g.outbox)
        group = self.layout.group_of(a)
        call = ScriptCall(_SCRIPTS["settle_pending"], g.slot, keys, (repr(now), a, *pairs))
        call, landed = self._trimming(call, group)
        reply = yield once(call, "settle a pending spend")
        self._trimmed(group, landed)
        state = decode_state(AgentId._trusted(a), reply, 1) if reply[0] == 1 else None
        if state is None:
            raise AgentNotFound(a)
        return state, queued(reply, 11)

    def _resolve_pending(
        self, g: GroupKeys, a: str, expired: Sequence[bytes], now: float, chain: AuditChain
    ) -> Op[None]:
        """Settle an agent's expired pending holds: ask the budgets slot whether each spend's
        scopes were charged (a step that never ran is fenced off there), then settle them."""
        b = self.layout.budgets
        ops = [member.split(b":", 1)[0].decode() for member in expired]
        call = ScriptCall(_SCRIPTS["resolve_ops"], b.slot, [b.op + o for o in ops], (MARKER_TTL_MS,))
        verdicts = yield once(call, "resolve pending spends")
        with contextlib.suppress(AgentNotFound):  # removed meanwhile: its holds went with it
            _, charged = yield from self._settle_pending(
                g, a, [(m, v == 1) for m, v in zip(expired, verdicts, strict=True)], now
            )
            yield from self._events(self.layout.group_of(a), charged, chain)
        for o in ops:
            yield from self._discard(b.slot, b.op + o)

    def _resolve_scope_holds(self, expired: Sequence[bytes], now: float, chain: AuditChain) -> Op[None]:
        """Settle expired holds on scopes: ask each agent's slot what became of its reservation
        (committed, still open, or neither), then charge, keep or drop the holds to match."""
        lay = self.layout
        calls: dict[int, tuple[list[str], list[str], list[bytes]]] = {}
        for member in expired:
            rid, amount, agent, scopes = member.decode().split(":", 3)
            g = lay.group_keys[lay.group_of(agent)]
            keys, args, members = calls.setdefault(g.slot, ([], [], []))
            keys += (g.holds + agent, g.committed + rid)
            args.append(f"{rid}:{amount}:{scopes}" if scopes else f"{rid}:{amount}")
            members.append(member)
        script = _SCRIPTS["resolve_holds"]
        requests = [ScriptCall(script, slot, keys, args) for slot, (keys, args, _) in calls.items()]
        replies = yield Batch([(c.slot, c.command()) for c in requests], "resolve expired holds")
        entries: list[str | bytes] = []
        committed: list[Routed] = []
        for (_, _, members), verdicts in zip(calls.values(), replies, strict=True):
            for member, verdict in zip(members, verdicts, strict=True):
                entries += (member, b"" if verdict is None else verdict)
                if verdict is not None and not verdict.startswith(b"open:"):
                    rid, _, agent, _ = member.decode().split(":", 3)
                    g = lay.group_keys[lay.group_of(agent)]
                    committed.append((g.slot, ("DEL", g.committed + rid)))
        yield from self._settle_scopes(entries, now, chain, "settle expired holds")
        for slot, command in committed:
            yield from self._discard(slot, command[1])

    def _settle_scopes(
        self, entries: Sequence[str | bytes], now: float, chain: AuditChain | None, what: str
    ) -> Op[tuple[bool, list[AuditRecord]]]:
        """Charge, keep or drop holds on scopes (``scope_settle.lua``); whether a charge took a
        scope past its limit, and the records of the events it queued."""
        over, events = yield from self._settle_scopes_step(entries, now, chain, what)
        if chain is None:
            return over, []
        return over, (yield from self._events(self.layout.budgets_group, events, chain))

    def _settle_scopes_step(
        self, entries: Sequence[str | bytes], now: float, chain: AuditChain | None, what: str
    ) -> Op[tuple[bool, Queued | None]]:
        """:meth:`_settle_scopes` but for appending the events it queued."""
        op = op_id()
        head = (repr(now), self.layout.op_ttl, self.layout.budgets.prefix, len(entries) // 2, *entries)

        def build(rolls: tuple[str, ...]) -> ScriptCall:
            return self._scope_call("scope_settle", op, (*head, *rolls))

        group = self.layout.budgets_group
        if chain is None:  # a release charges nothing: no period to roll, no event
            call, landed = self._trimming(build(()), group)
            reply = yield once(call, what)
            self._trimmed(group, landed)
            return False, None
        reply = yield from self._rolling(build, now, what, chain, group)
        return reply[1] == 1, queued(reply, 2)

    # -- reservations --

    def reserve(
        self, agent_id: AgentId, amount: int, ttl: float, now: float, reservation_id: str, chain: AuditChain
    ) -> Op[Reservation | SpendResult]:
        """See ``Backend.reserve``.

        Holds expire by the Redis server's clock (one clock for every client host); the client's
        ``now`` dates events and decides periods.
        """
        lay, a = self.layout, agent_id.as_str()
        group = lay.group_of(a)
        g = lay.group_keys[group]
        op = op_id()
        keys = (*self._agent_keys(g, a), g.op + op)
        head = (str(amount), repr(ttl), reservation_id, repr(now), a, lay.op_ttl, self._prefix)

        def build(rolls: tuple[str, ...]) -> ScriptCall:
            return ScriptCall(_SCRIPTS["reserve"], g.slot, keys, (*head, *rolls))

        def resolve(expired: Sequence[bytes]) -> Op[None]:
            yield from self._resolve_pending(g, a, expired, now, chain)

        reply = yield from self._rolling(build, now, "reserve budget", chain, group, resolve)
        code = reply[0]
        if code == 1:
            scopes = () if reply[2] is None else tuple(reply[2].decode().split(","))
            yield from self._events(group, queued(reply, 3), chain)
            return Reservation._trusted(
                reservation_id, agent_id, from_micros(amount), float(reply[1]), scopes
            )
        if code == 0:
            state = decode_state(agent_id, reply, 1)
            assert state is not None
            budget = None if reply[12] is None else decode_row(reply[12])
            records = yield from self._events(group, queued(reply, 13), chain)
            return SpendResult(state, True, int(reply[11]), records, budget)
        if code != 2:
            raise refused_change(reply, agent_id, lay.namespace, "reserve budget")
        yield from self._events(group, queued(reply, 13), chain)
        state = decode_state(agent_id, reply, 2)
        assert state is not None
        held = Reservation._trusted(
            reservation_id, agent_id, from_micros(amount), float(reply[1]), state.budget_scopes
        )
        return (yield from self._hold_scopes(held, state, int(reply[12]), now, chain))

    def _hold_scopes(
        self, reservation: Reservation, state: AgentState, held: int, now: float, chain: AuditChain
    ) -> Op[Reservation | SpendResult]:
        """The scopes' step of a hold on a cluster; a refusal releases the agent's hold."""
        lay = self.layout
        a, op = reservation.agent_id.as_str(), op_id()
        head = (
            "reserve",
            str(to_micros(reservation.amount)),
            repr(now),
            a,
            lay.op_ttl,
            lay.budgets.prefix,
            "",
            scope_member(reservation),
            repr(reservation.expires_at),
            ",".join(reservation.scopes),
        )

        def build(rolls: tuple[str, ...]) -> ScriptCall:
            return self._scope_call("scope_spend", op, (*head, *rolls))

        def resolve(expired: Sequence[bytes]) -> Op[None]:
            yield from self._resolve_scope_holds(expired, now, chain)

        reply = yield from self._rolling(
            build, now, "hold on budget scopes", chain, lay.budgets_group, resolve
        )
        code = reply[0]
        if code == 1:
            yield from self._events(lay.budgets_group, queued(reply, 1), chain)
            return reservation
        yield from self._release_agent(reservation)
        if code != 0:
            raise refused_change(reply, reservation.agent_id, lay.namespace, "reserve budget")
        records = yield from self._events(lay.budgets_group, queued(reply, 2), chain)
        return SpendResult(state, True, held, records, decode_row(reply[1]))

    def _release_agent(self, reservation: Reservation) -> Op[bool]:
        """Drop a hold from the agent (and, on a standalone server, from its scopes)."""
        lay = self.layout
        a, op = reservation.agent_id.as_str(), op_id()
        g = lay.keys_of(reservation.agent_id)
        args = (
            agent_member(reservation),
            lay.op_ttl,
            self._prefix,
            scope_member(reservation),
            ",".join(reservation.scopes),
        )
        call = ScriptCall(_SCRIPTS["release"], g.slot, (g.holds + a, g.op + op), args)
        return bool((yield once(call, "release a reservation")) == 1)

    def commit(
        self,
        reservation: Reservation,
        actual: int,
        now: float,
        chain: AuditChain,
        note: SpendNote | None = None,
    ) -> Op[CommitResult]:
        """See ``Backend.commit``."""
        lay = self.layout
        agent_id, rid = reservation.agent_id, reservation.reservation_id
        a, op = agent_id.as_str(), op_id()
        group = lay.group_of(a)
        g = lay.group_keys[group]
        keys = (g.agent + a, g.stats, g.holds + a, g.finished, g.outbox, g.op + op, g.committed + rid)
        scopes = ",".join(reservation.scopes)
        head = (
            agent_member(reservation),
            str(actual),
            repr(now),
            a,
            rid,
            str(to_micros(reservation.amount)),
            lay.op_ttl,
            self._prefix,
            MARKER_TTL_MS,
            scopes,
            note_text(note),
        )

        def build(rolls: tuple[str, ...]) -> ScriptCall:
            return ScriptCall(_SCRIPTS["commit"], g.slot, keys, (*head, *rolls))

        reply = yield from self._rolling(build, now, "commit a reservation", chain, group)
        code = reply[0]
        if code == -3:  # not open; the agent's lapsed holds went all the same, with their events
            yield from self._events(group, queued(reply, 1), chain)
            raise reservation_error(reservation, "commit")
        if code not in (0, 1):
            raise refused_change(reply, agent_id, lay.namespace, "commit a reservation")
        state = decode_state(agent_id, reply, 1)
        assert state is not None
        charged = queued(reply, 11)
        if not (self._cluster and reservation.scopes):
            return CommitResult(state, code == 1, (yield from self._events(group, charged, chain)))
        charged, agent_alerts = split_thresholds(charged)
        records = yield from self._events(group, charged, chain)
        over, scoped = yield from self._settle_scopes_step(
            (scope_member(reservation), str(actual)), now, chain, "commit on budget scopes"
        )
        scoped, scope_alerts = split_thresholds(scoped)
        records += yield from self._events(lay.budgets_group, scoped, chain)
        records += yield from self._events(group, agent_alerts, chain)
        records += yield from self._events(lay.budgets_group, scope_alerts, chain)
        yield from self._discard(g.slot, g.committed + rid)
        return CommitResult(state, code == 1 or over, records)

    def release(self, reservation: Reservation, now: float) -> Op[None]:
        """See ``Backend.release`` (a hold's expiry is the server's business: ``now`` is unused)."""
        if not (yield from self._release_agent(reservation)):
            raise reservation_error(reservation, "release")
        if self._cluster and reservation.scopes:
            yield from self._settle_scopes(
                (scope_member(reservation), ""), now, None, "release on budget scopes"
            )

    def reserved(self, agent_id: AgentId, now: float) -> Op[tuple[AgentState, int]]:
        """See ``Backend.reserved`` (holds expire by the server's clock)."""
        a, g = agent_id.as_str(), self.layout.keys_of(agent_id)
        call = ScriptCall(_SCRIPTS["reserved"], g.slot, (g.agent + a, g.holds + a, g.pending + a), ())
        reply = yield Call(call.slot, call.command(), True, "read holds")
        if reply[0] == LEGACY:
            return (yield from self._legacy_reserved(agent_id, now))
        state = decode_state(agent_id, reply, 1) if reply[0] == 1 else None
        if state is None:
            raise AgentNotFound(a)
        return state, int(reply[11])


def legacy_held(members: Sequence[bytes]) -> int:
    """The sum of holds 0.4/0.5 stored (``<id>:<float>``), in micro-units."""
    return sum(float_micros(member.rpartition(b":")[2]) for member in members)
