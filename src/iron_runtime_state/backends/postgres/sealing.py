"""The ledger's ``spend`` record of a fast-path charge on PostgreSQL: who seals it, and where.

Every settled spend appends a ``spend`` record to the one hash chain, in the statement (or the
transaction) that charges it. The fast paths (``spend``, ``commit_hold``: see :mod:`.schema`)
take the record along and write it with the charge, in one of two ways:

- **An unkeyed chain** (plain SHA-256, no audit key): the function seals the record itself,
  after the head it reads under the head's lock (``seal_spend``, taken last and held to the
  commit), with PostgreSQL's ``sha256()`` over the very bytes :meth:`AuditChain.seal` hashes.
  No prediction of the head is needed, so concurrent writers queue on the head's lock for the
  end of their statement and never seal again: one round trip per spend, however many writers.
- **A keyed chain** (HMAC): the key never leaves the client, so the record is sealed here in
  advance, after the audit head this store object last saw or wrote; the function checks under
  its locks that the head has not moved, before it changes anything. When another writer moved
  it, the function returns the head it found and the record is sealed again after it (up to
  :data:`_TRIES` times), then the function runs in a transaction that locks the head after the
  charge and returns it, and the record follows in that transaction (:meth:`SealOps._locked`).

Either way the record names the labels and scopes the agent had at its last charge on the
general path (:attr:`SealOps.known`); the function checks that prediction under its locks too,
and when it missed (or anything else needs the general path) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from psycopg import errors as pgerrors

from ...audit_chain import AuditChain
from ...ledger import SpendNote
from ...models import AuditEvent, AuditRecord
from . import ledger
from .agents import AgentOps
from .requests import BEGIN, Op, Sql
from .schema import render

__all__ = ["ROLLBACK", "SealOps"]

# The fast paths' parameters for the spend record: see _RECORD_PARAMS in schema.py.
_RECORD: Final = ", ".join(["%s"] * 14)

_STATEMENTS: Final = {
    "spend": f"SELECT * FROM {{s}}.spend(%s, %s, %s, {_RECORD})",
    "commit": f"SELECT * FROM {{s}}.commit_hold(%s, %s, %s, %s, {_RECORD})",
    "ledger": ledger.INSERT,
    "log_spend": f"SELECT {{s}}.log_spend({', '.join(['%s'] * 16)})",
}

#: The labels and scopes predicted for an agent the store object knows nothing of.
_PLAIN: Final[tuple[Mapping[str, str], tuple[str, ...]]] = ({}, ())
#: How many agents' labels and scopes a store object remembers (then it starts again).
_KNOWN: Final = 10_000
ROLLBACK: Final = Sql("ROLLBACK")
#: How many times a keyed fast path seals its record again after a head that moved, before it
#: runs in a transaction that locks the head (:meth:`SealOps._locked`).
_TRIES: Final = 3
#: A spend function's last columns: the head (and, sealed by the server, the hash before it).
_HEAD: Final = 3


class SealOps(AgentOps):
    """The fast paths' spend records, sealed by the server (unkeyed) or by the client (keyed)."""

    def __init__(self, quoted_schema: str) -> None:
        super().__init__(quoted_schema)
        self.sql.update({name: render(text, quoted_schema) for name, text in _STATEMENTS.items()})
        #: The labels and scopes of agents that have some, as their last charge on the general
        #: path found them: what the fast path predicts an agent's spend record names. Only a
        #: prediction (the function checks it), so a stale entry costs one general path.
        self.known: dict[str, tuple[Mapping[str, str], tuple[str, ...]]] = {}

    def _learn(self, key: str, labels: Mapping[str, str], scopes: tuple[str, ...]) -> None:
        if labels or scopes:
            if len(self.known) >= _KNOWN:
                self.known.clear()
            self.known[key] = (labels, scopes)
        else:
            self.known.pop(key, None)

    def _predicted(self, key: str) -> Mapping[str, str]:
        """The labels an agent's spend record is predicted to name."""
        return self.known.get(key, _PLAIN)[0]

    def _served(
        self,
        statement: str,
        head: tuple[Any, ...],
        event: AuditEvent,
        labels: Mapping[str, str],
        scopes: Sequence[str],
        note: SpendNote | None,
    ) -> Op[tuple[Sequence[Any], AuditRecord] | None]:
        """A fast path's function on an unkeyed chain: the record (``event``) is sealed by the
        server after the head it locks; the agent's state row and the record, or ``None`` when
        the general path must run (nothing changed)."""
        seen = self.watch.highest or (None, None)
        # p_hash NULL: seal it there; p_after, p_prev: the highest head seen (rewind detection).
        record = (*seen, None, None, event.timestamp, event.details)
        params = (*head, ledger.labels_json(labels), list(scopes), *record, self.channel)
        try:
            found = (yield Sql(statement, (*params, *ledger.note_columns(note))))[0]
        except pgerrors.SerializationFailure:
            # The head went back (a restore, a failover): nothing changed, and the general path
            # appends the audit_rewound record first.
            return None
        if found[0] is None:  # a refusal, a period that ended, a threshold, changed labels
            return None
        seq, digest, prev = found[-_HEAD:]
        self.watch.wrote((seq, digest))
        return found[:-_HEAD], AuditRecord(seq, event, digest, prev)

    # -- sealed by the client (keyed chains) -----------------------------------------------------

    def _fast(
        self,
        statement: str,
        head: tuple[Any, ...],
        amount: int,
        record: Callable[[Mapping[str, str], Sequence[str]], AuditEvent],
        labels: Mapping[str, str],
        scopes: Sequence[str] | None,
        note: SpendNote | None,
        chain: AuditChain,
    ) -> Op[tuple[Sequence[Any], AuditRecord] | None]:
        """Run a fast path's function (``head``: its first parameters) with the spend record
        (``record(labels, scopes)``): sealed by the server on an unkeyed chain (:meth:`_served`),
        else here, after the head this store object knows; the agent's state row and the
        record, or ``None`` when the general path must run (nothing changed).

        ``labels`` and ``scopes`` are the predicted ones (``scopes`` ``None``: the agent's, as
        known). When only the head missed (another writer appended since), the function runs
        again in a transaction of ours: it locks the head after its charge and returns it, and
        the record is appended after it (:meth:`_locked`).
        """
        key = head[0]
        predicted = self.known.get(key, _PLAIN)[1] if scopes is None else scopes
        if not chain.keyed:  # sealed by the server, under the head's lock
            return (
                yield from self._served(statement, head, record(labels, predicted), labels, predicted, note)
            )
        for _ in range(_TRIES):
            hint = self.watch.highest
            if hint is None:  # nothing known of the head yet: the general path reads it
                return None
            rows, records = chain.seal_rows([record(labels, predicted)], *hint)
            seq, _, _, ts, details, prev, digest = rows[0]
            sealed = (hint[0], prev, digest, chain.seal_mark("head", seq, digest), ts, details)
            params = (*head, ledger.labels_json(labels), list(predicted), *sealed, self.channel)
            try:
                found = (yield Sql(statement, (*params, *ledger.note_columns(note))))[0]
            except pgerrors.SerializationFailure:  # the head moved under the statement: rolled back
                continue
            if found[0] is not None:
                self.watch.wrote((seq, digest))
                return found[:-_HEAD], records[0]
            if found[-_HEAD] is None:
                # Not the head: a refusal, a period that ended, a threshold reached, labels or
                # scopes that changed: the general path.
                return None
            self.watch.saw((found[-_HEAD], found[1 - _HEAD]))  # and seal after the head found
            if self.watch.highest == hint:  # a head behind ours: the general path reports it
                return None
        return (yield from self._locked(statement, head, amount, record, labels, scopes, note, chain))

    def _locked(
        self,
        statement: str,
        head: tuple[Any, ...],
        amount: int,
        record: Callable[[Mapping[str, str], Sequence[str]], AuditEvent],
        labels: Mapping[str, str],
        scopes: Sequence[str] | None,
        note: SpendNote | None,
        chain: AuditChain,
    ) -> Op[tuple[Sequence[Any], AuditRecord] | None]:
        """The fast path's function in a transaction, without a record: it charges, then locks
        the head (last, as every writer does) and returns it with the agent's labels and scopes;
        the record goes after that head, with its ledger row, and the transaction commits."""
        yield BEGIN
        params = (*head, ledger.labels_json(labels), list(scopes or ()), *(None,) * 6, self.channel)
        found = (yield Sql(statement, (*params, *ledger.note_columns(note))))[0]
        if found[0] is None:
            yield ROLLBACK
            return None
        key, actual = head[0], found[4] or {}
        named = tuple(found[5] or ()) if scopes is None else scopes
        self._learn(key, actual, tuple(found[5] or ()))
        event = record(actual, named)
        locked: tuple[int, str] = (found[-_HEAD], found[1 - _HEAD])
        highest = self.watch.highest
        if highest is not None and locked[0] <= highest[0] and locked != highest:
            # The head went back (a restore, a failover): the append reports it first.
            records = yield from self._logged(key, [], event, amount, named, actual, note, chain)
            return found[:-_HEAD], records[0]
        # One statement for the record, its ledger row and the head, as the fast path's own.
        rows, sealed = chain.seal_rows([event], *locked)
        seq, _, _, ts, details, prev, digest = rows[0]
        mark = chain.seal_mark("head", seq, digest)
        log = (locked[0], prev, digest, mark, self.channel, key, ts, details, amount, list(named))
        yield Sql(self.sql["log_spend"], (*log, ledger.labels_json(actual), *ledger.note_columns(note)))
        yield from self._commit(sealed, (seq, digest))
        return found[:-_HEAD], sealed[0]

    def _logged(
        self,
        key: str,
        before: list[AuditEvent],
        event: AuditEvent,
        amount: int,
        scopes: Sequence[str],
        labels: Mapping[str, str],
        note: SpendNote | None,
        chain: AuditChain,
        after: Sequence[AuditEvent] = (),
    ) -> Op[list[AuditRecord]]:
        """Append ``before``, the ``spend`` record ``event`` and ``after`` in the open transaction,
        insert the record's ledger row, and commit; the records."""
        records, head = yield from self._append([*before, event, *after], chain, event.timestamp)
        written = records[len(before)]
        model, input_tokens, output_tokens, cached, tags = ledger.note_columns(note)
        row = (written.seq, written.timestamp, key, amount, model, input_tokens, output_tokens, cached)
        yield Sql(
            self.sql["ledger"], (*row, list(scopes), ledger.labels_json(labels) if labels else None, tags)
        )
        return (yield from self._commit(records, head))
