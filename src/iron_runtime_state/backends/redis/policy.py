"""What the Redis drivers decide without I/O: which failures to retry, when, and where to.

Shared by the sync driver (:mod:`.sync`) and the asyncio one (:mod:`.aio`). A backend
sends a command, reports a failure to the command's :class:`Attempt`, and does what it says:
resend at once, pause (``time.sleep`` or ``asyncio.sleep``) and resend, or raise the library
error it raises. The meaning of each failure, written once::

    failure                                        sent?  what happens
    NOSCRIPT                                         -    resend at once as EVAL (which caches it)
    ASK host:port (a slot is migrating)              -    resend at once to that node, after ASKING
    MOVED (the slot table is stale)                  -    reload the slot table, pause, resend
    MOVED or CROSSSLOT to a redis:// store           -    ConfigurationError: a cluster node
    TRYAGAIN, CLUSTERDOWN, READONLY, LOADING         -    the server did not run it: pause, resend
    refused, reset, timed out (no reply)             no   not run: pause, resend
                                                     yes  a read, an absolute write, or a change made
                                                          once per op key (see .ops): pause, resend;
                                                          any other add, append or settle:
                                                          BackendUnavailable saying that the outcome
                                                          is unknown (a change given up on after it
                                                          was sent says so too)
    wrong credentials, OOM, NOPERM, other errors     -    raise at once (no retry can help)
    applied, not confirmed durable (.durability)     -    BackendError saying so: never resent

Pauses grow from 50 ms, doubling up to 0.5 s, each jittered, while another full attempt fits in
the call's ``timeout``; then :class:`BackendUnavailable`. The module also holds the cluster slot
table's discovery and the per-server batching plan.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, NamedTuple, TypeVar

from redis import exceptions as rexc

from ...errors import BackendError, BackendUnavailable, ConfigurationError, StateError
from .durability import NotConfirmed
from .keys import CLUSTER_SLOTS
from .scripts import load_scripts
from .url import Node, RedisConfig, address

__all__ = [
    "FIRST_DELAY",
    "MAX_DELAY",
    "NOT_RUN",
    "UNREACHABLE",
    "Attempt",
    "Call",
    "RetryPolicy",
    "SlotDiscovery",
    "parse_cluster_slots",
    "plan_batches",
    "rexc",
    "stale_slot_table",
]

_H = TypeVar("_H")

FIRST_DELAY: Final = 0.05  # seconds before the first retry; doubles up to MAX_DELAY
MAX_DELAY: Final = 0.5

#: Replies meaning the server did not run the command and may run it after a pause.
NOT_RUN: Final = (
    rexc.TryAgainError,
    rexc.ClusterDownError,
    rexc.ReadOnlyError,
    rexc.BusyLoadingError,
)
#: Failures to reach the server (AuthenticationError, a subclass, is handled before these).
UNREACHABLE: Final = (rexc.ConnectionError, rexc.TimeoutError)


class Call(NamedTuple):
    """One command for the server that holds ``slot``.

    ``idempotent`` says whether sending it twice is harmless (reads, absolute writes, changes
    made once per op key); ``what`` names the operation in error messages; ``changes`` says that
    it changes state, so that a call given up after it was sent says its outcome is unknown.
    """

    slot: int
    command: tuple[Any, ...]
    idempotent: bool
    what: str
    changes: bool = False


class RetryPolicy:
    """The retry settings of one store, and the library errors that name it."""

    def __init__(self, config: RedisConfig) -> None:
        self.url = config.masked_url
        self.timeout = config.timeout
        #: The longest one attempt can take: a connection, then a reply.
        self.attempt_time = config.socket_timeout + config.socket_connect_timeout
        self.connect_timeout = config.socket_connect_timeout
        self.cluster = config.cluster
        #: Each script's source by its SHA1, for the ``EVAL`` fallback of an ``EVALSHA``.
        self.sources = {script.sha: script.source for script in load_scripts().values()}

    def attempt(self, call: Call, started: float) -> Attempt:
        """The retry state of ``call``, first sent at ``started`` (``time.monotonic()``)."""
        return Attempt(self, call, started)

    def map_error(self, exc: BaseException) -> StateError:
        """The library error for a redis-py exception that escaped the retry logic."""
        if isinstance(exc, rexc.AuthenticationError):
            return self.auth_error(exc)
        if isinstance(exc, UNREACHABLE):
            return BackendUnavailable(f"Redis at {self.url} is unreachable: {exc}")
        return BackendError(f"Redis at {self.url} failed: {type(exc).__name__}: {exc}")

    def auth_error(self, exc: BaseException) -> BackendError:
        """Wrong credentials: no retry can help."""
        return BackendError(
            f"Redis at {self.url} refused the credentials ({exc}); check the user and password in the "
            "URL (redis://user:password@host:port/db) or the username=/password= options"
        )

    def unknown_outcome(self, what: str, exc: BaseException, *, resent: bool = False) -> BackendUnavailable:
        """The reply to a change was lost: to one that must not run twice, or to every resend of
        one made once per op key (``resent``) until the time ran out."""
        if resent:
            how = "it was sent again until the time ran out (it is applied once however often it is sent)"
        else:
            how = "it was not sent again because applying it twice would be wrong"
        return BackendUnavailable(
            f"lost the connection to Redis at {self.url} while waiting for the reply to {what} ({exc}); "
            f"it may or may not have been applied, and {how}: check the state before repeating it"
        )

    def not_confirmed(self, what: str, exc: NotConfirmed) -> BackendError:
        """A write that the master applied but that ``durability=`` could not confirm in time."""
        return BackendError(
            f"Redis at {self.url} applied the command to {what} on the master, but {exc}. It was "
            "not undone, and it is not sent again: a failover or a crash of the master may still lose "
            "it, so check the state before repeating it"
        )

    def closed_error(self) -> BackendError:
        """A call on a store after ``close()``."""
        return BackendError(f"this Redis store ({self.url}) was closed; open a new manager")

    def wrong_kind(self, exc: BaseException) -> ConfigurationError:
        """A ``redis://`` URL that reaches a cluster node (it answered MOVED, or CROSSSLOT to a
        script over the keys of many slots)."""
        return ConfigurationError(
            f"{self.url} is a node of a Redis Cluster (it answered {exc.args[0]!r:.60}); "
            "use redis+cluster://host:port"
        )


class Attempt:
    """One command across its attempts: what to send next, where, and after what pause.

    :meth:`failed` takes each failure and returns the pause before the next attempt (0 to resend
    at once), or raises the library error when the command must not or cannot be sent again.
    :attr:`command` and :attr:`asking` say what to send next, and to which node.
    """

    __slots__ = (
        "_changes",
        "_delay",
        "_policy",
        "asking",
        "command",
        "idempotent",
        "sent_change",
        "started",
        "what",
    )

    def __init__(self, policy: RetryPolicy, call: Call, started: float) -> None:
        self._policy = policy
        self._delay = FIRST_DELAY
        self.command = call.command
        self.idempotent = call.idempotent
        self.what = call.what
        #: A change that may have reached the server: giving up on it leaves its outcome unknown.
        self.sent_change = False
        self._changes = call.changes
        self.started = started
        #: The node an ``ASK`` redirect named: send there, after ``ASKING``, once.
        self.asking: Node | None = None

    def failed(self, exc: BaseException, sent: bool) -> float:
        """Seconds to pause before the next attempt; raise when there is none.

        ``sent`` says whether the command may have reached the server: a lost reply is then an
        unknown outcome, which only an idempotent command may repeat.
        """
        policy = self._policy
        if isinstance(exc, NotConfirmed):
            raise policy.not_confirmed(self.what, exc) from exc
        if isinstance(exc, rexc.NoScriptError):
            command = self.command
            if command[0] != "EVALSHA":  # EVAL itself cannot miss its script
                raise BackendError(f"Redis refused to {self.what}: {exc}") from exc
            self.command = ("EVAL", policy.sources[command[1]], *command[2:])
            return 0.0
        if isinstance(exc, rexc.ResponseError):
            if isinstance(exc, (rexc.AskError, rexc.ClusterCrossSlotError)) and not policy.cluster:
                # MOVED, or a standalone store's script over many slots: a cluster node
                raise policy.wrong_kind(exc) from exc
            if isinstance(exc, rexc.AskError):  # MOVED (a subclass) or ASK: the command did not run
                if not isinstance(exc, rexc.MovedError):
                    self.asking = (exc.host, int(exc.port))
                    return 0.0
            elif not isinstance(exc, NOT_RUN):
                raise self._refused(exc) from exc
        elif isinstance(exc, rexc.AuthenticationError):
            raise policy.auth_error(exc) from exc
        elif isinstance(exc, UNREACHABLE):
            if sent and not isinstance(exc, rexc.BusyLoadingError):
                if not self.idempotent:
                    raise policy.unknown_outcome(self.what, exc) from exc
                self.sent_change = self.sent_change or self._changes
        elif isinstance(exc, StateError):
            raise exc
        else:
            raise policy.map_error(exc) from exc
        self.asking = None
        return self._pause(exc)

    def _refused(self, exc: rexc.ResponseError) -> BackendError:
        if isinstance(exc, rexc.OutOfMemoryError):
            return BackendError(
                f"Redis at {self._policy.url} is out of memory and refused to {self.what} ({exc}); raise "
                "maxmemory or free memory"
            )
        if isinstance(exc, rexc.NoPermissionError):
            return BackendError(
                f"the Redis user may not {self.what} ({exc}); it needs +@all on the namespace's keys"
            )
        return BackendError(f"Redis refused to {self.what}: {exc}")

    def _pause(self, error: BaseException) -> float:
        """The next jittered pause, or raise when no full attempt fits in the time left."""
        policy = self._policy
        elapsed = time.monotonic() - self.started
        delay = self._delay
        if elapsed + delay + policy.attempt_time > policy.timeout:
            if self.sent_change:
                raise policy.unknown_outcome(self.what, error, resent=True) from error
            if isinstance(error, rexc.ResponseError):
                raise BackendUnavailable(
                    f"Redis at {policy.url} is not serving: {error}; gave up trying to {self.what} after "
                    f"{elapsed:.1f} s"
                ) from error
            raise BackendUnavailable(
                f"cannot reach Redis at {policy.url} ({error}); gave up trying to {self.what} after "
                f"{elapsed:.1f} s. Check that the server runs and is reachable, or pass a larger timeout="
            ) from error
        self._delay = min(delay * 2, MAX_DELAY)
        return delay * (0.5 + random.random() / 2)


def stale_slot_table(exc: BaseException) -> bool:
    """Whether a failure may mean that a cluster's slot table is out of date (reload it)."""
    if isinstance(exc, (rexc.MovedError, *NOT_RUN)):
        return True
    return isinstance(exc, UNREACHABLE) and not isinstance(exc, rexc.AuthenticationError)


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


class SlotDiscovery:
    """Reading a cluster's slot table (``CLUSTER SLOTS``) from the first node that answers.

    A backend asks each node of :meth:`nodes` in turn, reports the unreachable ones to
    :meth:`unreachable`, and builds the table from the first reply with :meth:`table`.
    """

    def __init__(
        self, policy: RetryPolicy, seeds: Sequence[Node], known: Iterable[Node], started: float
    ) -> None:
        self._policy = policy
        self._started = started
        #: Seeds first, then every other node this process has talked to.
        self.candidates = list(seeds) + [n for n in known if n not in seeds]
        self._last: BaseException | None = None

    def nodes(self) -> Iterator[Node]:
        """The nodes to ask, while the call's time allows one more connection."""
        policy = self._policy
        for node in self.candidates:
            if (
                self._last is not None
                and time.monotonic() - self._started + policy.connect_timeout > policy.timeout
            ):
                return
            yield node

    def unreachable(self, exc: BaseException) -> None:
        """A node did not answer; the next one is asked."""
        self._last = exc

    def not_a_cluster(self, node: Node, exc: BaseException) -> ConfigurationError:
        """The node refused ``CLUSTER SLOTS``: a ``redis+cluster://`` URL names a standalone server."""
        return ConfigurationError(
            f"{address(node)} is not a Redis Cluster node ({exc}); use redis://host:port for a "
            "standalone server"
        )

    def no_answer(self) -> rexc.ConnectionError:
        """No node answered (retried like any unreachable server)."""
        tried = ", ".join(address(n) for n in self.candidates)
        return rexc.ConnectionError(f"no Redis Cluster node answered ({tried}): {self._last}")

    @staticmethod
    def table(reply: Sequence[Any], node: Node, handle: Callable[[Node], _H]) -> list[_H | None]:
        """For each slot, the ``handle`` (a connection pool, a pipe) of the master serving it."""
        table: list[_H | None] = [None] * CLUSTER_SLOTS
        for first, final, host, port in parse_cluster_slots(reply, node[0]):
            table[first : final + 1] = [handle((host, port))] * (final - first + 1)
        return table


def plan_batches(indices: Iterable[int], route: Callable[[int], _H]) -> list[tuple[_H, list[int]]]:
    """Commands grouped by the server that runs them (``route(i)``): one pipeline each, in order."""
    groups: dict[int, tuple[_H, list[int]]] = {}
    for i in indices:
        handle = route(i)
        group = groups.get(id(handle))
        if group is None:
            groups[id(handle)] = (handle, [i])
        else:
            group[1].append(i)
    return list(groups.values())
