"""Where and how to reach PostgreSQL: URLs and options; no connection is made here.

:func:`parse_postgres_url` turns a ``postgresql://`` (or ``postgres://``) URL and the keyword
options of ``open_postgres`` into a :class:`PostgresConfig`, checked once for both drivers.
Our own options (``schema``, ``timeout``, ``max_connections``) are taken out of the query
string; every other parameter (``sslmode``, ``sslrootcert``, ``application_name``,
``target_session_attrs``, ...) goes to libpq as written, and libpq checks it here, before any
connection is tried.

The password (in the user info, or as ``?password=``) is kept only in the connection string
handed to libpq: :attr:`PostgresConfig.url`, every error and every log line show ``***``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlencode

from ...config import DEFAULT_SCHEMA
from ...errors import ConfigurationError
from ..urls import shown, shown_url

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_TIMEOUT",
    "OPTIONS",
    "PostgresConfig",
    "check_schema",
    "parse_postgres_url",
    "shown_url",
]

#: Seconds a call may wait for a connection, a lock or a reply before it fails.
DEFAULT_TIMEOUT: Final = 5.0
#: Connections each store object's pool may open.
DEFAULT_MAX_CONNECTIONS: Final = 10
_SCHEMES: Final = ("postgresql", "postgres")
#: A schema name we create and quote: lowercase, so that it reads the same quoted or not.
_SCHEMA_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: libpq parameters whose value is a secret, masked wherever a URL is shown.
_SECRETS: Final = frozenset({"password", "sslpassword"})

#: The options of ``open_postgres`` that are ours (keywords or URL query parameters); any other
#: keyword or parameter must be a libpq connection parameter.
OPTIONS: Final[Mapping[str, str]] = {
    "schema": f"the PostgreSQL schema of the tables (default {DEFAULT_SCHEMA!r}); one per fleet or tenant",
    "timeout": f"seconds a call may wait for a connection or a lock (default {DEFAULT_TIMEOUT:g})",
    "max_connections": f"connections this store object may open (default {DEFAULT_MAX_CONNECTIONS})",
}


def check_schema(schema: object) -> str:
    """``schema`` if it is a name we can use: 1 to 63 of ``a-z 0-9 _``, not starting with a digit."""
    if not isinstance(schema, str):
        raise ConfigurationError(f"schema must be a str, got {type(schema).__name__}")
    if _SCHEMA_RE.fullmatch(schema) is None or schema.startswith("pg_"):
        raise ConfigurationError(
            f"schema {shown(schema)} is invalid: use 1 to 63 characters of a-z, 0-9 and _, starting "
            "with a letter or _ and not with pg_ (e.g. 'iron' or 'tenant_42')"
        )
    return schema


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    """A checked PostgreSQL store configuration (the password stays out of ``repr``)."""

    #: The libpq connection string (a URI), with the password: for the driver only.
    conninfo: str = field(repr=False)
    #: The URL with the password masked and the schema spelled out: what ``manager.url`` shows.
    url: str
    schema: str
    timeout: float
    max_connections: int
    #: "host:port/database" for messages (never the user info).
    target: str
    #: Secrets to scrub from any driver message before it is shown (the password).
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def quoted_schema(self) -> str:
        """The schema as an SQL identifier (its name is checked, so plain quoting is exact)."""
        return f'"{self.schema}"'

    def scrub(self, text: str) -> str:
        """``text`` with every secret of this configuration replaced by ``***``."""
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def _convert(name: str, value: object) -> Any:
    """One of our options, converted from URL text where needed, and checked."""
    if name == "schema":
        return check_schema(value)
    if name == "timeout":
        seconds = value
        if isinstance(value, str):
            try:
                seconds = float(value)
            except ValueError:
                raise ConfigurationError(f"timeout must be a number of seconds, got {shown(value)}") from None
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise ConfigurationError(f"timeout must be a number of seconds > 0, got {seconds!r:.40}")
        return float(seconds)
    # max_connections
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ConfigurationError(f"max_connections must be an int from 1 to 1000, got {value!r:.40}")
    return value


def _libpq_check(conninfo: str, url: str) -> dict[str, Any]:
    """The connection parameters as libpq reads them; a clear error for one it does not know."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(conninfo)
    except ProgrammingError as exc:
        # libpq's message names the bad parameter; it never repeats a password, but scrub anyway.
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        accepted = "; ".join(f"{key} ({meaning})" for key, meaning in OPTIONS.items())
        raise ConfigurationError(
            f"PostgreSQL URL {shown_url(url)} is not usable: {message[:200]}. Our options: {accepted}; "
            "any other query parameter must be a libpq connection parameter (sslmode, "
            "application_name, connect_timeout, ...)"
        ) from None


def parse_postgres_url(url: str, **options: Any) -> PostgresConfig:
    """Check ``url`` and the keyword options of ``open_postgres``; a keyword wins over the URL.

    A keyword that is not one of :data:`OPTIONS` is passed to libpq as a connection parameter
    (``sslmode="require"``, ``application_name="billing"``).
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a PostgreSQL URL must be a str, got {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ConfigurationError(
            f"{shown_url(url)} is not a PostgreSQL URL: use postgresql://user:password@host:5432/database"
            "[?schema=iron&sslmode=require]"
        )
    body, _, query = rest.partition("?")
    ours: dict[str, Any] = {}
    passed: list[tuple[str, str]] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in OPTIONS:
            ours[key] = value
        else:
            passed.append((key, value))
    for key, value in options.items():
        if key in OPTIONS:
            ours[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ConfigurationError(
                    f"PostgreSQL option {key[:32]!r} must be a str or a number, got {type(value).__name__}"
                )
            passed = [(k, v) for k, v in passed if k != key] + [(key, str(value))]
    schema = _convert("schema", ours.get("schema", DEFAULT_SCHEMA))
    timeout = _convert("timeout", ours.get("timeout", DEFAULT_TIMEOUT))
    max_connections = _convert("max_connections", ours.get("max_connections", DEFAULT_MAX_CONNECTIONS))
    names = {key for key, _ in passed}
    if "connect_timeout" not in names:
        # libpq counts whole seconds, and at least 2 (a smaller value is raised to 2).
        passed.append(("connect_timeout", str(max(2, math.ceil(timeout)))))
    if "application_name" not in names:
        passed.append(("application_name", "iron-runtime-state"))
    conninfo = f"postgresql://{body}?{urlencode(passed)}"
    params = _libpq_check(conninfo, url)
    # The secrets as libpq reads them and as the URL spells them (percent-escaped).
    raw = [str(params[key]) for key in _SECRETS if params.get(key)]
    secrets = tuple(dict.fromkeys(raw + [quote(secret, safe="") for secret in raw]))
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    target = f"{host}:{params.get('port') or 5432}/{params.get('dbname') or params.get('user') or ''}"
    shown_query = [("schema", schema)] + [
        (key, "***" if key in _SECRETS else value)
        for key, value in passed
        if key in names  # the parameters given, not the defaults added above
    ]
    netloc = body.partition("/")[0]
    path = body[len(netloc) :]
    at = netloc.rfind("@")
    if at >= 0:
        user, colon, _ = netloc[:at].partition(":")
        netloc = user + (":***" if colon else "") + netloc[at:]
    masked = f"{scheme.lower()}://{netloc}{path}?" + "&".join(
        f"{k}={quote(v, safe='*')}" for k, v in shown_query
    )
    return PostgresConfig(
        conninfo=conninfo,
        url=masked,
        schema=schema,
        timeout=timeout,
        max_connections=max_connections,
        target=target,
        secrets=secrets,
    )
