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
from collections.abc import Iterable
from json.encoder import encode_basestring  # the C escaper json.dumps itself uses
from typing import Final

from .models import AuditVerification

__all__ = ["GENESIS_HASH", "AuditChain", "AuditRow", "canonical_event_json"]

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
        trail that ends before it lost its newest records.
        """
        expected_prev = anchor_hash
        last_seq = anchor_seq
        checked = 0
        seal = self.seal

        def bad(seq: int, reason: str) -> AuditVerification:
            return AuditVerification(
                ok=False,
                checked=checked,
                first_bad_seq=seq,
                reason=reason,
                anchor_seq=anchor_seq,
                anchor_hash=anchor_hash,
                last_seq=last_seq if checked else None,
            )

        for seq, agent_id, event_type, timestamp, details, prev_hash, digest in rows:
            if seq <= last_seq:
                return bad(seq, f"seq {seq} is not after seq {last_seq}: records were reordered")
            if prev_hash != expected_prev:
                return bad(
                    seq,
                    "prev_hash does not match the hash of the record before it: a record was "
                    "removed, inserted or moved before this one",
                )
            if seal(prev_hash, seq, agent_id, event_type, timestamp, details) != digest:
                return bad(seq, "hash does not match the record's content: the record was edited")
            expected_prev = digest
            last_seq = seq
            checked += 1
        if head is not None and head[0] > anchor_seq:
            head_seq, head_hash = head
            if head_seq != last_seq or head_hash != expected_prev:
                return bad(
                    last_seq + 1 if head_seq > last_seq else head_seq,
                    f"the trail ends at seq {last_seq} but the store's head is seq {head_seq}: "
                    "the newest records were removed or replaced",
                )
        return AuditVerification(
            ok=True,
            checked=checked,
            anchor_seq=anchor_seq,
            anchor_hash=anchor_hash,
            last_seq=last_seq if checked else None,
        )
