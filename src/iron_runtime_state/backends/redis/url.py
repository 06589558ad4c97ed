"""Where and how to reach Redis: URLs, options, namespaces, TLS settings; no connection is made here.

:func:`parse_redis_url` turns a URL and ``open_redis``'s keyword options into a
:class:`RedisConfig`; every option is checked here, once, for both drivers.

An error about a URL shows it through :func:`shown_url`: the password (in the user info, or
given as ``?password=``) replaced by ``***`` and the whole cut to :data:`SHOWN_INPUT`
characters, and repeats no other piece of it; no error repeats more than that much of any input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote

from ...config import DEFAULT_NAMESPACE
from ...errors import ConfigurationError
from ..urls import SHOWN_INPUT, shown, shown_url

__all__ = [
    "DEFAULT_NAMESPACE",
    "DURABILITY_MODES",
    "OPTIONS",
    "SHOWN_INPUT",
    "Node",
    "RedisConfig",
    "address",
    "check_namespace",
    "parse_redis_url",
    "shown_url",
]

#: A server: host and port.
Node = tuple[str, int]

DEFAULT_PORT: Final = 6379
#: ``durability=`` settings: what a write waits for before the call returns (see .durability).
DURABILITY_MODES: Final = ("async", "replicated", "aof")

_NAMESPACE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")

#: Options accepted by ``open_redis`` (as keywords, or in the URL's query string), with their
#: meaning for the error message that lists them.
OPTIONS: Final[Mapping[str, str]] = {
    "namespace": "key prefix isolating this fleet from others on the same server",
    "timeout": "seconds a call may take in all, retries included (default 5)",
    "socket_timeout": "seconds to wait for one reply (default min(2, timeout / 2))",
    "socket_connect_timeout": "seconds to wait for a connection (default min(1, timeout / 2))",
    "username": "ACL user (overrides the URL's)",
    "password": "password (overrides the URL's)",
    "db": "database number (standalone only)",
    "max_connections": "connections per server in the pool (default 100)",
    "client_name": "name shown by CLIENT LIST",
    "ssl": "use TLS (implied by rediss://)",
    "ssl_ca_certs": "CA bundle file to verify the server",
    "ssl_ca_path": "directory of CA certificates",
    "ssl_certfile": "client certificate file (mutual TLS)",
    "ssl_keyfile": "client private key file",
    "ssl_password": "password of the client private key",
    "ssl_cert_reqs": "'required' (default), 'optional' or 'none'",
    "ssl_check_hostname": "check the server's name against its certificate (default true)",
    "durability": "what a write waits for: 'async' (default), 'replicated' or 'aof'",
    "replicas": "replicas a write must reach: with 'replicated' (default 1) or 'aof' (default 0)",
    "allow_eviction": "accept a server whose maxmemory-policy may evict keys (default false)",
}
_FLOAT_OPTIONS: Final = frozenset({"timeout", "socket_timeout", "socket_connect_timeout"})
#: Integer options and their smallest value.
_INT_OPTIONS: Final = {"db": 0, "max_connections": 1, "replicas": 0}
_BOOL_OPTIONS: Final = frozenset({"ssl", "ssl_check_hostname", "allow_eviction"})
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_CERT_REQS: Final = ("required", "optional", "none")
_OPTION_NAME_RE: Final = re.compile(r"[A-Za-z0-9_]{1,32}")
_SCHEME_EXAMPLES: Final = (
    "redis://[user:password@]host[:port][/db]",
    "rediss://[user:password@]host[:port][/db]",
    "unix://[user:password@]/path/to/redis.sock[?db=N]",
    "redis+cluster://[user:password@]host:port[,host:port...]",
)


@dataclass(frozen=True)
class RedisConfig:
    """Where and how to connect, parsed from a URL and options; no connection is made here."""

    scheme: str
    namespace: str
    nodes: tuple[Node, ...] = ()  # TCP servers: one, or a cluster's seed nodes
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    ssl_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    timeout: float = 5.0
    socket_timeout: float = 2.0
    socket_connect_timeout: float = 1.0
    max_connections: int = 100
    client_name: str | None = None
    durability: str = "async"
    replicas: int = 0  # how many replicas a write must reach (durability "replicated" or "aof")
    allow_eviction: bool = False

    @property
    def cluster(self) -> bool:
        """Whether this is a Redis Cluster (``redis+cluster://``)."""
        return self.scheme == "redis+cluster"

    @property
    def masked_url(self) -> str:
        """The URL with the password replaced by ``***`` and the namespace spelled out."""
        auth = ""
        if self.username or self.password:
            auth = quote(self.username or "", safe="") + (":***" if self.password else "") + "@"
        query = f"?namespace={self.namespace}"
        if self.unix_path is not None:
            db = f"&db={self.db}" if self.db else ""
            return f"unix://{auth}{self.unix_path}{query}{db}"
        hosts = ",".join(address(node) for node in self.nodes)
        path = "" if self.cluster else f"/{self.db}"
        return f"{self.scheme}://{auth}{hosts}{path}{query}"

    @property
    def connection_kind(self) -> str:
        """``"unix"``, ``"ssl"`` or ``"tcp"``: which redis-py connection class to use."""
        if self.unix_path is not None:
            return "unix"
        return "ssl" if self.ssl else "tcp"

    def connection_kwargs(self, node: Node | None = None) -> dict[str, Any]:
        """Keyword arguments for a redis-py connection (pool) to ``node`` (or the one server).

        redis-py's own retries stay off: the backend retries only what is safe to repeat.
        """
        kwargs: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "client_name": self.client_name,
        }
        if self.unix_path is not None:
            kwargs["path"] = self.unix_path
        else:
            host, port = node if node is not None else self.nodes[0]
            kwargs["host"] = host
            kwargs["port"] = port
            if self.ssl:
                kwargs.update(self.ssl_options)
        return kwargs


def address(node: Node) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_namespace(namespace: object) -> str:
    """``namespace`` if it is a valid key prefix: 1 to 64 of ``A-Z a-z 0-9 _ . : -``."""
    if not isinstance(namespace, str):
        raise ConfigurationError(f"namespace must be a str, got {type(namespace).__name__}")
    if _NAMESPACE_RE.fullmatch(namespace) is None:
        raise ConfigurationError(
            f"namespace {shown(namespace)} is invalid: use 1 to 64 characters of letters, digits "
            "and _ . : -, starting with a letter or digit (braces would break Redis Cluster hash tags)"
        )
    return namespace


def _option_error(name: str, url: str | None = None) -> ConfigurationError:
    """An unknown option; ``url`` when it came from that URL's query string."""
    accepted = "; ".join(f"{key} ({meaning})" for key, meaning in OPTIONS.items())
    if url is not None and _OPTION_NAME_RE.fullmatch(name) is None:
        # Not a name at all: maybe the tail of a password with a raw '?'. Show the masked URL.
        return ConfigurationError(f"unknown Redis option in {shown_url(url)}; accepted options: {accepted}")
    return ConfigurationError(f"unknown Redis option {shown(name, 32)}; accepted options: {accepted}")


def _convert(name: str, value: object) -> object:
    """An option value, converted from URL text where needed, and type-checked."""
    if name in _FLOAT_OPTIONS:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigurationError(
                    f"Redis option {name} must be a number, got {shown(value, 32)}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"Redis option {name} must be a number, got {type(value).__name__}")
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
        if not (0.0 < seconds < math.inf):
            raise ConfigurationError(
                f"Redis option {name} must be finite and > 0 seconds, got {shown(value, 32)}"
            )
        return seconds
    if name in _INT_OPTIONS:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigurationError(
                    f"Redis option {name} must be an integer, got {shown(value, 32)}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"Redis option {name} must be an int, got {type(value).__name__}")
        if value < _INT_OPTIONS[name]:
            raise ConfigurationError(f"Redis option {name} is out of range: {shown(value, 32)}")
        return value
    if name in _BOOL_OPTIONS:
        if isinstance(value, str):
            text = value.lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ConfigurationError(f"Redis option {name} must be true or false, got {shown(value, 32)}")
        if not isinstance(value, bool):
            raise ConfigurationError(f"Redis option {name} must be a bool, got {type(value).__name__}")
        return value
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"Redis option {name} must be a str, got {type(value).__name__}")
    for choice_name, choices in (("ssl_cert_reqs", _CERT_REQS), ("durability", DURABILITY_MODES)):
        if name == choice_name and value not in choices:
            raise ConfigurationError(
                f"Redis option {name} must be one of {', '.join(map(repr, choices))}, got {shown(value, 32)}"
            )
    return value


def _optional_str(value: object) -> str | None:
    assert value is None or isinstance(value, str)
    return value


def _float(value: object) -> float:
    assert isinstance(value, float)
    return value


def _parse_port(text: str, url: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ConfigurationError(
            f"bad port in Redis URL {shown_url(url)}: use host:port, with a port from 1 to 65535"
        )
    return port


def _parse_hosts(netloc: str, url: str) -> tuple[Node, ...]:
    nodes: list[Node] = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [ipv6]:port
            end = part.find("]")
            if end < 0:
                raise ConfigurationError(f"unclosed '[' in Redis URL {shown_url(url)}")
            host, rest = part[1:end], part[end + 1 :]
            port = _parse_port(rest[1:], url) if rest.startswith(":") else DEFAULT_PORT
        elif part.count(":") == 1:
            host, _, port_text = part.partition(":")
            port = _parse_port(port_text, url)
        else:
            host, port = part, DEFAULT_PORT
        if not host:
            raise ConfigurationError(f"missing host in Redis URL {shown_url(url)}")
        nodes.append((unquote(host), port))
    return tuple(nodes)


def _durability(settings: dict[str, object]) -> tuple[str, int]:
    """The ``durability`` and ``replicas`` options, checked together."""
    durability = settings.pop("durability", "async")
    replicas = settings.pop("replicas", None)
    assert isinstance(durability, str)
    if replicas is None:
        return durability, 1 if durability == "replicated" else 0
    assert isinstance(replicas, int)
    if durability == "async":
        raise ConfigurationError(
            "Redis option replicas applies to durability='replicated' or 'aof'; with durability='async' "
            "(the default) a write waits for no replica"
        )
    if durability == "replicated" and replicas < 1:
        raise ConfigurationError("durability='replicated' needs replicas >= 1 (the default is 1)")
    return durability, replicas


def parse_redis_url(url: str, *, namespace: str | None = None, **options: object) -> RedisConfig:
    """The connection settings for a Redis URL and ``open_redis``'s options.

    ``?namespace=`` in the URL and the ``namespace`` keyword must agree when both are given
    (the keyword's default, ``"iron"``, yields to the URL). Other query parameters are the same
    options as the keywords; a keyword wins over the query. An option given twice in the query
    is an error.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a Redis URL must be a str, got {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("redis", "rediss", "unix", "redis+cluster"):
        raise ConfigurationError(
            f"{shown_url(url)} is not a Redis URL; use one of: {', '.join(_SCHEME_EXAMPLES)}"
        )
    rest = rest.partition("#")[0]
    rest, _, query_text = rest.partition("?")
    settings: dict[str, object] = {}
    for key, text in parse_qsl(query_text, keep_blank_values=True):
        if key not in OPTIONS:
            raise _option_error(key, url)
        if key in settings:
            raise ConfigurationError(
                f"Redis option {key} is given twice in the URL {shown_url(url)}; keep one of them"
            )
        settings[key] = text
    url_namespace = settings.pop("namespace", None)
    for key, given in options.items():
        if key not in OPTIONS or key == "namespace":
            raise _option_error(key)
        settings[key] = given
    settings = {key: _convert(key, value) for key, value in settings.items()}

    if url_namespace is not None and namespace not in (None, DEFAULT_NAMESPACE, url_namespace):
        raise ConfigurationError(
            f"namespace given twice: {shown(namespace, 28)} as a keyword and {shown(url_namespace, 28)} "
            "in the URL; keep one of them"
        )
    chosen = url_namespace if url_namespace is not None else namespace
    ns = check_namespace(DEFAULT_NAMESPACE if chosen is None else chosen)

    # user:password@ comes before the last '@' of the authority (or of the unix path's start).
    authority, slash, path = rest.partition("/")
    if scheme == "unix":
        path = slash + path
    userinfo, at, hostpart = authority.rpartition("@")
    if not at:
        hostpart = authority
    username: str | None = None
    password: str | None = None
    if userinfo:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
    if "username" in settings:
        username = _optional_str(settings.pop("username"))
    if "password" in settings:
        password = _optional_str(settings.pop("password"))

    db = settings.pop("db", 0)
    assert isinstance(db, int)
    nodes: tuple[Node, ...] = ()
    unix_path: str | None = None
    if scheme == "unix":
        if hostpart:
            raise ConfigurationError(
                f"unix:// URL {shown_url(url)} has a host; write unix:///absolute/path/to/redis.sock"
            )
        unix_path = unquote(path)
        if not unix_path or unix_path == "/":
            raise ConfigurationError(f"unix:// URL {shown_url(url)} has no socket path")
    else:
        nodes = _parse_hosts(hostpart or "localhost", url)
        if not nodes:
            raise ConfigurationError(f"no host in Redis URL {shown_url(url)}")
        if scheme != "redis+cluster" and len(nodes) > 1:
            raise ConfigurationError(
                f"{scheme}:// takes one host; for several Redis Cluster nodes use "
                "redis+cluster://host:port,host:port"
            )
        db_text = path.strip("/")
        if db_text:
            try:
                db = int(db_text)
            except ValueError:
                raise ConfigurationError(
                    f"bad database in Redis URL {shown_url(url)}: the path is a number, as in /0"
                ) from None
    if scheme == "redis+cluster" and db != 0:
        raise ConfigurationError("Redis Cluster has only database 0; remove the /db from the URL")
    if db < 0:
        raise ConfigurationError(f"the Redis database number must be >= 0, got {shown(db, 32)}")

    ssl = bool(settings.pop("ssl", scheme == "rediss"))
    if scheme == "rediss" and not ssl:
        raise ConfigurationError("rediss:// always uses TLS; use redis:// for a plain connection")
    if scheme == "unix" and ssl:
        raise ConfigurationError("TLS does not apply to unix:// sockets")
    ssl_options = {key: settings.pop(key) for key in list(settings) if key.startswith("ssl_")}
    if ssl_options and not ssl:
        raise ConfigurationError(
            f"TLS options {sorted(ssl_options)} need a TLS connection: use rediss:// (or ssl=True "
            "with redis+cluster://)"
        )

    timeout = _float(settings.pop("timeout", 5.0))
    socket_timeout = _float(settings.pop("socket_timeout", min(2.0, timeout / 2)))
    connect_timeout = _float(settings.pop("socket_connect_timeout", min(1.0, timeout / 2)))
    for name, seconds in (("socket_timeout", socket_timeout), ("socket_connect_timeout", connect_timeout)):
        if seconds > timeout:
            raise ConfigurationError(
                f"{name} ({seconds:g} s) must not exceed timeout ({timeout:g} s), the bound on a whole "
                "call; raise timeout or lower it"
            )
    durability, replicas = _durability(settings)
    max_connections = settings.pop("max_connections", 100)
    client_name = settings.pop("client_name", None)
    allow_eviction = settings.pop("allow_eviction", False)
    assert isinstance(max_connections, int)
    assert client_name is None or isinstance(client_name, str)
    assert isinstance(allow_eviction, bool)
    assert not settings, settings
    return RedisConfig(
        scheme=scheme,
        namespace=ns,
        nodes=nodes,
        unix_path=unix_path,
        db=db,
        username=username,
        password=password,
        ssl=ssl,
        ssl_options=ssl_options,
        timeout=timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        max_connections=max_connections,
        client_name=client_name,
        durability=durability,
        replicas=replicas,
        allow_eviction=allow_eviction,
    )
