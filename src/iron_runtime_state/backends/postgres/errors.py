"""Driver errors as the library's own, in one place for both drivers.

Every message names the server (host, port and database: never the user info), says what to do,
and has any password scrubbed out, even one a server or a driver echoed back.
"""

from __future__ import annotations

from typing import Final

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import PoolTimeout

from ...errors import BackendError, BackendUnavailable, SchemaError, StateError
from .url import PostgresConfig

__all__ = ["DRIVER_ERRORS", "map_error"]

#: The exceptions the drivers raise, which the store maps.
DRIVER_ERRORS: Final = (psycopg.Error,)

#: Failures where the server could not be reached, went away, or is shutting down or starting.
_UNREACHABLE: Final = (
    pgerrors.AdminShutdown,
    pgerrors.CrashShutdown,
    pgerrors.CannotConnectNow,
    pgerrors.ConnectionException,
)


def _message(exc: BaseException, config: PostgresConfig) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return config.scrub(text)[:300]


def map_error(exc: BaseException, config: PostgresConfig) -> StateError:
    """The library error for a psycopg exception (the caller chains ``exc`` as the cause)."""
    where = f"PostgreSQL at {config.target}"
    message = _message(exc, config)
    if isinstance(exc, PoolTimeout):
        return BackendUnavailable(
            f"{where} gave no connection within {config.timeout:g} s ({message}): is the server "
            "up and reachable? (raise timeout= or max_connections= if it is only busy)"
        )
    if isinstance(exc, (pgerrors.LockNotAvailable, pgerrors.QueryCanceled)):
        return BackendUnavailable(
            f"{where}: a call waited more than {config.timeout:g} s for a lock held by another "
            f"client, and gave up without changing anything ({message})"
        )
    if message.startswith("connection failed"):  # no connection was made: nothing was sent
        return BackendUnavailable(
            f"{where} cannot be reached ({message}); check the URL, the credentials and that the "
            "server is up: calls work again as soon as it can be reached"
        )
    if isinstance(exc, _UNREACHABLE) or (isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None):
        return BackendUnavailable(
            f"{where} closed the connection during the call ({message}): a write in flight was "
            "either committed whole or not at all, so check before repeating it; the store "
            "reconnects by itself"
        )
    if isinstance(exc, pgerrors.InsufficientPrivilege):
        return BackendError(
            f"{where}: the database user lacks a privilege on schema {config.schema!r} ({message}); "
            "grant it USAGE and CREATE on the schema (or create the store once as its owner)"
        )
    if isinstance(exc, (pgerrors.UndefinedTable, pgerrors.UndefinedFunction, pgerrors.UndefinedColumn)):
        return SchemaError(
            f"{where}: schema {config.schema!r} lacks what this version needs ({message}): it was "
            "changed outside iron-runtime-state; restore it from a backup"
        )
    return BackendError(f"{where}: {type(exc).__name__}: {message}")
