"""The Redis store: ``redis://``, ``rediss://``, ``unix://`` and ``redis+cluster://``.

:func:`open_redis` builds the sync store and :func:`open_redis_async` the asyncio one (the
registry's factories for these schemes). Both share every decision; the modules, by concern:

- :mod:`.url`: URLs and options (:class:`RedisConfig`, :func:`parse_redis_url`);
- :mod:`.keys`: the key layout of a namespace, slots and the commands that read and write it;
- :mod:`.scripts`: the Lua scripts of ``lua/``, loaded and assembled once;
- :mod:`.decode`: what each reply means;
- :mod:`.ops`: every store operation, once, as an I/O-free generator;
- :mod:`.requests`: what an operation yields to its driver;
- :mod:`.index`: the status sets and the audit time index, and how an older namespace gets them;
- :mod:`.policy`: which failures to retry, when and where to;
- :mod:`.durability`: what a write waits for (``durability=``), and each master's checks on first use;
- :mod:`.sync` and :mod:`.aio`: the two drivers, which only carry commands and replies.

The asyncio driver's module is imported only when :func:`open_redis_async` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import MissingDependency

try:  # the one check for the extra: every module of the package imports redis-py freely
    import redis  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingDependency(
        f"the Redis store needs the 'redis' extra: pip install 'iron-runtime-state[redis]' ({exc})"
    ) from exc

from .keys import GROUPS, GroupWalk, RedisLayout, key_slot
from .policy import Attempt, Call, RetryPolicy
from .scripts import load_scripts
from .sync import RedisBackend
from .url import DEFAULT_NAMESPACE, OPTIONS, RedisConfig, parse_redis_url

if TYPE_CHECKING:
    from .aio import AsyncRedisBackend

__all__ = [
    "DEFAULT_NAMESPACE",
    "GROUPS",
    "OPTIONS",
    "Attempt",
    "Call",
    "GroupWalk",
    "RedisBackend",
    "RedisConfig",
    "RedisLayout",
    "RetryPolicy",
    "key_slot",
    "load_scripts",
    "open_redis",
    "open_redis_async",
    "parse_redis_url",
]


def open_redis(url: str, *, namespace: str = DEFAULT_NAMESPACE, **options: Any) -> RedisBackend:
    """Build the Redis store for ``url`` (no connection is made until the first call).

    ``namespace`` prefixes every key (``?namespace=`` in the URL works too). ``options``:
    ``timeout`` (seconds a call may take in all, retries included; default 5),
    ``socket_timeout``, ``socket_connect_timeout``, ``username``, ``password``, ``db``,
    ``max_connections``, ``client_name``, ``ssl`` and the TLS options ``ssl_ca_certs``,
    ``ssl_ca_path``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``, ``ssl_cert_reqs``,
    ``ssl_check_hostname``; ``durability`` (``"async"``, ``"replicated"`` or ``"aof"``), ``replicas``
    and ``allow_eviction`` (see :mod:`.durability`). An unknown option raises
    ``ConfigurationError`` naming them all.
    """
    config = parse_redis_url(url, namespace=namespace, **options)
    # mypy sees the contract's methods as abstract: OpsBackend derives them at import time.
    return RedisBackend(config)  # type: ignore[abstract]


def open_redis_async(url: str, *, namespace: str = DEFAULT_NAMESPACE, **options: Any) -> AsyncRedisBackend:
    """The asyncio Redis store for ``url``; the same URLs and options as :func:`open_redis`.

    No connection is made until the first call.
    """
    from .aio import AsyncRedisBackend

    return AsyncRedisBackend(parse_redis_url(url, namespace=namespace, **options))
