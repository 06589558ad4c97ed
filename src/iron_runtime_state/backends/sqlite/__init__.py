"""The SQLite store: ``sqlite:///relative.db`` and ``sqlite:////absolute.db``.

One file holds the agent states (with their labels, indexed), the budget scopes, the open
budget holds, the fleet aggregates, the hash-chained audit trail and the spend ledger's index.
Every process and thread that opens the same file shares them.
docs/sqlite.md has the user-facing version; the modules, each with the reasons for its design:

- :mod:`.schema`: the tables and triggers, the ordered :data:`MIGRATIONS` and the check that a
  file is a store of this or an older version (the on-disk format).
- :mod:`.connection`: options and URLs, creating the file owner-only, WAL and ``synchronous``,
  one connection per thread, transactions, and the read cache checked against
  ``PRAGMA data_version``.
- :mod:`.rows`: how an agent and a budget scope are stored in a row (micro-units, labels and
  scope lists as JSON) and read back, and the SQL fragments the others share.
- :mod:`.store`: :class:`SQLiteBackend`, its operations, the one-statement spend and hold, and
  the wait for new audit records.
- :mod:`.spending`: spends, holds, periods, budget scopes and thresholds, each one transaction.
- :mod:`.ledger`: the spend ledger's index table, written with each ``spend`` record, and the
  reports (``spend_totals``) read from it with one ``GROUP BY``.
- :mod:`.paging`: a page of agents for the dashboard, filtered and sorted from the indexes.
- :mod:`.trail`: the audit trail's statements and the append to its hash chain.
"""

from __future__ import annotations

from .connection import OPTIONS, SYNCHRONOUS_MODES, parse_sqlite_url
from .schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from .store import SQLiteBackend, audit_select, open_sqlite

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "OPTIONS",
    "SCHEMA_VERSION",
    "SYNCHRONOUS_MODES",
    "SQLiteBackend",
    "audit_select",
    "open_sqlite",
    "parse_sqlite_url",
]
