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
from ...money import MAX_MICROS, to_micros

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
    # 4 (0.6): exact money, labels, periods and budget scopes. Every amount becomes an INTEGER of
    # micro-units (money.py), converted by iron_micros (_micros_of_real): the decimal value a
    # stored float stands for, rounded half to even, so 0.30000000000000004 becomes 300000.
    # SQLite cannot change a column's type, so the agents, holds and totals tables are rebuilt
    # (their triggers and index go with them and are made again below). Old agents read as
    # agents without labels, scopes or period.
    (
        "DROP TRIGGER iron_agents_inserted",
        "DROP TRIGGER iron_agents_updated",
        "DROP TRIGGER iron_agents_deleted",
        "DROP INDEX iron_agents_finished",
        # Amounts in micro-units. labels: a JSON object with sorted keys (NULL: none), so two
        # equal label sets are equal texts; budget_scopes: a JSON array in the agent's order
        # (NULL: none); budget_period NULL: no period; period_start: Unix seconds.
        """CREATE TABLE iron_agents_v4 (
            agent_id       TEXT    NOT NULL PRIMARY KEY,
            status         INTEGER NOT NULL,
            budget_spent   INTEGER NOT NULL,
            pii_detections INTEGER NOT NULL,
            budget_limit   INTEGER,
            changed_at     REAL    NOT NULL,
            labels         TEXT,
            budget_scopes  TEXT,
            budget_period  TEXT,
            budget_tz      TEXT    NOT NULL DEFAULT 'UTC',
            period_start   REAL
        ) WITHOUT ROWID""",
        """INSERT INTO iron_agents_v4
            (agent_id, status, budget_spent, pii_detections, budget_limit, changed_at)
        SELECT agent_id, status, iron_micros(budget_spent), pii_detections,
               iron_micros(budget_limit), changed_at
        FROM iron_agents""",
        "DROP TABLE iron_agents",
        "ALTER TABLE iron_agents_v4 RENAME TO iron_agents",
        "CREATE INDEX iron_agents_finished ON iron_agents (status) WHERE status = 1 OR status = 2",
        # The totals, recounted exactly from the converted agents (the float sum had drifted).
        "DROP TABLE iron_stats",
        """CREATE TABLE iron_stats (
            id             INTEGER PRIMARY KEY CHECK (id = 0),
            running        INTEGER NOT NULL,
            stopped        INTEGER NOT NULL,
            failed         INTEGER NOT NULL,
            budget_spent   INTEGER NOT NULL,
            pii_detections INTEGER NOT NULL
        )""",
        """INSERT INTO iron_stats
        SELECT 0, coalesce(sum(status = 0), 0), coalesce(sum(status = 1), 0),
               coalesce(sum(status = 2), 0), coalesce(sum(budget_spent), 0),
               coalesce(sum(pii_detections), 0)
        FROM iron_agents""",
        # A hold remembers the budget scopes it counts against (a JSON array; NULL: none).
        """CREATE TABLE iron_holds_v4 (
            agent_id       TEXT    NOT NULL,
            reservation_id TEXT    NOT NULL,
            amount         INTEGER NOT NULL,
            expires_at     REAL    NOT NULL,
            scopes         TEXT,
            PRIMARY KEY (agent_id, reservation_id)
        ) WITHOUT ROWID""",
        """INSERT INTO iron_holds_v4 (agent_id, reservation_id, amount, expires_at)
        SELECT agent_id, reservation_id, iron_micros(amount), expires_at FROM iron_holds""",
        "DROP TABLE iron_holds",
        "ALTER TABLE iron_holds_v4 RENAME TO iron_holds",
        # Budget scopes: spent is the spend of the period that started at period_start.
        """CREATE TABLE iron_budgets (
            scope        TEXT    NOT NULL PRIMARY KEY,
            budget_limit INTEGER,
            period       TEXT,
            tz           TEXT    NOT NULL,
            period_start REAL,
            spent        INTEGER NOT NULL
        ) WITHOUT ROWID""",
        # Each hold once per scope it touches, ordered by expiry within the scope, so a scope's
        # held total reads only its unexpired holds: a range of this table's key.
        """CREATE TABLE iron_scope_holds (
            scope          TEXT    NOT NULL,
            expires_at     REAL    NOT NULL,
            agent_id       TEXT    NOT NULL,
            reservation_id TEXT    NOT NULL,
            amount         INTEGER NOT NULL,
            PRIMARY KEY (scope, expires_at, agent_id, reservation_id)
        ) WITHOUT ROWID""",
        # The label index: each agent's labels as rows, found by (key, value) in agent id order
        # through iron_labels_by_value (which holds agent_id, the table's key, beside them).
        """CREATE TABLE iron_labels (
            agent_id TEXT NOT NULL,
            key      TEXT NOT NULL,
            value    TEXT NOT NULL,
            PRIMARY KEY (agent_id, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX iron_labels_by_value ON iron_labels (key, value)",
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
        # Removing an agent drops its holds (and, by iron_holds_deleted, their scope entries).
        """CREATE TRIGGER iron_agents_deleted AFTER DELETE ON iron_agents BEGIN
            DELETE FROM iron_holds WHERE agent_id = OLD.agent_id;
            UPDATE iron_stats SET
                running = running - (OLD.status = 0),
                stopped = stopped - (OLD.status = 1),
                failed = failed - (OLD.status = 2),
                budget_spent = budget_spent - OLD.budget_spent,
                pii_detections = pii_detections - OLD.pii_detections;
        END""",
        # The label index follows the labels column; the WHEN clauses keep writes that leave
        # the labels as they were (every spend, most saves) away from it.
        """CREATE TRIGGER iron_agents_labelled AFTER INSERT ON iron_agents
        WHEN NEW.labels IS NOT NULL BEGIN
            INSERT INTO iron_labels SELECT NEW.agent_id, key, value FROM json_each(NEW.labels);
        END""",
        """CREATE TRIGGER iron_agents_relabelled AFTER UPDATE OF labels ON iron_agents
        WHEN NEW.labels IS NOT OLD.labels BEGIN
            DELETE FROM iron_labels WHERE agent_id = OLD.agent_id;
            INSERT INTO iron_labels SELECT NEW.agent_id, key, value FROM json_each(NEW.labels);
        END""",
        """CREATE TRIGGER iron_agents_unlabelled AFTER DELETE ON iron_agents
        WHEN OLD.labels IS NOT NULL BEGIN
            DELETE FROM iron_labels WHERE agent_id = OLD.agent_id;
        END""",
        # A hold's scope entries are made and dropped with it, whoever makes or drops it (a
        # commit, a release, an expired hold cleared, an agent removed).
        """CREATE TRIGGER iron_holds_made AFTER INSERT ON iron_holds
        WHEN NEW.scopes IS NOT NULL BEGIN
            INSERT INTO iron_scope_holds
            SELECT value, NEW.expires_at, NEW.agent_id, NEW.reservation_id, NEW.amount
            FROM json_each(NEW.scopes);
        END""",
        """CREATE TRIGGER iron_holds_dropped AFTER DELETE ON iron_holds
        WHEN OLD.scopes IS NOT NULL BEGIN
            DELETE FROM iron_scope_holds
            WHERE scope IN (SELECT value FROM json_each(OLD.scopes)) AND expires_at = OLD.expires_at
              AND agent_id = OLD.agent_id AND reservation_id = OLD.reservation_id;
        END""",
    ),
    # 5 (0.7): the spend ledger and budget thresholds. Each budget keeps its thresholds (the
    # text of thresholds.thresholds_text; NULL: the default 50%, 80%, 100%; '': none) and the
    # highest of them alerted in its current period (0: none). Existing agents and scopes get
    # the default thresholds with nothing alerted. ALTER TABLE ... ADD COLUMN rewrites no row.
    (
        "ALTER TABLE iron_agents ADD COLUMN budget_thresholds TEXT",
        "ALTER TABLE iron_agents ADD COLUMN alerted REAL NOT NULL DEFAULT 0",
        "ALTER TABLE iron_budgets ADD COLUMN thresholds TEXT",
        "ALTER TABLE iron_budgets ADD COLUMN alerted REAL NOT NULL DEFAULT 0",
        # The ledger's index: one row per ``spend`` audit record (seq: the record's, ts: its
        # timestamp), written in the same transaction, holding what reports group and sum.
        # Keyed by time bucket (ts / 900, ledger.BUCKET), so a report over a span reads exactly
        # the span's rows from the table itself (no lookup), a report by time groups them in
        # the key's order (no sort), and a prune deletes a range of the key. amount in
        # micro-units; scopes (the scopes charged), labels (the agent's, sorted keys) and tags
        # as JSON text, NULL for none, as rows.py writes them. Spends recorded before this
        # version have no record, so no row: the ledger starts with version 5.
        """CREATE TABLE iron_ledger (
            bucket              INTEGER NOT NULL,
            seq                 INTEGER NOT NULL,
            ts                  INTEGER NOT NULL,
            agent_id            TEXT    NOT NULL,
            amount              INTEGER NOT NULL,
            model               TEXT,
            input_tokens        INTEGER NOT NULL,
            output_tokens       INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL,
            scopes              TEXT,
            labels              TEXT,
            tags                TEXT,
            PRIMARY KEY (bucket, seq)
        ) WITHOUT ROWID""",
        # A report for one agent or one model reads that key's buckets, in order. Partial: a
        # spend without a model (a plain record_spend) touches no entry of the model index.
        "CREATE INDEX iron_ledger_by_agent ON iron_ledger (agent_id, bucket)",
        "CREATE INDEX iron_ledger_by_model ON iron_ledger (model, bucket) WHERE model IS NOT NULL",
    ),
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
        "iron_budgets",
        "iron_scope_holds",
        "iron_labels",
        "iron_labels_by_value",
        "iron_agents_labelled",
        "iron_agents_relabelled",
        "iron_agents_unlabelled",
        "iron_holds_made",
        "iron_holds_dropped",
        "iron_ledger",
        "iron_ledger_by_agent",
        "iron_ledger_by_model",
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
    # Version 4 converts stored floats with this function; registered on this connection only.
    db.create_function("iron_micros", 1, _micros_of_real, deterministic=True)
    for target in range(version + 1, len(migrations) + 1):
        for statement in migrations[target - 1]:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {target}")
    if application == 0:
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def _micros_of_real(value: float | int | None) -> int | None:
    """An amount stored by 0.5 or older (a float) in micro-units, for migration 4.

    The decimal value the float stands for, rounded half to even (:func:`..money.to_micros`).
    Past :data:`..money.MAX_MICROS` (a billion units, the most this version counts; 0.5
    allowed a thousand times more) it is that maximum, so every stored amount stays one this
    version can read back, check and save.
    """
    if value is None:
        return None
    return min(to_micros(value, "a stored amount"), MAX_MICROS)


def check_complete(path: str, names: set[str]) -> None:
    """Refuse a file whose schema objects (``names``) lack one this version needs."""
    missing = sorted(_REQUIRED - names)
    if missing:
        raise SchemaError(
            f"SQLite store {path} lacks {missing}: it was changed outside "
            "iron-runtime-state; restore it from a backup"
        )
