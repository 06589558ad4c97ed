"""What an operation of :mod:`.ops` (or :mod:`.index`) yields to its driver, and the type of one.

An operation is a generator: it yields requests, receives their replies, and returns its
result. :class:`~.policy.Call` is one command; the others are defined here.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, NamedTuple, TypeVar

from .keys import Routed
from .policy import Call

__all__ = ["Batch", "Call", "Emit", "Gather", "Op", "Pause", "Request"]

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


class Pause(NamedTuple):
    """Back off before trying again (another client won a compare-and-set)."""

    seconds: float


class Emit(NamedTuple):
    """Items an iterator hands to its consumer (the reply is ``None``)."""

    items: list[Any]


Request = Call | Batch | Gather | Pause | Emit
#: An operation: yields requests, receives their replies, returns its result.
Op = Generator[Request, Any, _T]
