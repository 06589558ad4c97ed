"""Redis server fixtures, shared by the contract suite and tests/test_redis.py.

Session-scoped: each pytest process (each xdist worker) starts its own servers on free loopback
ports the first time a test asks for one, and stops them at the end. Tests isolate themselves
with a unique namespace each, so they can share a server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator

import pytest

from .postgres_server import pg_server, postgres_server  # noqa: F401 - fixtures, shared
from .redis_servers import (
    RedisCluster,
    RedisServer,
    TlsFiles,
    namespace,
    redis_available,
    short_tmpdir,
)


def _need_redis() -> None:
    if not redis_available():
        pytest.skip("redis-server is not installed (scripts/test installs it)")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A standalone redis-server, also listening on a unix socket (``.unix_path``)."""
    _need_redis()
    folder = short_tmpdir("iron-redis-")
    server = RedisServer(folder, unix_socket=True).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of three masters."""
    _need_redis()
    folder = short_tmpdir("iron-cluster-")
    cluster = RedisCluster(folder)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tls_server() -> Iterator[RedisServer]:
    """A standalone redis-server that speaks TLS only, with a throwaway CA (``.tls.ca``)."""
    _need_redis()
    if shutil.which("openssl") is None:
        pytest.skip("the openssl tool is needed to make a test certificate")
    folder = short_tmpdir("iron-tls-")
    try:
        tls = TlsFiles(folder / "tls").create()
        server = RedisServer(folder / "server", tls=tls).start()
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if "Bad directive" in str(exc):  # a redis-server built without TLS rejects --tls-port
            pytest.skip(f"this redis-server cannot serve TLS: {exc}")
        raise  # anything else (a certificate the client refuses, say) is a failure to see
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def ns() -> str:
    """A namespace no other test uses."""
    return namespace()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to kill, stop and restart."""
    _need_redis()
    folder = short_tmpdir("iron-fault-")
    server = RedisServer(folder).start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.process.pid, signal.SIGCONT)
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
