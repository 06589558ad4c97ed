"""Stores, chosen by URL.

:data:`SCHEMES` is the registry, written out by hand: each URL scheme names the module that
serves it, the factory to call and the optional extra it needs. A backend module is imported
only when a URL asks for it, so a missing driver costs nothing until it is used, and then says
which extra to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from ..errors import ConfigurationError, MissingDependency, StateTypeError
from .base import AuditMarks, AuditQuery, Backend, Change, CommitResult, SpendResult

__all__ = [
    "SCHEMES",
    "AuditMarks",
    "AuditQuery",
    "Backend",
    "BackendSpec",
    "Change",
    "CommitResult",
    "SpendResult",
    "open_backend",
    "scheme_of",
]


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Where the backend for a URL scheme lives."""

    module: str
    factory: str
    extra: str | None
    example: str
    #: A factory in ``module`` building a native asyncio backend for the scheme; ``None`` serves
    #: asyncio through the threaded adapter over ``factory`` (see ``async_base``).
    async_factory: str | None = None


SCHEMES: dict[str, BackendSpec] = {
    "memory": BackendSpec("iron_runtime_state.backends.memory", "open_memory", None, "memory://"),
    "sqlite": BackendSpec(
        "iron_runtime_state.backends.sqlite", "open_sqlite", None, "sqlite:///iron_state.db"
    ),
    # Redis: the sync backend, and its native asyncio twin on redis.asyncio (same keys and scripts).
    "redis": BackendSpec(
        "iron_runtime_state.backends.redis",
        "open_redis",
        "redis",
        "redis://[user:password@]host:port/db",
        async_factory="open_redis_async",
    ),
    "rediss": BackendSpec(
        "iron_runtime_state.backends.redis",
        "open_redis",
        "redis",
        "rediss://[user:password@]host:port/db",
        async_factory="open_redis_async",
    ),
    "unix": BackendSpec(
        "iron_runtime_state.backends.redis",
        "open_redis",
        "redis",
        "unix:///path/to/redis.sock",
        async_factory="open_redis_async",
    ),
    "redis+cluster": BackendSpec(
        "iron_runtime_state.backends.redis",
        "open_redis",
        "redis",
        "redis+cluster://host:port[,host:port...]",
        async_factory="open_redis_async",
    ),
    # PostgreSQL: the sync backend, and its native asyncio twin on psycopg's async connections.
    "postgresql": BackendSpec(
        "iron_runtime_state.backends.postgres",
        "open_postgres",
        "postgres",
        "postgresql://user:password@host:5432/database[?schema=iron]",
        async_factory="open_async_postgres",
    ),
    "postgres": BackendSpec(
        "iron_runtime_state.backends.postgres",
        "open_postgres",
        "postgres",
        "postgres://user:password@host:5432/database[?schema=iron]",
        async_factory="open_async_postgres",
    ),
}


def scheme_of(url: str) -> str:
    """The URL's scheme, lowercased; a clear error when ``url`` is not a store URL."""
    if not isinstance(url, str):
        raise StateTypeError(f"a store URL must be a str, got {type(url).__name__}")
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ConfigurationError(f"{url[:64]!r} is not a store URL; {_supported()}")
    return scheme.lower()


def _supported() -> str:
    return "supported: " + ", ".join(spec.example for spec in SCHEMES.values())


def open_backend(url: str, **options: object) -> Backend:
    """Build the backend for ``url``; ``options`` go to the backend's factory."""
    scheme, spec = spec_for(url)
    factory = cast(Callable[..., Backend], load_factory(scheme, spec, spec.factory))
    return factory(url, **options)


def spec_for(url: str) -> tuple[str, BackendSpec]:
    """The scheme of ``url`` and its registry entry; a clear error for an unknown scheme."""
    scheme = scheme_of(url)
    spec = SCHEMES.get(scheme)
    if spec is None:
        raise ConfigurationError(f"unknown store URL scheme {scheme[:32]!r}; {_supported()}")
    return scheme, spec


def load_factory(scheme: str, spec: BackendSpec, name: str) -> Callable[..., object]:
    """Import the backend module of ``spec`` and return its function ``name``.

    A missing optional driver raises ``MissingDependency`` naming the extra to install.
    """
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        if spec.extra is None:
            raise
        raise MissingDependency(
            f"{scheme}:// needs the {spec.extra!r} extra: "
            f"pip install 'iron-runtime-state[{spec.extra}]' ({exc})"
        ) from exc
    return cast(Callable[..., object], getattr(module, name))
