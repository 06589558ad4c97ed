"""The README's Python examples run as written (those that need a Redis on localhost excepted)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iron_runtime_state import AgentId, AuditEvent, StateManager

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "localhost:6379" in source:
        pytest.skip("needs a Redis server on localhost:6379 (the Redis examples run in test_redis.py)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IRON_STATE_URL", raising=False)
    if "audit.jsonl" in source:
        with StateManager() as manager:
            agent_id = AgentId.generate()
            manager.save_audit_log(AuditEvent(agent_id, "pii_detected", 1, "Email address"))
            manager.save_audit_log(AuditEvent(agent_id, "note", 2, 'ünïcode "quoted"'))
            manager.export_audit_log(tmp_path / "audit.jsonl")
    exec(compile(source, str(README), "exec"), {"__name__": "readme_example"})
