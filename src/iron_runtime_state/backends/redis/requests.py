"""What an operation of :mod:`.ops` (or :mod:`.index`) yields to its driver, and the type of one.

An operation is a generator: it yields requests, receives their replies, and returns its
result. :class:`~.policy.Call` is one command; the others are defined here.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Generator, Sequence
from typing import Any, NamedTuple, TypeVar

from .keys import Routed
from .policy import Call
from .scripts import ScriptCall

__all__ = [
    "Batch",
    "Block",
    "Call",
    "Emit",
    "Gather",
    "Op",
    "Pause",
    "Request",
    "contended",
    "once",
    "op_id",
    "script",
]

_T = TypeVar("_T")


class Batch(NamedTuple):
    """Commands that are safe to repeat, pipelined per server; the reply is the list of replies."""

    items: Sequence[Routed]
    what: str


class Gather(NamedTuple):
    """Reads pipelined per server and sent once: a server that fails gives its error (a redis-py
    exception) as its commands' replies. For best-effort reads that must not wait on a server
    that is down (the outbox sweeps)."""

    items: Sequence[Routed]


class Block(NamedTuple):
    """A read that may wait on the server (``XREAD BLOCK``) for up to ``seconds``; safe to repeat.

    The drivers run it on a connection nothing else waits on: the sync one takes a pooled
    connection for that long (so ``seconds`` stays short), the asyncio one a connection of its
    own rather than the one its pipelined commands share.
    """

    slot: int
    command: tuple[Any, ...]
    seconds: float
    what: str


class Pause(NamedTuple):
    """Back off before trying again (another client won a compare-and-set)."""

    seconds: float


class Emit(NamedTuple):
    """Items an iterator hands to its consumer (the reply is ``None``)."""

    items: list[Any]


Request = Call | Batch | Block | Gather | Pause | Emit
#: An operation: yields requests, receives their replies, returns its result.
Op = Generator[Request, Any, _T]


def script(call: ScriptCall, idempotent: bool, what: str) -> Call:
    """Run a script: ``EVALSHA`` (the drivers fall back to ``EVAL`` when the server lacks it)."""
    return Call(call.slot, call.command(), idempotent, what)


def once(call: ScriptCall, what: str) -> Call:
    """Run a script that changes state once however often it is sent (by op key, or by outbox
    marks): resent after a lost reply, and an unknown outcome if every resend goes unanswered."""
    return Call(call.slot, call.command(), True, what, changes=True)


def op_id() -> str:
    """A fresh name for one call of a change script (its op key): random, so forked processes
    and hosts never share one."""
    return os.urandom(9).hex()


def contended(started: float, timeout: float, attempt: int) -> Pause | None:
    """After losing a compare-and-set: ``None`` to give up, else the pause before the next try.

    Others keep winning after a few tries: step aside for a moment, longer each time.
    """
    if time.monotonic() - started > max(10.0, timeout):
        return None
    return Pause(random.random() * 0.001 * min(attempt, 20) if attempt >= 2 else 0.0)
