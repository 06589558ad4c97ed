"""The seed's compile-time check, in Python: mypy --strict rejects a str where an AgentId goes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GOOD = """
from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
manager = StateManager()
state = AgentState(AgentId.parse("agent_550e8400-e29b-41d4-a716-446655440000"), AgentStatus.RUNNING)
manager.save_agent_state(state)
found: AgentState | None = manager.get_agent_state("agent_550e8400-e29b-41d4-a716-446655440000")
ids: list[str] = manager.list_agents()
"""

BAD = """
from iron_runtime_state import AgentState, AgentStatus
state = AgentState(agent_id="agent_550e8400-e29b-41d4-a716-446655440000", status=AgentStatus.RUNNING)
"""


def _mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(source))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--python-version",
            "3.10",
            str(snippet),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )


def test_mypy_accepts_typed_use(tmp_path: Path) -> None:
    result = _mypy(tmp_path, GOOD)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_rejects_a_plain_string_id(tmp_path: Path) -> None:
    result = _mypy(tmp_path, BAD)
    assert result.returncode == 1, result.stdout
    assert (
        'Argument "agent_id" to "AgentState" has incompatible type "str"; expected "AgentId"' in result.stdout
    )
