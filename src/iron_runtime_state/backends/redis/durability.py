"""What an acknowledged write survives: the ``durability=`` setting, and the server's eviction policy.

Redis answers a write once its master has applied it in memory; the replicas and the AOF's fsync
follow later, so a master that dies can take acknowledged writes with it (on a failover, its
replica is promoted without them). ``durability=`` chooses what a write waits for before the call
returns; the sync and the asyncio driver both follow :class:`Durability`::

    durability     sent after each write, on its connection    the call returns once
    "async"        nothing (the default)                       the master applied it
    "replicated"   WAIT <replicas> <ms>                        <replicas> replicas hold it too
    "aof"          WAITAOF 1 <replicas> <ms>                   the master's AOF holds it, fsynced
                                                               (and <replicas> replicas' AOFs)

``WAIT`` counts the writes of its own connection, so it follows the write on the connection that
sent it: the sync driver sends the pair in one packet; the asyncio driver adds one ``WAIT`` after
each pipelined batch that holds a write, and hands each write's reply to its caller only once
that ``WAIT`` answered. Reads never wait. A write that is applied but not confirmed in time
fails with :class:`NotConfirmed`, which :mod:`.policy` turns into a ``BackendError`` saying so:
never resent, since it was applied.

On first use (the prepare step) every master the store uses is checked once: a
``maxmemory-policy`` other than ``noeviction`` refuses the store (``ConfigurationError``) unless
``allow_eviction=True``, because evicting keys loses agents and audit records (``allkeys-*``) or
open reservations, the only keys with a TTL (``volatile-*``), which would let a second caller
spend the same budget; and ``durability="aof"`` needs ``WAITAOF`` (Redis 7.2 or newer) and
``appendonly yes``. A server whose ACL forbids ``CONFIG GET`` skips the eviction check (with a
debug log): it is a guard against a mistake, not a control.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

from redis import exceptions as rexc

from ...errors import ConfigurationError
from .scripts import SCRIPT_NAMES, load_scripts
from .url import RedisConfig

__all__ = ["PROBE_TIMEOUT_MS", "Durability", "NotConfirmed", "logger"]

logger: Final = logging.getLogger("iron_runtime_state.redis")

#: Scripts that change nothing that must survive: reads, and ``meta``, which every store's first
#: call writes again (so losing it loses nothing). Every other script waits; a new one too.
_NO_WAIT: Final = frozenset({"query_audit", "reserved", "meta", "audit_marks", "stats"})
#: How long the ``WAITAOF`` probe of the prepare step may block (it has nothing to wait for).
PROBE_TIMEOUT_MS: Final = 1
_WAITAOF_VERSION: Final = (7, 2)
_POLICY: Final = ("CONFIG", "GET", "maxmemory-policy")


class NotConfirmed(rexc.RedisError):
    """A write the master applied but did not confirm as durable in time (the reason is the text)."""


class Durability:
    """What each write waits for, and the checks of each master on first use."""

    def __init__(self, config: RedisConfig) -> None:
        self.mode = config.durability
        self.replicas = config.replicas
        self.allow_eviction = config.allow_eviction
        #: How long the server waits for the confirmation: half of ``socket_timeout``, so that its
        #: answer (a count) still comes before the client gives up on the connection, even though
        #: Redis notices the end of a WAIT only at its next timer tick (every 100 ms by default).
        self.wait_ms = max(1, int(config.socket_timeout * 500))
        #: The command that follows each write, or ``None`` when writes do not wait.
        self.command: tuple[Any, ...] | None = None
        if self.mode == "replicated":
            self.command = ("WAIT", self.replicas, self.wait_ms)
        elif self.mode == "aof":
            self.command = ("WAITAOF", 1, self.replicas, self.wait_ms)
        scripts = load_scripts()
        self._writing = frozenset(
            scripts[name].sha for name in SCRIPT_NAMES if name not in _NO_WAIT and self.command is not None
        )

    def waits(self, command: tuple[Any, ...]) -> bool:
        """Whether ``command`` (as an operation built it: ``EVALSHA`` of a script) must be confirmed."""
        return command[0] == "EVALSHA" and command[1] in self._writing

    def verdict(self, ack: Any) -> NotConfirmed | None:
        """``None`` when the reply to :attr:`command` confirms the writes before it, else why not.

        ``ack`` is the reply, or the redis-py error that stands for it (an error reply, or the
        failure that lost it).
        """
        where = "on replicas" if self.mode == "replicated" else "as written to the append-only file"
        if isinstance(ack, BaseException):
            return NotConfirmed(f"it is not confirmed {where}: {type(ack).__name__}: {ack}")
        if self.mode == "replicated":
            if int(ack) >= self.replicas:
                return None
            return NotConfirmed(
                f"it is not confirmed on replicas: {int(ack)} of the {self.replicas} required "
                f"acknowledged it within {self.wait_ms} ms"
            )
        local, replicas = (int(part) for part in ack)
        if local >= 1 and replicas >= self.replicas:
            return None
        if local < 1:
            return NotConfirmed(
                f"it is not confirmed {where}: the master did not fsync it within {self.wait_ms} ms"
            )
        return NotConfirmed(
            f"it is not confirmed {where} on replicas: {replicas} of the {self.replicas} required "
            f"fsynced it within {self.wait_ms} ms"
        )

    # -- the checks of the prepare step -----------------------------------------------------------

    @property
    def probes(self) -> list[tuple[Any, ...]]:
        """The commands each master answers on first use; :meth:`judge` reads their replies."""
        if self.mode == "aof":
            return [_POLICY, ("HELLO",), ("WAITAOF", 1, 0, PROBE_TIMEOUT_MS)]
        return [_POLICY]

    def judge(self, where: str, replies: Sequence[Any]) -> None:
        """Raise ``ConfigurationError`` when the master at ``where`` would lose acknowledged writes.

        ``replies`` answer :attr:`probes`, error replies as redis-py exceptions. A master that
        could not be reached is skipped (the store's calls to it fail on their own).
        """
        if any(isinstance(reply, (rexc.ConnectionError, rexc.TimeoutError)) for reply in replies):
            logger.debug("Redis at %s did not answer the configuration checks; skipped", where)
            return
        self._check_eviction(where, replies[0])
        if self.mode == "aof":
            self._check_waitaof(where, replies[1], replies[2])

    def _check_eviction(self, where: str, reply: Any) -> None:
        if isinstance(reply, BaseException):  # CONFIG forbidden (ACL) or renamed away
            logger.debug("cannot read maxmemory-policy of Redis at %s (%s); check skipped", where, reply)
            return
        policy = _text(_fields(reply).get(b"maxmemory-policy", b"noeviction"))
        if policy == "noeviction":
            return
        risk = f"Redis at {where} may evict keys when it reaches maxmemory (maxmemory-policy {policy}): " + (
            "it drops open reservations first, the only keys with a TTL, so a second caller could "
            "spend a budget already held"
            if policy.startswith("volatile-")
            else "it may drop agents, their reservations and audit records"
        )
        if self.allow_eviction:
            logger.warning("%s; allowed by allow_eviction=True", risk)
            return
        raise ConfigurationError(
            f"{risk}. Run CONFIG SET maxmemory-policy noeviction on it (and set it in redis.conf), "
            "or pass allow_eviction=True to accept the risk"
        )

    def _check_waitaof(self, where: str, hello: Any, probe: Any) -> None:
        version = _version(hello)
        if version is not None and version < _WAITAOF_VERSION:
            shown = ".".join(map(str, version))
            raise ConfigurationError(
                f"durability='aof' needs WAITAOF, which Redis has from version 7.2 on, and Redis at "
                f"{where} is version {shown}: upgrade it, or use durability='replicated'"
            )
        if not isinstance(probe, BaseException):
            return
        text = str(probe)
        if "appendonly" in text:
            raise ConfigurationError(
                f"durability='aof' needs the append-only file on Redis at {where}: run CONFIG SET "
                "appendonly yes on it (and set appendonly yes in redis.conf)"
            )
        if "unknown command" in text.lower():
            raise ConfigurationError(
                f"durability='aof' needs WAITAOF (Redis 7.2 or newer), and Redis at {where} does not "
                "know it: upgrade it, or use durability='replicated'"
            )
        raise ConfigurationError(f"durability='aof' cannot use WAITAOF on Redis at {where}: {text:.200}")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _fields(reply: Any) -> dict[Any, Any]:
    """A map reply as a dict: RESP3 gives one, RESP2 a flat list of names and values."""
    if isinstance(reply, dict):
        return reply
    if isinstance(reply, list):
        return dict(zip(reply[::2], reply[1::2], strict=False))
    return {}


def _version(hello: Any) -> tuple[int, ...] | None:
    """The server's version from a ``HELLO`` reply, if it gave one."""
    version = _fields(hello).get(b"version")
    if version is None:
        return None
    try:
        return tuple(int(part) for part in _text(version).split(".")[:2])
    except ValueError:
        return None
