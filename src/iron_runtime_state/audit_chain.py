"""The audit trail's hash chain: canonical encoding, hashing and verification.

Every record's ``hash`` is ``SHA-256`` (or ``HMAC-SHA-256`` with the manager's key) of the
UTF-8 bytes of::

    prev_hash + "\\n" + str(seq) + "\\n" + canonical_json(event)

where ``canonical_json`` is the event as a JSON object with exactly the keys ``agent_id``,
``details``, ``event_type`` and ``timestamp``, in that (sorted) order, no whitespace, and
non-ASCII characters written as UTF-8 (Python: ``json.dumps(obj, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)``). The first record's ``prev_hash`` is
:data:`GENESIS_HASH` (64 zeros); after a prune, the hash of the last removed record is kept as
the anchor that the first remaining record links to. Hashes are lowercase hex.

This module does no I/O: every backend, sync or async, seals and verifies with it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring  # the C escaper json.dumps itself uses
from typing import Final

from .models import AuditEvent, AuditRecord, AuditVerification

__all__ = ["GENESIS_HASH", "AuditChain", "AuditRow", "ChainVerifier", "canonical_event_json"]

GENESIS_HASH: Final = "0" * 64

#: A stored record as plain values: seq, agent_id, event_type, timestamp, details, prev_hash, hash.
AuditRow = tuple[int, str, str, int, str, str, str]

_sha256 = hashlib.sha256
_hmac_digest = hmac.digest


def canonical_event_json(agent_id: str, event_type: str, timestamp: int, details: str) -> str:
    """The canonical JSON text of an event (see the module docstring)."""
    # agent_id and event_type are validated to need no escaping; details may need it.
    return (
        f'{{"agent_id":"{agent_id}","details":{encode_basestring(details)},'
        f'"event_type":"{event_type}","timestamp":{timestamp}}}'
    )


class AuditChain:
    """Seals records into the chain and verifies a chain; keyed (HMAC) when given a key.

    Without a key anyone who can write to the store can recompute a valid chain after editing
    it; with a key kept outside the store they cannot.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key

    @property
    def keyed(self) -> bool:
        """Whether hashes are HMAC-SHA-256 (``True``) or plain SHA-256."""
        return self._key is not None

    def seal(
        self, prev_hash: str, seq: int, agent_id: str, event_type: str, timestamp: int, details: str
    ) -> str:
        """The hash of one record."""
        message = (
            f"{prev_hash}\n{seq}\n"
            f'{{"agent_id":"{agent_id}","details":{encode_basestring(details)},'
            f'"event_type":"{event_type}","timestamp":{timestamp}}}'
        ).encode("utf-8", "surrogatepass")
        if self._key is None:
            return _sha256(message).hexdigest()
        return _hmac_digest(self._key, message, "sha256").hex()

    def seal_rows(
        self, events: Sequence[AuditEvent], seq: int, prev: str
    ) -> tuple[list[AuditRow], list[AuditRecord]]:
        """The rows and records of ``events`` chained after the record ``(seq, prev)``: what a
        store that keeps records as rows (SQLite, PostgreSQL) inserts, and what it returns."""
        rows: list[AuditRow] = []
        records: list[AuditRecord] = []
        for event in events:
            seq += 1
            agent, kind, at, details = event.agent_id._value, event.event_type, event.timestamp, event.details
            digest = self.seal(prev, seq, agent, kind, at, details)
            rows.append((seq, agent, kind, at, details, prev, digest))
            records.append(AuditRecord(seq, event, digest, prev))
            prev = digest
        return rows, records

    def seal_mark(self, kind: str, seq: int, digest: str) -> str | None:
        """The keyed seal of a mark of the trail (``"head"``, ``"anchor"``, ``"checkpoint"``).

        A store keeps it beside the mark, so that someone who can write to the store but does
        not hold the key cannot move the head or the anchor unseen. ``None`` without a key.
        """
        if self._key is None:
            return None
        return _hmac_digest(self._key, f"{kind}\n{seq}\n{digest}".encode(), "sha256").hex()

    def verifier(self, anchor: tuple[int, str] = (0, GENESIS_HASH)) -> ChainVerifier:
        """A verifier of the chain that starts at ``anchor``, fed rows as they are read."""
        return ChainVerifier(self, anchor)

    def verify(
        self,
        rows: Iterable[AuditRow],
        *,
        anchor_seq: int = 0,
        anchor_hash: str = GENESIS_HASH,
        head: tuple[int, str] | None = None,
    ) -> AuditVerification:
        """Check rows in ``seq`` order against the chain that starts at the anchor.

        ``head`` is the store's own record of its last ``(seq, hash)``, when it keeps one: a
        trail that ends anywhere else fails.
        """
        verifier = self.verifier((anchor_seq, anchor_hash))
        verifier.feed(rows)
        if head is not None:
            verifier.check_head(head)
        return verifier.report()


class ChainVerifier:
    """Checks a trail's rows as they arrive, from its anchor on; :meth:`report` says what it found.

    Every row must come right after the one before it (``seq`` one more, ``prev_hash`` its
    hash) and its hash must match its content; the first row links to the anchor. The first
    problem is kept and later rows are ignored.
    """

    __slots__ = ("_chain", "anchor", "checked", "failure", "last", "witness")

    def __init__(self, chain: AuditChain, anchor: tuple[int, str]) -> None:
        self._chain = chain
        self.anchor = anchor
        #: ``(seq, hash)`` a record must have if the trail still holds it (a checkpoint).
        self.witness: tuple[int, str] | None = None
        #: ``(seq, hash)`` of the last row that verified (the anchor before any).
        self.last = anchor
        self.checked = 0
        #: ``(seq, reason)`` of the first problem found.
        self.failure: tuple[int, str] | None = None

    @property
    def ok(self) -> bool:
        """Whether nothing wrong was found so far."""
        return self.failure is None

    def fail(self, seq: int, reason: str) -> None:
        """Record a problem found outside the rows (a mark, a seal, a count); the first one wins."""
        if self.failure is None:
            self.failure = (seq, reason)

    def feed(self, rows: Iterable[AuditRow]) -> int:
        """Check more rows (in ``seq`` order, after the last one fed); returns how many were read."""
        read = 0
        if self.failure is not None:
            return read
        last_seq, expected_prev = self.last
        anchor_seq = self.anchor[0]
        seal = self._chain.seal
        for seq, agent_id, event_type, timestamp, details, prev_hash, digest in rows:
            read += 1
            if seq <= anchor_seq:
                self.fail(
                    seq,
                    f"record seq {seq} lies at or before the anchor (seq {anchor_seq}): the "
                    "anchor was moved forward over records that still exist",
                )
                break
            if seq != last_seq + 1:
                if seq <= last_seq:
                    reason = f"seq {seq} is not after seq {last_seq}: records were reordered"
                else:
                    reason = f"records {last_seq + 1} to {seq - 1} are missing: they were removed"
                self.fail(seq, reason)
                break
            if prev_hash != expected_prev:
                self.fail(
                    seq,
                    "prev_hash does not match the hash of the record before it: a record was "
                    "removed, inserted or moved before this one",
                )
                break
            if seal(prev_hash, seq, agent_id, event_type, timestamp, details) != digest:
                self.fail(seq, "hash does not match the record's content: the record was edited")
                break
            if self.witness is not None and seq == self.witness[0] and digest != self.witness[1]:
                self.fail(
                    seq,
                    "the record at the checkpoint's seq is not the one the checkpoint saw: "
                    "the trail was rewritten",
                )
                break
            expected_prev = digest
            last_seq = seq
            self.checked += 1
        self.last = (last_seq, expected_prev)
        return read

    def check_head(self, head: tuple[int, str]) -> None:
        """The store's head must be the last row checked (or the anchor when none remain)."""
        if self.failure is not None or head == self.last:
            return
        head_seq, last_seq = head[0], self.last[0]
        if head_seq > last_seq:
            self.fail(
                last_seq + 1,
                f"the trail ends at seq {last_seq} but the store's head is seq {head_seq}: "
                "the newest records were removed or replaced",
            )
        elif head_seq < last_seq:
            self.fail(
                head_seq + 1,
                f"records run to seq {last_seq} but the store's head is seq {head_seq}: the head "
                "was moved back, or records were placed after it",
            )
        else:
            self.fail(head_seq, "the store's head hash is not the last record's hash: the head was rewritten")

    def report(self) -> AuditVerification:
        """What was found: ``ok``, or the first bad ``seq`` and why."""
        anchor_seq, anchor_hash = self.anchor
        last_seq = self.last[0] if self.checked else None
        if self.failure is None:
            return AuditVerification(
                ok=True,
                checked=self.checked,
                anchor_seq=anchor_seq,
                anchor_hash=anchor_hash,
                last_seq=last_seq,
            )
        seq, reason = self.failure
        return AuditVerification(
            ok=False,
            checked=self.checked,
            first_bad_seq=seq,
            reason=reason,
            anchor_seq=anchor_seq,
            anchor_hash=anchor_hash,
            last_seq=last_seq,
        )
