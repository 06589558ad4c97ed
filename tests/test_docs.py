"""Every Python example in README.md and docs/*.md runs as printed and prints what it says.

Each example runs exactly as printed, in a new interpreter, in a new empty temporary folder,
with no ``IRON_STATE_*`` variable set, as a new user would paste it.

What an example prints is stated in it, one line of output per comment ``# -> TEXT`` (at the
end of the line that prints, or alone on the lines after it). In the order they appear these
comments are the example's whole standard output; an example without one prints nothing.
``...`` in a stated line stands for any text (an id, a hash, a time).

An example that names ``redis://localhost:6379`` runs against a redis-server the tests start
on a free loopback port: only that host and port are replaced (``-k "not redis"`` leaves them
out, as it does every Redis test). One that names ``postgresql://app:secret@localhost:5432/app``
runs against the tests' PostgreSQL server (its user, password, port and database replace those),
and the schemas it creates are dropped afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LOCAL_REDIS = "redis://localhost:6379"
LOCAL_POSTGRES = "postgresql://app:secret@localhost:5432/app"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_STATED = re.compile(r"#\s->(?: (.*))?$")


@dataclass(frozen=True)
class Example:
    """One ``python`` block of a document."""

    document: Path
    line: int  # of the opening fence
    source: str

    @property
    def needs_redis(self) -> bool:
        return LOCAL_REDIS in self.source

    @property
    def needs_postgres(self) -> bool:
        return LOCAL_POSTGRES in self.source

    @property
    def name(self) -> str:
        suffix = "-redis" if self.needs_redis else "-postgres" if self.needs_postgres else ""
        return f"{self.document.name}:{self.line}{suffix}"

    def stated_output(self) -> list[str]:
        """The output lines its ``# ->`` comments state, in order."""
        return [(m.group(1) or "") for line in self.source.splitlines() if (m := _STATED.search(line))]


def examples() -> list[Example]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Example(document, line, match.group(1)))
    return found


EXAMPLES = examples()


def matches(stated: str, printed: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in stated.split("..."))
    return re.fullmatch(pattern, printed) is not None


def test_the_documents_have_examples() -> None:
    by_document = {example.document.name for example in EXAMPLES}
    assert {"README.md", "async.md", "cli.md", "redis.md", "sqlite.md"} <= by_document
    assert sum(example.document.name == "README.md" for example in EXAMPLES) >= 4


def test_stated_output_matches_with_wildcards() -> None:
    assert matches("FleetStats(total=..., running=...)", "FleetStats(total=3, running=1)")
    assert not matches("spent 0.67", "spent 0.6699999999999999")
    assert not matches("a...b", "a\nb")
    assert Example(Path("x.md"), 1, 'print(1)  # -> 1\n# -> two\n#   ->\nx = "# ->"\n').stated_output() == [
        "1",
        "two",
    ]


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.name for example in EXAMPLES])
def test_example_runs_as_printed(example: Example, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    source = example.source
    if example.needs_redis:
        server = request.getfixturevalue("redis_server")
        source = source.replace(LOCAL_REDIS, f"redis://127.0.0.1:{server.port}")
    schemas: set[str] | None = None
    if example.needs_postgres:
        pg = request.getfixturevalue("postgres_server")
        source = source.replace(LOCAL_POSTGRES, pg.url())
        schemas = {name for (name,) in pg.execute("SELECT nspname FROM pg_namespace")}
        request.addfinalizer(
            lambda: [
                pg.drop_schema(name)
                for (name,) in pg.execute("SELECT nspname FROM pg_namespace")
                if name not in (schemas or set())
            ]
        )
    if "prometheus_client" in source:
        pytest.importorskip("prometheus_client")
    env = {name: value for name, value in os.environ.items() if not name.startswith("IRON_STATE_")}
    env["PYTHONUTF8"] = "1"
    done = subprocess.run(
        [sys.executable, "-"],
        input=source,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    where = f"{example.document.name}, the example at line {example.line}"
    assert done.returncode == 0, f"{where} failed:\n{done.stderr[-3000:]}"
    printed = done.stdout.splitlines()
    stated = example.stated_output()
    shown = f"{where} printed:\n{done.stdout}\nits comments state:\n" + "\n".join(stated)
    assert len(printed) == len(stated), shown
    assert all(map(matches, stated, printed)), shown
