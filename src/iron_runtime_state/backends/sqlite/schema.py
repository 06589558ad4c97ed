"""What a store file holds: its tables and triggers, its versions, and how a file is recognised.

:data:`MIGRATIONS` is an ordered list; the number applied is stored in ``PRAGMA user_version``
and the file is marked with ``PRAGMA application_id``. A file from a newer version, from another
application, or that is not a database is refused untouched. This is the on-disk format: a file
written by any earlier version must keep opening, so a shipped entry is never edited.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from ...audit_chain import GENESIS_HASH
from ...errors import SchemaError
from ...models import AgentStatus

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "RUNNING",
    "SCHEMA_VERSION",
    "SQL_OBJECTS",
    "STATUSES",
    "STATUS_CODE",
    "check_complete",
    "check_identity",
    "migrate",
    "object_names",
    "read_identity",
]

#: ``PRAGMA application_id`` of every store file: "IRON" in ASCII.
APPLICATION_ID: Final = 0x49524F4E

#: ``iron_agents.status`` codes: a status is stored as its index here.
STATUSES: Final = (AgentStatus.RUNNING, AgentStatus.STOPPED, AgentStatus.FAILED)
#: The code of each status, keyed by the member's value (hashing a str is cheaper than an Enum).
STATUS_CODE: Final = {status._value_: code for code, status in enumerate(STATUSES)}
RUNNING: Final = 0

#: Schema migrations, in order: ``MIGRATIONS[i]`` takes a file from version ``i`` to ``i + 1``.
#: The version (how many have been applied) is ``PRAGMA user_version``. Append new entries;
#: never edit one that has shipped. Each runs in one transaction with its version bump.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: agents with fleet aggregates, budget holds, and the hash-chained audit trail.
    (
        # status: 0 running, 1 stopped, 2 failed. budget_limit NULL: no limit.
        # changed_at: Unix time of the last change (purge_agents).
        """CREATE TABLE iron_agents (
            agent_id       TEXT    NOT NULL PRIMARY KEY,
            status         INTEGER NOT NULL,
            budget_spent   REAL    NOT NULL,
            pii_detections INTEGER NOT NULL,
            budget_limit   REAL,
            changed_at     REAL    NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE iron_stats (
            id             INTEGER PRIMARY KEY CHECK (id = 0),
            running        INTEGER NOT NULL,
            stopped        INTEGER NOT NULL,
            failed         INTEGER NOT NULL,
            budget_spent   REAL    NOT NULL,
            pii_detections INTEGER NOT NULL
        )""",
        "INSERT INTO iron_stats VALUES (0, 0, 0, 0, 0.0, 0)",
        """CREATE TRIGGER iron_agents_inserted AFTER INSERT ON iron_agents BEGIN
            UPDATE iron_stats SET
                running = running + (NEW.status = 0),
                stopped = stopped + (NEW.status = 1),
                failed = failed + (NEW.status = 2),
                budget_spent = budget_spent + NEW.budget_spent,
                pii_detections = pii_detections + NEW.pii_detections;
        END""",
        """CREATE TRIGGER iron_agents_updated
        AFTER UPDATE OF status, budget_spent, pii_detections ON iron_agents BEGIN
            UPDATE iron_stats SET
                running = running + (NEW.status = 0) - (OLD.status = 0),
                stopped = stopped + (NEW.status = 1) - (OLD.status = 1),
                failed = failed + (NEW.status = 2) - (OLD.status = 2),
                budget_spent = budget_spent + (NEW.budget_spent - OLD.budget_spent),
                pii_detections = pii_detections + (NEW.pii_detections - OLD.pii_detections);
        END""",
        # Removing an agent drops its holds; the last one out resets the float sum to 0 so
        # no rounding drift is left behind in an empty store.
        """CREATE TRIGGER iron_agents_deleted AFTER DELETE ON iron_agents BEGIN
            DELETE FROM iron_holds WHERE agent_id = OLD.agent_id;
            UPDATE iron_stats SET
                running = running - (OLD.status = 0),
                stopped = stopped - (OLD.status = 1),
                failed = failed - (OLD.status = 2),
                budget_spent = CASE WHEN running + stopped + failed = 1 THEN 0.0
                                    ELSE budget_spent - OLD.budget_spent END,
                pii_detections = pii_detections - OLD.pii_detections;
        END""",
        """CREATE TABLE iron_holds (
            agent_id       TEXT NOT NULL,
            reservation_id TEXT NOT NULL,
            amount         REAL NOT NULL,
            expires_at     REAL NOT NULL,
            PRIMARY KEY (agent_id, reservation_id)
        ) WITHOUT ROWID""",
        # seq is the rowid, so each index below also orders by seq within its key.
        """CREATE TABLE iron_audit (
            seq        INTEGER PRIMARY KEY,
            agent_id   TEXT    NOT NULL,
            event_type TEXT    NOT NULL,
            timestamp  INTEGER NOT NULL,
            details    TEXT    NOT NULL,
            prev_hash  TEXT    NOT NULL,
            hash       TEXT    NOT NULL
        )""",
        "CREATE INDEX iron_audit_by_agent ON iron_audit (agent_id)",
        "CREATE INDEX iron_audit_by_type ON iron_audit (event_type)",
        "CREATE INDEX iron_audit_by_time ON iron_audit (timestamp)",
        """CREATE TABLE iron_audit_chain (
            id          INTEGER PRIMARY KEY CHECK (id = 0),
            head_seq    INTEGER NOT NULL,
            head_hash   TEXT    NOT NULL,
            anchor_seq  INTEGER NOT NULL,
            anchor_hash TEXT    NOT NULL
        )""",
        f"INSERT INTO iron_audit_chain VALUES (0, 0, '{GENESIS_HASH}', 0, '{GENESIS_HASH}')",
        # The chain's guard: a record must be seq head+1 and link to the head's hash, so no
        # writer (of any version) can fork, reorder or leave gaps in the trail.
        """CREATE TRIGGER iron_audit_appended AFTER INSERT ON iron_audit BEGIN
            SELECT RAISE(ABORT, 'iron_runtime_state: audit record does not extend the chain head')
            FROM iron_audit_chain
            WHERE NEW.seq IS NOT head_seq + 1 OR NEW.prev_hash IS NOT head_hash;
            UPDATE iron_audit_chain SET head_seq = NEW.seq, head_hash = NEW.hash;
        END""",
    ),
    # 2: the seals of the head and the anchor (AuditChain.seal_mark), kept beside them when the
    # trail has an audit key (NULL: none). The guard now also clears the head's seal as it
    # moves the head: a seal belongs to one head, and the writer that seals stores it after
    # its records, in the same transaction. Files of version 1 have no seals: "not sealed".
    (
        "ALTER TABLE iron_audit_chain ADD COLUMN head_seal TEXT",
        "ALTER TABLE iron_audit_chain ADD COLUMN anchor_seal TEXT",
        "DROP TRIGGER iron_audit_appended",
        """CREATE TRIGGER iron_audit_appended AFTER INSERT ON iron_audit BEGIN
            SELECT RAISE(ABORT, 'iron_runtime_state: audit record does not extend the chain head')
            FROM iron_audit_chain
            WHERE NEW.seq IS NOT head_seq + 1 OR NEW.prev_hash IS NOT head_hash;
            UPDATE iron_audit_chain SET head_seq = NEW.seq, head_hash = NEW.hash, head_seal = NULL;
        END""",
    ),
    # 3: the stopped and failed agents by status, in id order, so iter_agent_states(status=...)
    # reads only the matches. Partial: most of a fleet runs, and a running agent's writes then
    # touch no index (an index of every status costs a third of save_agent_state's speed).
    ("CREATE INDEX iron_agents_finished ON iron_agents (status) WHERE status = 1 OR status = 2",),
)

#: The schema version this code writes: the number of migrations.
SCHEMA_VERSION: Final = len(MIGRATIONS)

#: Schema objects the current version needs; a file missing one was changed by hand.
_REQUIRED: Final = frozenset(
    {
        "iron_agents",
        "iron_stats",
        "iron_holds",
        "iron_audit",
        "iron_audit_chain",
        "iron_audit_by_agent",
        "iron_audit_by_type",
        "iron_audit_by_time",
        "iron_agents_finished",
        "iron_agents_inserted",
        "iron_agents_updated",
        "iron_agents_deleted",
        "iron_audit_appended",
    }
)

#: The names of the file's own tables, indexes and triggers.
SQL_OBJECTS: Final = "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"


def check_identity(path: str, version: int, application: int, names: set[str] | None) -> None:
    """Refuse a file that is not ours or is newer than this code (``names``: its tables, if known)."""
    if application not in (0, APPLICATION_ID):
        raise SchemaError(
            f"SQLite store {path} belongs to another application (application_id "
            f"{application:#x}); it was left untouched: give iron-runtime-state its own file"
        )
    known = len(MIGRATIONS)  # read now, not at import: tests extend it
    if application == APPLICATION_ID and version > known:
        raise SchemaError(
            f"SQLite store {path} has schema version {version}, written by a newer "
            f"iron-runtime-state (this one knows versions up to {known}); it was left "
            "untouched: upgrade iron-runtime-state to open it"
        )
    if application == 0 and (version != 0 or names):
        shown = f" (it holds {sorted(names)[:5]})" if names else ""
        raise SchemaError(
            f"SQLite store {path} is a SQLite database that iron-runtime-state did not create{shown}; "
            "it was left untouched: give the store a file of its own"
        )


def object_names(db: sqlite3.Connection) -> set[str]:
    """The names of the file's own tables, indexes and triggers."""
    return {name for _, name in db.execute(SQL_OBJECTS).fetchall()}


def read_identity(db: sqlite3.Connection, path: str) -> tuple[int, int, set[str]]:
    """The file's version, application id and schema objects, after checking they are ours."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    application = db.execute("PRAGMA application_id").fetchone()[0]
    names = object_names(db)
    check_identity(path, version, application, names)
    return version, application, names


def migrate(db: sqlite3.Connection, version: int, application: int) -> None:
    """Apply the migrations after ``version`` and mark the file as ours (in the caller's transaction)."""
    migrations = MIGRATIONS  # read now, not at import: tests extend it
    for target in range(version + 1, len(migrations) + 1):
        for statement in migrations[target - 1]:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {target}")
    if application == 0:
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def check_complete(path: str, names: set[str]) -> None:
    """Refuse a file whose schema objects (``names``) lack one this version needs."""
    missing = sorted(_REQUIRED - names)
    if missing:
        raise SchemaError(
            f"SQLite store {path} lacks {missing}: it was changed outside "
            "iron-runtime-state; restore it from a backup"
        )
