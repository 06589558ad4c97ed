"""A real, throwaway PostgreSQL server for the tests and benchmarks (no mocks).

:class:`PostgresServer` runs ``initdb`` in a temporary folder and starts ``postgres`` on a free
loopback port (and a unix socket in the same folder), with its own superuser ``iron`` whose
password is required over TCP (so the tests see that it never leaks). PostgreSQL refuses to run
as root: when the tests run as root, ``initdb`` and ``postgres`` run as an unprivileged user
(``postgres`` where Debian's package made one, else ``nobody``), which owns the folder.

The pytest fixtures: ``postgres_server`` (one per test session, shared; each test isolates
itself in a schema of its own) and ``pg_server`` (one per test, free to stop, kill and restart).
Debian's ``postgresql`` package provides the binaries (``scripts/test`` installs it when
missing); they live in ``/usr/lib/postgresql/<version>/bin``, which is not on ``PATH``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
SUPERUSER = "iron"
PASSWORD = "pg-test-secret-5d1f"
DATABASE = "postgres"


def _binary(name: str) -> str | None:
    """``name`` from PATH, else from the newest ``/usr/lib/postgresql/<version>/bin``."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return candidates[-1] if candidates else None


def postgres_available() -> bool:
    """Whether ``initdb`` and ``postgres`` are installed, and the psycopg driver is."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return _binary("initdb") is not None and _binary("postgres") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as, when we are root (``None``: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


class PostgresServer:
    """One PostgreSQL cluster in ``folder``; :meth:`restart` brings it back on the same port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._user = _run_as()

    # -- addresses --

    def url(self, *, schema: str | None = None, database: str = DATABASE, password: bool = True) -> str:
        """A ``postgresql://`` URL of the server (with ``?schema=`` when given)."""
        secret = f":{PASSWORD}" if password else ""
        url = f"postgresql://{SUPERUSER}{secret}@{HOST}:{self.port}/{database}"
        return url if schema is None else f"{url}?schema={schema}"

    def connect(self, **kwargs: Any) -> Any:
        """A raw psycopg connection (autocommit), for checks that bypass the library."""
        import psycopg

        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.url(), **kwargs)

    def execute(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement on a fresh connection; its rows (empty for none)."""
        with contextlib.closing(self.connect()) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    # -- lifecycle --

    def _popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        return subprocess.Popen(args, cwd=self.folder, **kwargs)

    def _initdb(self) -> None:
        if self._user is not None:
            os.chown(self.folder, self._user.pw_uid, self._user.pw_gid)
        pwfile = self.folder / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._user is not None:
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        initdb = _binary("initdb")
        assert initdb is not None
        args = [
            initdb, "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
            "--no-sync",
        ]  # fmt: skip
        process = self._popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = process.communicate(timeout=120)
        pwfile.unlink()
        if process.returncode != 0:
            raise RuntimeError(f"initdb failed: {output.decode(errors='replace')[-2000:]}")

    def start(self) -> PostgresServer:
        """Create the cluster (the first time) and start the server; waits until it accepts."""
        if not self.data.exists():
            self._initdb()
        if not self.port:
            self.port = _free_port()
        postgres = _binary("postgres")
        assert postgres is not None
        args = [
            postgres, "-D", str(self.data), "-p", str(self.port),
            "-c", f"listen_addresses={HOST}",
            "-c", f"unix_socket_directories={self.folder}",
            # Throwaway data: no fsync (a crash of the OS is not what the tests simulate; a
            # killed server still keeps every commit, which reached the OS before the reply).
            "-c", "fsync=off", "-c", "full_page_writes=off",
            "-c", "max_connections=300",
            "-c", "log_min_messages=warning", "-c", "logging_collector=off",
        ]  # fmt: skip
        # Tied to this process: if it dies without stopping the server (a killed test run), the
        # kernel sends the server SIGINT (a fast shutdown) rather than leaving it running.
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            args = [setpriv, "--pdeathsig", "SIGINT", *args]
        log = open(self.folder / "postgres.log", "ab")  # noqa: SIM115 - kept open by the child
        try:
            self.process = self._popen(args, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        if not self._wait_ready(60.0):
            self.stop()
            tail = (self.folder / "postgres.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"postgres did not start on port {self.port}: {tail}")
        return self

    def _wait_ready(self, seconds: float) -> bool:
        import psycopg

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return False
            try:
                with psycopg.connect(self.url(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down: ``"fast"`` (abort transactions, clean), or ``"immediate"`` (a crash)."""
        process = self.process
        if process is None or process.poll() is not None:
            self.process = None
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.process = None

    def restart(self, mode: str = "fast") -> None:
        """Stop (``mode`` as :meth:`stop`) and start again, on the same port and data."""
        self.stop(mode)
        self.start()

    def terminate_backends(self, application_name: str | None = None) -> int:
        """``pg_terminate_backend`` every other client connection (of one application, if named),
        and wait until they are gone (termination is asynchronous); how many there were."""
        query = (
            "SELECT pid FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        params: tuple[Any, ...] = ()
        if application_name is not None:
            query += " AND application_name = %s"
            params = (application_name,)
        with contextlib.closing(self.connect()) as conn:
            pids = [pid for (pid,) in conn.execute(query, params).fetchall()]
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            deadline = time.monotonic() + 10
            while conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            ).fetchone()[0]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"backends {pids} did not end")
                time.sleep(0.01)
        return len(pids)

    def drop_schema(self, schema: str) -> None:
        """Remove a test's schema and everything in it."""
        self.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def new_schema() -> str:
    """A schema name no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


def server_folder() -> Path:
    """A fresh folder under /tmp (the unix socket path must stay short)."""
    return Path(tempfile.mkdtemp(prefix="iron-pg-", dir="/tmp"))


def _need_postgres() -> None:
    if not postgres_available():
        pytest.skip("PostgreSQL (initdb, postgres) or psycopg is not installed (scripts/test installs them)")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (per xdist worker); tests use a schema each."""
    _need_postgres()
    folder = server_folder()
    server = PostgresServer(folder).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, free to stop, kill and restart."""
    _need_postgres()
    folder = server_folder()
    server = PostgresServer(folder).start()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)
