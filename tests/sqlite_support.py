"""Helpers of the SQLite tests: worker subprocesses (tests/sqlite_worker.py) and raw access."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

WORKER = Path(__file__).with_name("sqlite_worker.py")


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def header_of(path: Path) -> tuple[int, int]:
    """(user_version, application_id) read with raw sqlite3."""
    db = raw(path)
    try:
        return (
            db.execute("PRAGMA user_version").fetchone()[0],
            db.execute("PRAGMA application_id").fetchone()[0],
        )
    finally:
        db.close()


class Workers:
    """Subprocesses running tests/sqlite_worker.py; any still running at the end are killed."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, job: str, *args: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), job, *(str(a) for a in args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def start_together(procs: list[subprocess.Popen[str]]) -> None:
        """Wait until every worker is ready, then release them all at once."""
        for proc in procs:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

    @staticmethod
    def rest_of(proc: subprocess.Popen[str]) -> tuple[str, str]:
        """The rest of the worker's stdout and stderr, once it exited.

        Read through the same file objects as ``readline``: ``communicate()`` would read the
        pipes' file descriptors and miss what those objects have already buffered.
        """
        assert proc.stdout is not None
        assert proc.stderr is not None
        out = proc.stdout.read()
        err = proc.stderr.read()
        proc.wait(timeout=60)
        return out, err

    def finish(self, proc: subprocess.Popen[str]) -> list[str]:
        """The worker's remaining output lines once it exited; fails on a non-zero exit."""
        out, err = self.rest_of(proc)
        assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
        assert "database is locked" not in err
        return out.splitlines()

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def worker_group() -> Iterator[Workers]:
    """The ``workers`` fixture's body (each test module makes it its fixture)."""
    group = Workers()
    try:
        yield group
    finally:
        group.kill_all()
