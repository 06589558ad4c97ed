"""Reading audit rows back into records, shared by the SQL stores (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterable

from ..audit_chain import AuditRow
from ..errors import SchemaError
from ..ids import AgentId, try_parse
from ..models import AuditEvent, AuditRecord

__all__ = ["audit_records", "stored_id"]


def stored_id(text: str) -> AgentId:
    """The id of a row read by scanning (a row edited by hand may hold anything)."""
    agent_id = try_parse(text)
    if agent_id is None:
        raise SchemaError(
            f"the store holds an invalid agent id {text[:64]!r}: it was edited outside "
            "iron-runtime-state; remove that row or restore the store from a backup"
        )
    return agent_id


def audit_records(rows: Iterable[AuditRow]) -> list[AuditRecord]:
    """The records of audit rows ``(seq, agent, type, timestamp, details, prev_hash, hash)``.

    An agent's id is parsed once per query, however many of its records the rows hold.
    """
    ids: dict[str, AgentId] = {}
    out: list[AuditRecord] = []
    for seq, agent, event_type, timestamp, details, prev_hash, digest in rows:
        agent_id = ids.get(agent)
        if agent_id is None:
            agent_id = ids[agent] = stored_id(agent)
        out.append(
            AuditRecord(seq, AuditEvent._trusted(agent_id, event_type, timestamp, details), digest, prev_hash)
        )
    return out
