"""The PostgreSQL store: ``postgresql://`` and ``postgres://`` URLs, with ``?schema=`` (default ``iron``).

:func:`open_postgres` builds the sync store and :func:`open_async_postgres` the asyncio one (the
registry's factories for these schemes); both run the same operations on the same schema. The
modules, by concern (docs/postgres.md has the user-facing version):

- :mod:`.url`: URLs and options (:class:`PostgresConfig`); libpq parameters pass through;
- :mod:`.schema`: the tables, indexes, triggers and functions, and the ordered :data:`MIGRATIONS`;
- :mod:`.requests`: what an operation yields to its driver, and rows as records;
- :mod:`.trail`, :mod:`.agents`, :mod:`.spending`: every operation, once, as an I/O-free
  generator of statements; :mod:`.ops` gathers them and prepares the schema;
- :mod:`.errors`: driver errors as the library's own;
- :mod:`.sync` and :mod:`.aio`: the two drivers, on psycopg 3 with ``psycopg_pool``.

Needs the ``postgres`` extra (psycopg 3 and psycopg_pool).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...config import DEFAULT_SCHEMA
from ...errors import MissingDependency

try:  # the one check for the extra: every module of the package imports psycopg freely
    import psycopg  # noqa: F401
    import psycopg_pool  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingDependency(
        f"the PostgreSQL store needs the 'postgres' extra: pip install 'iron-runtime-state[postgres]' ({exc})"
    ) from exc

from .schema import MIGRATIONS, SCHEMA_VERSION
from .sync import PostgresBackend
from .url import OPTIONS, PostgresConfig, parse_postgres_url

if TYPE_CHECKING:
    from .aio import AsyncPostgresBackend

__all__ = [
    "MIGRATIONS",
    "OPTIONS",
    "SCHEMA_VERSION",
    "PostgresBackend",
    "PostgresConfig",
    "open_async_postgres",
    "open_postgres",
    "parse_postgres_url",
]


def open_postgres(url: str, *, schema: str = DEFAULT_SCHEMA, **options: Any) -> PostgresBackend:
    """Build the PostgreSQL store for ``url`` (no connection is made until the first call).

    ``schema`` names the PostgreSQL schema that holds the tables (``?schema=`` in the URL works
    too; a keyword wins). ``options``: ``timeout`` (seconds a call may wait for a connection or a
    lock; default 5), ``max_connections`` (default 10), and any libpq connection parameter
    (``sslmode``, ``application_name``, ...), which may also be given in the URL's query string.
    """
    config = parse_postgres_url(url, **({"schema": schema} if schema != DEFAULT_SCHEMA else {}), **options)
    # mypy sees the contract's methods as abstract: OpsBackend derives them at import time.
    return PostgresBackend(config)  # type: ignore[abstract]


def open_async_postgres(url: str, *, schema: str = DEFAULT_SCHEMA, **options: Any) -> AsyncPostgresBackend:
    """The asyncio PostgreSQL store for ``url``; the same URLs and options as :func:`open_postgres`.

    No connection is made until the first call (which must come from a running event loop).
    """
    from .aio import AsyncPostgresBackend

    config = parse_postgres_url(url, **({"schema": schema} if schema != DEFAULT_SCHEMA else {}), **options)
    return AsyncPostgresBackend(config)
