"""The Redis backend's data model, with no I/O: URLs, key layout, encodings and Lua scripts.

Everything here is plain computation, shared by the synchronous backend (``redis.py``) and any
asyncio one: a backend only sends what this module builds and hands the replies back to it.

Key layout of one namespace ``ns`` (what an operator sees with ``redis-cli``)::

    ns:meta                            hash    layout version and slot-group count
    ns:{ns:g<G>}:agent:<agent_id>      hash    status, budget_spent, pii_detections,
                                               budget_limit (absent: no limit), changed_at
    ns:{ns:g<G>}:holds:<agent_id>      zset    open reservations "<reservation_id>:<amount>",
                                               scored by expiry (Unix seconds, server clock)
    ns:{ns:g<G>}:stats                 hash    the group's running/stopped/failed counts,
                                               budget_spent and pii_detections totals
    ns:{ns:g<G>}:ids                   zset    the group's agent ids (score 0: walked by name)
    ns:{ns:g<G>}:finished              zset    stopped and failed agents, scored by last change
    ns:{ns:audit}:log                  stream  the audit trail; entry id "<seq>-0"
    ns:{ns:audit}:head                 hash    seq and hash of the newest record ever appended,
                                               anchor_seq and anchor_hash after a prune
    ns:{ns:audit}:by_agent:<agent_id>  zset    seqs of one agent's records
    ns:{ns:audit}:by_type:<event_type> zset    seqs of one event type's records
    ns:{ns:audit}:indexes              set     the index keys above, for cleanup after a prune

An agent belongs to one of :data:`GROUPS` slot groups, fixed by its UUID. The part in braces is
the Redis Cluster hash tag, so an agent's keys and its group's aggregates share one slot and one
Lua script updates them together; groups spread over the masters of a cluster. ``stats()`` sums
the groups' small ``stats`` hashes and never reads an agent. The audit trail and its indexes
share a slot of their own.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qsl, quote, unquote

from ..audit_chain import GENESIS_HASH, AuditChain, AuditRow
from ..errors import AgentNotFound, AgentNotRunning, ConfigurationError, ReservationError, SchemaError
from ..ids import AgentId
from ..models import (
    LIMIT_TOLERANCE,
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    FleetStats,
    Reservation,
)
from .base import CommitResult, SpendResult

__all__ = [
    "DEFAULT_NAMESPACE",
    "GROUPS",
    "LAYOUT_VERSION",
    "OPTIONS",
    "STATS_FIELDS",
    "GroupWalk",
    "RedisConfig",
    "RedisLayout",
    "Routed",
    "Script",
    "ScriptCall",
    "check_namespace",
    "decode_agent_id",
    "decode_audit_row",
    "decode_commit",
    "decode_head",
    "decode_pii",
    "decode_query_rows",
    "decode_reserve",
    "decode_reserved",
    "decode_spend",
    "decode_state",
    "decode_stats",
    "decode_status",
    "key_slot",
    "load_scripts",
    "parse_cluster_slots",
    "parse_redis_url",
    "reservation_error",
    "row_to_record",
    "seal_batch",
]

#: Version of the key layout; stored in ``<namespace>:meta`` and checked on first use.
LAYOUT_VERSION: Final = 1
#: Slot groups per namespace (a power of two). Fixed for the life of a namespace.
GROUPS: Final = 256
DEFAULT_NAMESPACE: Final = "iron"
CLUSTER_SLOTS: Final = 16384
DEFAULT_PORT: Final = 6379

_NAMESPACE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_STATUS: Final = {s.value.encode(): s for s in AgentStatus}
_FIELDS: Final = ("status", "budget_spent", "pii_detections", "budget_limit")

# -- configuration ------------------------------------------------------------------------------

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
}
_FLOAT_OPTIONS: Final = frozenset({"timeout", "socket_timeout", "socket_connect_timeout"})
_INT_OPTIONS: Final = frozenset({"db", "max_connections"})
_BOOL_OPTIONS: Final = frozenset({"ssl", "ssl_check_hostname"})
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_CERT_REQS: Final = ("required", "optional", "none")
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
    nodes: tuple[tuple[str, int], ...] = ()  # TCP servers: one, or a cluster's seed nodes
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
        hosts = ",".join(_host_port(host, port) for host, port in self.nodes)
        path = "" if self.cluster else f"/{self.db}"
        return f"{self.scheme}://{auth}{hosts}{path}{query}"

    @property
    def connection_kind(self) -> str:
        """``"unix"``, ``"ssl"`` or ``"tcp"``: which redis-py connection class to use."""
        if self.unix_path is not None:
            return "unix"
        return "ssl" if self.ssl else "tcp"

    def connection_kwargs(self, node: tuple[str, int] | None = None) -> dict[str, Any]:
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


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_namespace(namespace: object) -> str:
    """``namespace`` if it is a valid key prefix: 1 to 64 of ``A-Z a-z 0-9 _ . : -``."""
    if not isinstance(namespace, str):
        raise ConfigurationError(f"namespace must be a str, got {type(namespace).__name__}")
    if _NAMESPACE_RE.fullmatch(namespace) is None:
        raise ConfigurationError(
            f"namespace {namespace[:64]!r} is invalid: use 1 to 64 characters of letters, digits "
            "and _ . : -, starting with a letter or digit (braces would break Redis Cluster hash tags)"
        )
    return namespace


def _option_error(name: str) -> ConfigurationError:
    accepted = "; ".join(f"{key} ({meaning})" for key, meaning in OPTIONS.items())
    return ConfigurationError(f"unknown Redis option {name[:64]!r}; accepted options: {accepted}")


def _convert(name: str, value: object) -> object:
    """An option value, converted from URL text where needed, and type-checked."""
    if name in _FLOAT_OPTIONS:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigurationError(f"Redis option {name} must be a number, got {value!r:.40}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"Redis option {name} must be a number, got {type(value).__name__}")
        if not (0.0 < float(value) < math.inf):
            raise ConfigurationError(f"Redis option {name} must be finite and > 0 seconds, got {value!r}")
        return float(value)
    if name in _INT_OPTIONS:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigurationError(
                    f"Redis option {name} must be an integer, got {value!r:.40}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"Redis option {name} must be an int, got {type(value).__name__}")
        if value < (1 if name == "max_connections" else 0):
            raise ConfigurationError(f"Redis option {name} is out of range: {value}")
        return value
    if name in _BOOL_OPTIONS:
        if isinstance(value, str):
            text = value.lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ConfigurationError(f"Redis option {name} must be true or false, got {value[:32]!r}")
        if not isinstance(value, bool):
            raise ConfigurationError(f"Redis option {name} must be a bool, got {type(value).__name__}")
        return value
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"Redis option {name} must be a str, got {type(value).__name__}")
    if name == "ssl_cert_reqs" and value not in _CERT_REQS:
        raise ConfigurationError(f"Redis option ssl_cert_reqs must be one of {_CERT_REQS}, got {value!r}")
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
        raise ConfigurationError(f"bad port {text[:16]!r} in Redis URL {url[:80]!r}; use host:port")
    return port


def _parse_hosts(netloc: str, url: str) -> tuple[tuple[str, int], ...]:
    nodes: list[tuple[str, int]] = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [ipv6]:port
            end = part.find("]")
            if end < 0:
                raise ConfigurationError(f"unclosed '[' in Redis URL {url[:80]!r}")
            host, rest = part[1:end], part[end + 1 :]
            port = _parse_port(rest[1:], url) if rest.startswith(":") else DEFAULT_PORT
        elif part.count(":") == 1:
            host, _, port_text = part.partition(":")
            port = _parse_port(port_text, url)
        else:
            host, port = part, DEFAULT_PORT
        if not host:
            raise ConfigurationError(f"missing host in Redis URL {url[:80]!r}")
        nodes.append((unquote(host), port))
    return tuple(nodes)


def parse_redis_url(url: str, *, namespace: str | None = None, **options: object) -> RedisConfig:
    """The connection settings for a Redis URL and ``open_redis``'s options.

    ``?namespace=`` in the URL and the ``namespace`` keyword must agree when both are given
    (the keyword's default, ``"iron"``, yields to the URL). Other query parameters are the same
    options as the keywords; a keyword wins over the query.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a Redis URL must be a str, got {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("redis", "rediss", "unix", "redis+cluster"):
        raise ConfigurationError(
            f"{url[:80]!r} is not a Redis URL; use one of: {', '.join(_SCHEME_EXAMPLES)}"
        )
    rest = rest.partition("#")[0]
    rest, _, query_text = rest.partition("?")
    settings: dict[str, object] = {}
    for key, text in parse_qsl(query_text, keep_blank_values=True):
        if key not in OPTIONS:
            raise _option_error(key)
        settings[key] = text
    url_namespace = settings.pop("namespace", None)
    for key, given in options.items():
        if key not in OPTIONS or key == "namespace":
            raise _option_error(key)
        settings[key] = given
    settings = {key: _convert(key, value) for key, value in settings.items()}

    if url_namespace is not None and namespace not in (None, DEFAULT_NAMESPACE, url_namespace):
        raise ConfigurationError(
            f"namespace given twice: {namespace!r} as a keyword and {url_namespace!r} in the URL; "
            "keep one of them"
        )
    chosen = url_namespace if url_namespace is not None else namespace
    ns = check_namespace(DEFAULT_NAMESPACE if chosen is None else chosen)

    # user:password@ comes before the last '@' of the authority (or of the unix path's start).
    if scheme == "unix":
        authority, slash, path = rest.partition("/")
        path = slash + path
    else:
        authority, slash, path = rest.partition("/")
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
    nodes: tuple[tuple[str, int], ...] = ()
    unix_path: str | None = None
    if scheme == "unix":
        if hostpart:
            raise ConfigurationError(
                f"unix:// URL {url[:80]!r} has a host; write unix:///absolute/path/to/redis.sock"
            )
        unix_path = unquote(path)
        if not unix_path or unix_path == "/":
            raise ConfigurationError(f"unix:// URL {url[:80]!r} has no socket path")
    else:
        nodes = _parse_hosts(hostpart or "localhost", url)
        if not nodes:
            raise ConfigurationError(f"no host in Redis URL {url[:80]!r}")
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
                    f"bad database {db_text[:16]!r} in Redis URL {url[:80]!r}; the path is a number, as in /0"
                ) from None
    if scheme == "redis+cluster" and db != 0:
        raise ConfigurationError("Redis Cluster has only database 0; remove the /db from the URL")
    if db < 0:
        raise ConfigurationError(f"the Redis database number must be >= 0, got {db}")

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
    max_connections = settings.pop("max_connections", 100)
    client_name = settings.pop("client_name", None)
    assert isinstance(max_connections, int)
    assert client_name is None or isinstance(client_name, str)
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
    )


# -- Redis Cluster --------------------------------------------------------------------------------


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster slot of a key (CRC16 of its hash tag, or of the whole key)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % CLUSTER_SLOTS


def parse_cluster_slots(reply: Sequence[Any], asked_host: str) -> list[tuple[int, int, str, int]]:
    """``(first slot, last slot, host, port)`` of each master from a ``CLUSTER SLOTS`` reply.

    An empty host means the node that was asked (as Redis reports when it does not know its own
    address).
    """
    ranges: list[tuple[int, int, str, int]] = []
    for entry in reply:
        first, last, master = int(entry[0]), int(entry[1]), entry[2]
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        if not host or host == "?":
            host = asked_host
        ranges.append((first, last, host, int(master[1])))
    return ranges


# -- scripts --------------------------------------------------------------------------------------

SCRIPT_NAMES: Final = (
    "save",
    "remove",
    "record_spend",
    "record_pii",
    "set_status",
    "reserve",
    "commit",
    "release",
    "reserved",
    "purge",
    "meta",
    "append_audit",
    "query_audit",
    "prune_audit",
    "prune_indexes",
)


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script as sent to Redis: the shared prelude followed by the script's own file."""

    name: str
    source: str
    sha: str


_DEFINITION_RE: Final = re.compile(r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _prelude_blocks(prelude: str) -> list[tuple[str, str]]:
    """The prelude's top-level definitions as ``(name, text)``, each with its comment."""
    blocks: list[tuple[str, str]] = []
    for chunk in re.split(r"\n\s*\n", prelude):
        found = _DEFINITION_RE.search(chunk)
        if found is not None:
            blocks.append((found.group(1), chunk.strip("\n")))
    return blocks


def _assemble(blocks: list[tuple[str, str]], body: str) -> str:
    """The prelude definitions that ``body`` uses (directly or through each other), then ``body``.

    Each helper in a script is a closure made on every call, so a script carries only the
    helpers it needs.
    """
    defined = {name for name, _ in blocks}
    needed: set[str] = set()
    pending = set(_NAME_RE.findall(body)) & defined
    texts = dict(blocks)
    while pending:
        name = pending.pop()
        needed.add(name)
        pending |= (set(_NAME_RE.findall(texts[name])) & defined) - needed - {name}
    parts = [text for name, text in blocks if name in needed]
    return "\n\n".join([*parts, body])


@functools.cache
def load_scripts() -> dict[str, Script]:
    """Every script of ``backends/lua/``, with the prelude helpers it uses and their constants."""
    folder = resources.files("iron_runtime_state.backends").joinpath("lua")
    prelude = folder.joinpath("_prelude.lua").read_text(encoding="utf-8")
    for placeholder, value in (
        ("__LIMIT_TOLERANCE__", repr(LIMIT_TOLERANCE)),
        ("__GENESIS_HASH__", GENESIS_HASH),
    ):
        if placeholder not in prelude:  # pragma: no cover - a broken package
            raise SchemaError(f"backends/lua/_prelude.lua lacks {placeholder}")
        prelude = prelude.replace(placeholder, value)
    blocks = _prelude_blocks(prelude)
    scripts: dict[str, Script] = {}
    for name in SCRIPT_NAMES:
        body = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        source = _assemble(blocks, f"-- {name}.lua\n{body}")
        scripts[name] = Script(name, source, hashlib.sha1(source.encode()).hexdigest())
    return scripts


class ScriptCall(NamedTuple):
    """One script to run: where (the slot of its keys), with which keys and arguments."""

    script: Script
    slot: int
    keys: Sequence[str]
    args: Sequence[str | int | float | bytes]

    def command(self) -> tuple[Any, ...]:
        """The ``EVALSHA`` command."""
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)

    def eval_command(self) -> tuple[Any, ...]:
        """The ``EVAL`` command, for a server that does not have the script cached yet."""
        return ("EVAL", self.script.source, len(self.keys), *self.keys, *self.args)


# -- the layout of one namespace --------------------------------------------------------------------


def _text(value: bytes) -> str:
    return value.decode("utf-8")


def decode_agent_id(value: bytes | str) -> AgentId:
    """An agent id read back from the store (a ``SchemaError`` if someone stored garbage)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    try:
        return AgentId.parse(text)
    except ValueError:
        raise SchemaError(f"the store holds {text[:64]!r} where an agent id belongs") from None


def decode_state(agent_id: AgentId, reply: Sequence[Any], at: int = 0) -> AgentState | None:
    """The state in ``reply[at:at + 4]`` (status, budget_spent, pii_detections, budget_limit).

    ``None`` when the status is missing (no such agent). A missing or empty limit is no limit.
    """
    status = reply[at]
    if status is None:
        return None
    limit = reply[at + 3]
    try:
        return AgentState._trusted(
            agent_id,
            _STATUS[status],
            float(reply[at + 1]),
            int(reply[at + 2]),
            float(limit) if limit else None,
        )
    except (KeyError, TypeError, ValueError):
        raise SchemaError(
            f"agent {agent_id} has unreadable fields in Redis: {[reply[at + i] for i in range(4)]!r:.200}"
        ) from None


def _state(agent_id: AgentId, reply: Sequence[Any], at: int) -> AgentState:
    state = decode_state(agent_id, reply, at)
    assert state is not None
    return state


def _not_running(agent_id: AgentId, status: bytes, action: str) -> AgentNotRunning:
    return AgentNotRunning(agent_id.as_str(), status.decode("utf-8", "replace"), action)


def decode_spend(agent_id: AgentId, reply: Sequence[Any]) -> SpendResult:
    """What ``record_spend.lua`` did."""
    code = reply[0]
    if code == 1:
        return SpendResult(_state(agent_id, reply, 1), reserved=float(reply[5]))
    if code == 0:
        return SpendResult(_state(agent_id, reply, 1), exceeded=True, reserved=float(reply[5]))
    if code == -2:
        raise _not_running(agent_id, reply[1], "record spend")
    raise AgentNotFound(agent_id.as_str())


def decode_reserve(
    agent_id: AgentId, amount: float, reservation_id: str, reply: Sequence[Any]
) -> Reservation | SpendResult:
    """What ``reserve.lua`` did."""
    code = reply[0]
    if code == 1:
        return Reservation(reservation_id, agent_id, amount, float(reply[1]))
    if code == 0:
        return SpendResult(_state(agent_id, reply, 1), exceeded=True, reserved=float(reply[5]))
    if code == -2:
        raise _not_running(agent_id, reply[1], "reserve budget")
    raise AgentNotFound(agent_id.as_str())


def reservation_error(reservation: Reservation, action: str) -> ReservationError:
    """The error for settling a hold that is not open (the memory backend's wording)."""
    return ReservationError(
        f"cannot {action} reservation {reservation.reservation_id}: it is not open "
        "(already committed or released, expired after its ttl, or its agent was "
        "removed); if money was spent after the hold expired, record it with record_spend"
    )


def decode_commit(reservation: Reservation, reply: Sequence[Any]) -> CommitResult:
    """What ``commit.lua`` did."""
    code = reply[0]
    if code == -3:
        raise reservation_error(reservation, "commit")
    if code == -1:
        raise AgentNotFound(reservation.agent_id.as_str())
    return CommitResult(_state(reservation.agent_id, reply, 1), exceeded=code == 1)


def decode_reserved(agent_id: AgentId, reply: Sequence[Any]) -> tuple[AgentState, float]:
    """What ``reserved.lua`` read."""
    if reply[0] != 1:
        raise AgentNotFound(agent_id.as_str())
    return _state(agent_id, reply, 1), float(reply[5])


def decode_status(agent_id: AgentId, reply: Sequence[Any]) -> tuple[AgentStatus, AgentState]:
    """What ``set_status.lua`` did: the old status and the new state."""
    if reply[0] != 1:
        raise AgentNotFound(agent_id.as_str())
    try:
        old = _STATUS[reply[1]]
    except KeyError:
        raise SchemaError(f"agent {agent_id} has an unknown status {reply[1]!r:.40} in Redis") from None
    return old, _state(agent_id, reply, 2)


def decode_pii(agent_id: AgentId, reply: Sequence[Any]) -> AgentState:
    """What ``record_pii.lua`` did."""
    if reply[0] != 1:
        raise AgentNotFound(agent_id.as_str())
    return _state(agent_id, reply, 1)


def decode_audit_row(entry_id: bytes, fields: Mapping[bytes, bytes] | Sequence[bytes]) -> AuditRow:
    """An audit stream entry (its id ``<seq>-0`` and fields) as a plain row."""
    if not isinstance(fields, Mapping):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    try:
        return (
            int(entry_id.partition(b"-")[0]),
            _text(fields[b"agent_id"]),
            _text(fields[b"event_type"]),
            int(fields[b"timestamp"]),
            _text(fields[b"details"]),
            _text(fields[b"prev_hash"]),
            _text(fields[b"hash"]),
        )
    except (KeyError, ValueError):
        raise SchemaError(
            f"audit entry {entry_id!r:.40} lacks a field or holds an unreadable one; "
            "every entry has agent_id, event_type, timestamp, details, prev_hash and hash"
        ) from None


def decode_query_rows(reply: Sequence[Any]) -> list[AuditRow]:
    """The records in a ``query_audit.lua`` reply (after its two header values)."""
    rows: list[AuditRow] = []
    for i in range(2, len(reply), 7):
        try:
            rows.append(
                (
                    int(reply[i].partition(b"-")[0]),
                    _text(reply[i + 1]),
                    _text(reply[i + 2]),
                    int(reply[i + 3]),
                    _text(reply[i + 4]),
                    _text(reply[i + 5]),
                    _text(reply[i + 6]),
                )
            )
        except (AttributeError, TypeError, ValueError):
            raise SchemaError(
                f"audit entry {reply[i]!r:.40} lacks a field or holds an unreadable one"
            ) from None
    return rows


def row_to_record(row: AuditRow) -> AuditRecord:
    """The :class:`~iron_runtime_state.models.AuditRecord` of a row."""
    seq, agent, event_type, timestamp, details, prev_hash, digest = row
    event = AuditEvent._trusted(decode_agent_id(agent), event_type, timestamp, details)
    return AuditRecord(seq, event, digest, prev_hash)


STATS_FIELDS: Final = ("running", "stopped", "failed", "budget_spent", "pii_detections")

#: One pipelined command: the slot of its keys, and the command.
Routed = tuple[int, tuple[Any, ...]]


def decode_stats(replies: Sequence[Sequence[Any]]) -> FleetStats:
    """Fleet totals from every group's statistics hash (``HMGET`` of :data:`STATS_FIELDS`)."""
    counts = [0, 0, 0]
    spent: list[float] = []
    pii = 0
    for reply in replies:
        if reply[0] is None and reply[1] is None and reply[2] is None:
            continue  # an empty group keeps no statistics hash
        try:
            for i in range(3):
                counts[i] += int(reply[i] or 0)
            spent.append(float(reply[3] or 0.0))
            pii += int(reply[4] or 0)
        except ValueError:
            raise SchemaError(
                f"a group statistics hash in Redis holds unreadable values: {reply!r:.200}"
            ) from None
    running, stopped, failed = counts
    return FleetStats(
        total=running + stopped + failed,
        running=running,
        stopped=stopped,
        failed=failed,
        budget_spent=math.fsum(spent),
        pii_detections=pii,
    )


def decode_head(reply: Sequence[Any]) -> tuple[int, str]:
    """``(seq, hash)`` from an ``HMGET`` of two fields of the audit head (absent: the genesis)."""
    seq, digest = reply
    if seq is None or digest is None:
        return 0, GENESIS_HASH
    return int(seq), digest.decode()


def seal_batch(events: Sequence[AuditEvent], chain: AuditChain, head: tuple[int, str]) -> list[AuditRecord]:
    """The records of ``events`` sealed into the chain on top of ``head``."""
    seq, prev = head
    seal = chain.seal
    records: list[AuditRecord] = []
    for event in events:
        seq += 1
        digest = seal(prev, seq, event.agent_id.as_str(), event.event_type, event.timestamp, event.details)
        records.append(AuditRecord(seq, event, digest, prev))
        prev = digest
    return records


class GroupWalk:
    """Paging through every group's id set, ``count`` ids per group per round.

    Each round is one pipelined read per server: :meth:`commands`, then :meth:`advance` with the
    replies, until :attr:`done`. Ids come in name order within a group, each exactly once.
    """

    def __init__(self, layout: RedisLayout, count: int, groups: Sequence[int] | None = None) -> None:
        self._layout = layout
        self._count = count
        self._starts: dict[int, bytes] = dict.fromkeys(
            range(layout.groups) if groups is None else groups, b"-"
        )
        self._order: list[tuple[int, bytes]] = []

    @property
    def done(self) -> bool:
        """Whether every group has been walked to its end."""
        return not self._starts

    def commands(self) -> list[Routed]:
        """The next round's reads."""
        lay = self._layout
        self._order = list(self._starts.items())
        return [
            (lay.group_slots[g], ("ZRANGEBYLEX", lay.ids_key(g), start, "+", "LIMIT", 0, self._count))
            for g, start in self._order
        ]

    def advance(self, replies: Sequence[Sequence[bytes]]) -> list[tuple[int, bytes]]:
        """The ids of this round with their groups; the groups not finished go on."""
        starts: dict[int, bytes] = {}
        batch: list[tuple[int, bytes]] = []
        for (g, _), ids in zip(self._order, replies, strict=True):
            batch.extend((g, agent) for agent in ids)
            if len(ids) == self._count:
                starts[g] = b"(" + ids[-1]
        self._starts = starts
        return batch


def _hold(reservation: Reservation) -> str:
    """A hold's member in the holds sorted set: the reservation id and the amount, as reserved."""
    return f"{reservation.reservation_id}:{reservation.amount!r}"


class RedisLayout:
    """The keys of one namespace and the script calls that change them.

    Methods that build a :class:`ScriptCall` do no I/O; a backend runs the call and passes the
    reply to the matching ``decode_*`` function.
    """

    #: Ids per group per round trip when listing agents.
    list_batch = 1000
    #: Audit candidates a query script examines per call (bounds how long it blocks Redis).
    query_budget = 1000
    #: Audit records a prune script removes per call.
    prune_chunk = 1000
    #: Candidates per purge script call.
    purge_chunk = 200

    def __init__(self, namespace: str, groups: int = GROUPS) -> None:
        if groups < 1 or groups & (groups - 1):
            raise ConfigurationError(f"the slot-group count must be a power of two, got {groups}")
        self.namespace = check_namespace(namespace)
        self.groups = groups
        self._mask = groups - 1
        ns = self.namespace
        #: Prefix of every key of group g, up to and including the ':' after the hash tag.
        self.group_prefixes: tuple[str, ...] = tuple(f"{ns}:{{{ns}:g{g}}}:" for g in range(groups))
        #: The cluster slot of each group.
        self.group_slots: tuple[int, ...] = tuple(key_slot(p) for p in self.group_prefixes)
        self._group_keys = tuple((f"{p}stats", f"{p}ids", f"{p}finished") for p in self.group_prefixes)
        self.meta = f"{ns}:meta"
        self.meta_slot = key_slot(self.meta)
        audit = f"{ns}:{{{ns}:audit}}:"
        self.audit_prefix = audit
        self.audit_log = audit + "log"
        self.audit_head = audit + "head"
        self.audit_indexes = audit + "indexes"
        self.audit_slot = key_slot(self.audit_log)
        self.scripts = load_scripts()
        s = self.scripts
        self._save, self._remove = s["save"], s["remove"]
        self._spend, self._pii, self._status = s["record_spend"], s["record_pii"], s["set_status"]
        self._reserve, self._commit, self._release = s["reserve"], s["commit"], s["release"]
        self._reserved, self._purge, self._meta = s["reserved"], s["purge"], s["meta"]
        self._append, self._query = s["append_audit"], s["query_audit"]
        self._prune, self._prune_indexes = s["prune_audit"], s["prune_indexes"]

    # -- keys --

    def group_of(self, agent_id: AgentId) -> int:
        """The agent's slot group (from its UUID; stable for the life of the namespace)."""
        return agent_id._int & self._mask

    def slot_of(self, agent_id: AgentId) -> int:
        """The cluster slot of every key of the agent."""
        return self.group_slots[agent_id._int & self._mask]

    def agent_key(self, agent_id: AgentId) -> str:
        """The agent's state hash."""
        return f"{self.group_prefixes[agent_id._int & self._mask]}agent:{agent_id.as_str()}"

    def agent_keys(self, agent_id: AgentId) -> dict[str, str]:
        """Every key that holds something of the agent or its group, by role."""
        p = self.group_prefixes[agent_id._int & self._mask]
        a = agent_id.as_str()
        return {
            "agent": f"{p}agent:{a}",
            "holds": f"{p}holds:{a}",
            "stats": f"{p}stats",
            "ids": f"{p}ids",
            "finished": f"{p}finished",
        }

    def stats_key(self, group: int) -> str:
        """Group ``group``'s statistics hash."""
        return f"{self.group_prefixes[group]}stats"

    def ids_key(self, group: int) -> str:
        """Group ``group``'s sorted set of agent ids."""
        return f"{self.group_prefixes[group]}ids"

    def stats_commands(self) -> list[Routed]:
        """One ``HMGET`` per group's statistics hash (decode with :func:`decode_stats`)."""
        return [
            (self.group_slots[g], ("HMGET", self.stats_key(g), *STATS_FIELDS)) for g in range(self.groups)
        ]

    def finished_commands(self, offsets: Mapping[int, int], changed_before: float) -> list[Routed]:
        """For each group, the next purge candidates: finished agents changed before the time."""
        cutoff = f"({changed_before!r}"
        return [
            (
                self.group_slots[g],
                ("ZRANGEBYSCORE", self.finished_key(g), "-inf", cutoff, "LIMIT", offset, self.purge_chunk),
            )
            for g, offset in offsets.items()
        ]

    def finished_key(self, group: int) -> str:
        """Group ``group``'s index of stopped and failed agents by last change."""
        return f"{self.group_prefixes[group]}finished"

    def audit_by_agent(self, agent_id: str) -> str:
        """The index of one agent's audit records."""
        return f"{self.audit_prefix}by_agent:{agent_id}"

    def audit_by_type(self, event_type: str) -> str:
        """The index of one event type's audit records."""
        return f"{self.audit_prefix}by_type:{event_type}"

    # -- agent states --

    def get_command(self, agent_id: AgentId) -> tuple[str, ...]:
        """``HMGET`` of the four state fields (decode with :func:`decode_state`)."""
        return ("HMGET", self.agent_key(agent_id), *_FIELDS)

    def save(self, state: AgentState, now: float) -> ScriptCall:
        """Insert or replace a state."""
        agent_id = state.agent_id
        g = agent_id._int & self._mask
        a = agent_id.as_str()
        stats, ids, finished = self._group_keys[g]
        limit = state.budget_limit
        return ScriptCall(
            self._save,
            self.group_slots[g],
            (f"{self.group_prefixes[g]}agent:{a}", stats, ids, finished),
            (
                a,
                state.status.value,
                repr(state.budget_spent),
                str(state.pii_detections),
                "" if limit is None else repr(limit),
                repr(now),
            ),
        )

    def update(self, read: Sequence[Any], new: AgentState, now: float) -> ScriptCall:
        """Store ``new`` if the agent still holds the fields ``read`` (from :meth:`get_command`).

        The reply is 1 when stored, 0 when the agent changed meanwhile, -1 when it is gone.
        """
        call = self.save(new, now)
        return call._replace(args=(*call.args, read[0], read[1], read[2], read[3] or b""))

    def remove(self, agent_id: AgentId) -> ScriptCall:
        """Remove an agent and its holds."""
        k = self.agent_keys(agent_id)
        return ScriptCall(
            self._remove,
            self.slot_of(agent_id),
            (k["agent"], k["stats"], k["ids"], k["finished"], k["holds"]),
            (agent_id.as_str(),),
        )

    def record_spend(self, agent_id: AgentId, amount: float, now: float) -> ScriptCall:
        """Add to budget_spent within the limit (decode with :func:`decode_spend`)."""
        g = agent_id._int & self._mask
        p = self.group_prefixes[g]
        a = agent_id.as_str()
        return ScriptCall(
            self._spend,
            self.group_slots[g],
            (f"{p}agent:{a}", f"{p}stats", f"{p}holds:{a}"),
            (repr(amount), repr(now)),
        )

    def record_pii(self, agent_id: AgentId, count: int, now: float) -> ScriptCall:
        """Add PII detections (decode with :func:`decode_pii`)."""
        k = self.agent_keys(agent_id)
        return ScriptCall(
            self._pii,
            self.slot_of(agent_id),
            (k["agent"], k["stats"], k["finished"]),
            (str(count), repr(now), agent_id.as_str()),
        )

    def set_status(self, agent_id: AgentId, status: AgentStatus, now: float) -> ScriptCall:
        """Change the status (decode with :func:`decode_status`)."""
        k = self.agent_keys(agent_id)
        return ScriptCall(
            self._status,
            self.slot_of(agent_id),
            (k["agent"], k["stats"], k["finished"]),
            (status.value, repr(now), agent_id.as_str()),
        )

    # -- reservations --

    def reserve(self, agent_id: AgentId, amount: float, ttl: float, reservation_id: str) -> ScriptCall:
        """Hold part of the budget (decode with :func:`decode_reserve`)."""
        g = agent_id._int & self._mask
        p = self.group_prefixes[g]
        a = agent_id.as_str()
        return ScriptCall(
            self._reserve,
            self.group_slots[g],
            (f"{p}agent:{a}", f"{p}holds:{a}"),
            (repr(amount), repr(ttl), reservation_id),
        )

    def commit(self, reservation: Reservation, actual: float, now: float) -> ScriptCall:
        """Settle a hold with what was spent (decode with :func:`decode_commit`)."""
        agent_id = reservation.agent_id
        g = agent_id._int & self._mask
        p = self.group_prefixes[g]
        a = agent_id.as_str()
        return ScriptCall(
            self._commit,
            self.group_slots[g],
            (f"{p}agent:{a}", f"{p}stats", f"{p}holds:{a}", f"{p}finished"),
            (_hold(reservation), repr(actual), repr(now), a),
        )

    def release(self, reservation: Reservation) -> ScriptCall:
        """Drop a hold (the reply is 1, or -3 when it was not open)."""
        k = self.agent_keys(reservation.agent_id)
        return ScriptCall(
            self._release,
            self.slot_of(reservation.agent_id),
            (k["holds"],),
            (_hold(reservation),),
        )

    def reserved(self, agent_id: AgentId) -> ScriptCall:
        """The state and the open holds' sum (decode with :func:`decode_reserved`)."""
        k = self.agent_keys(agent_id)
        return ScriptCall(self._reserved, self.slot_of(agent_id), (k["agent"], k["holds"]), ())

    def purge(
        self, group: int, candidates: Sequence[str], statuses: Sequence[AgentStatus], cutoff: float
    ) -> ScriptCall:
        """Remove those candidates of one group that still qualify (the reply lists them)."""
        p = self.group_prefixes[group]
        keys = [f"{p}stats", f"{p}ids", f"{p}finished"]
        for a in candidates:
            keys += (f"{p}agent:{a}", f"{p}holds:{a}")
        return ScriptCall(
            self._purge,
            self.group_slots[group],
            keys,
            (repr(cutoff), ",".join(s.value for s in statuses), *candidates),
        )

    def meta_check(self) -> ScriptCall:
        """Mark the namespace with this layout, reading back what it holds (see :meth:`check_meta`)."""
        return ScriptCall(self._meta, self.meta_slot, (self.meta,), (LAYOUT_VERSION, self.groups))

    def check_meta(self, reply: Sequence[Any]) -> None:
        """Raise ``SchemaError`` when the namespace was written with another layout."""
        layout, groups = reply
        if layout != str(LAYOUT_VERSION).encode() or groups != str(self.groups).encode():
            raise SchemaError(
                f"namespace {self.namespace!r} holds data in Redis layout {layout!r} with {groups!r} "
                f"slot groups, but this version of iron-runtime-state uses layout {LAYOUT_VERSION} "
                f"with {self.groups}; use a matching version or another namespace"
            )

    # -- audit trail --

    def append_audit(
        self, events: Sequence[AuditEvent], hashes: Sequence[str], head: tuple[int, str]
    ) -> ScriptCall:
        """Append sealed events if the trail's head is still ``head``.

        The reply is ``[1]`` when appended, or ``[0, seq, hash]``: the head that moved meanwhile.
        """
        keys = [self.audit_log, self.audit_head, self.audit_indexes]
        position: dict[str, int] = {}
        args: list[str | int] = [head[0], head[1]]
        for event, digest in zip(events, hashes, strict=True):
            agent = event.agent_id.as_str()
            positions = []
            for key in (self.audit_by_agent(agent), self.audit_by_type(event.event_type)):
                at = position.get(key)
                if at is None:
                    keys.append(key)
                    at = position[key] = len(keys)
                positions.append(at)
            args += (agent, event.event_type, event.timestamp, event.details, digest, *positions)
        return ScriptCall(self._append, self.audit_slot, keys, args)

    def query_audit(
        self,
        agent_id: AgentId | None,
        event_type: str | None,
        since: int | None,
        until: int | None,
        after: int,
        want: int,
    ) -> ScriptCall:
        """One page of a query: at most ``want`` records, :attr:`query_budget` candidates examined.

        An agent's or a type's index is used when the query names one.
        """
        if agent_id is not None:
            index, mode = self.audit_by_agent(agent_id.as_str()), "index"
        elif event_type is not None:
            index, mode = self.audit_by_type(event_type), "index"
        else:
            index, mode = self.audit_log, "all"
        return ScriptCall(
            self._query,
            self.audit_slot,
            (self.audit_log, self.audit_head, index),
            (
                after,
                min(want, self.query_budget),
                self.query_budget,
                event_type or "",
                "" if since is None else since,
                "" if until is None else until,
                mode,
            ),
        )

    def prune_audit(self, before: int) -> ScriptCall:
        """Remove up to :attr:`prune_chunk` of the oldest records before ``before``.

        The reply is ``[removed, done]``.
        """
        return ScriptCall(
            self._prune, self.audit_slot, (self.audit_log, self.audit_head), (before, self.prune_chunk)
        )

    def head_command(self, anchor: bool = False) -> Routed:
        """Read the audit head's ``seq, hash`` (or the anchor's); decode with :func:`decode_head`."""
        fields = ("anchor_seq", "anchor_hash") if anchor else ("seq", "hash")
        return self.audit_slot, ("HMGET", self.audit_head, *fields)

    def prune_indexes(self, index_keys: Sequence[str], anchor_seq: int) -> ScriptCall:
        """Drop pruned seqs from some index keys."""
        return ScriptCall(
            self._prune_indexes, self.audit_slot, (self.audit_indexes, *index_keys), (anchor_seq,)
        )
