"""Every store operation on PostgreSQL, once, as an I/O-free generator of statements.

:class:`PostgresOps` gathers them by concern: the audit trail (:mod:`.trail`), agent states
(:mod:`.agents`), spends, holds and budget scopes (:mod:`.spending`); plus :meth:`~PostgresOps.prepare`,
which creates or migrates the schema before a store object's first operation; and the spend
ledger's reports (:mod:`.ledger`). The sync and asyncio
drivers run the same operations (:mod:`.requests` says what they yield), so each rule is written
once for both.
"""

from __future__ import annotations

from typing import Final

from ...errors import SchemaError
from ...ledger import SpendQuery, SpendTotal
from . import ledger
from . import schema as layout
from .requests import BEGIN, COMMIT, Op, Sql
from .spending import BudgetOps

__all__ = ["PostgresOps"]

_META: Final = "CREATE TABLE {s}.meta (id integer PRIMARY KEY CHECK (id = 0), version integer NOT NULL)"


class PostgresOps(BudgetOps):
    """The operations of one store (one schema); shared by every connection of a store object."""

    def __init__(self, schema: str) -> None:
        super().__init__(f'"{schema}"')
        self.schema = schema

    def _newer(self, version: int) -> SchemaError:
        return SchemaError(
            f"PostgreSQL schema {self.schema!r} has version {version}, written by a newer "
            f"iron-runtime-state (this one knows versions up to {len(layout.MIGRATIONS)}); it was left "
            "untouched: upgrade iron-runtime-state to use it"
        )

    def spend_totals(self, query: SpendQuery) -> Op[list[SpendTotal]]:
        """See ``Backend.spend_totals``: from the ledger's index, never the records (:mod:`.ledger`)."""
        return (yield from ledger.spend_totals(self.quoted_schema, query))

    def check_ledger(self) -> Op[tuple[int, str] | None]:
        """See ``Backend.check_ledger``: the ledger's index against the ``spend`` records."""
        return (yield from ledger.check_ledger(self.quoted_schema))

    def migrate(self) -> Op[str]:
        """See ``Backend.migrate``: the schema is created or migrated on first use (before this
        runs); this says where it stands."""
        version = yield from self.prepare()
        return f"PostgreSQL schema {self.schema!r} is at version {version}, this version's layout"

    def prepare(self) -> Op[int]:
        """Check the schema's version, creating or migrating it when it is older; the version.

        The migration runs in one transaction under an advisory lock, so processes that start
        together migrate once; a schema that holds tables but no ``meta`` was not made by us and
        is refused untouched, as is a newer version.
        """
        meta = f"{self.quoted_schema}.meta"
        migrations = layout.MIGRATIONS  # read now, not at import: tests extend it
        latest = len(migrations)
        if (yield Sql("SELECT to_regclass(%s)", (meta,)))[0][0] is not None:
            version: int = (yield Sql(f"SELECT version FROM {meta}"))[0][0]
            if version > latest:
                raise self._newer(version)
            if version == latest:
                return version
        yield BEGIN
        yield Sql("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"iron_runtime_state:{self.schema}",))
        if not (yield Sql("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,))):
            yield Sql(f"CREATE SCHEMA {self.quoted_schema}")
        if (yield Sql("SELECT to_regclass(%s)", (meta,)))[0][0] is None:
            others = (yield Sql(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s",
                (self.schema,),
            ))[0][0]  # fmt: skip
            if others:
                raise SchemaError(
                    f"PostgreSQL schema {self.schema!r} holds {others} tables or other objects that "
                    "iron-runtime-state did not create; it was left untouched: give the store a "
                    "schema of its own (?schema=...)"
                )
            yield Sql(layout.render(_META, self.quoted_schema))
            yield Sql(f"INSERT INTO {meta} VALUES (0, 0)")
        version = (yield Sql(f"SELECT version FROM {meta} FOR UPDATE"))[0][0]
        if version > latest:
            raise self._newer(version)
        for target in range(version + 1, latest + 1):
            for statement in migrations[target - 1]:
                yield Sql(layout.render(statement, self.quoted_schema))
            yield Sql(f"UPDATE {meta} SET version = %s", (target,))
        yield COMMIT
        return latest
