"""Verifying the audit trail while it is pruned: a moved anchor is no tampering.

The interleaving is forced: the store prunes just as the verifier starts reading rows, after
it read the anchor. The contract suite covers verification and pruning each on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from iron_runtime_state import AgentId, AsyncStateManager, AuditEvent, StateManager
from iron_runtime_state.audit_chain import AuditRow


def _events(agent_id: AgentId) -> list[AuditEvent]:
    return [AuditEvent(agent_id, "tick", 100 + i, f"step {i}") for i in range(10)]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_prune_during_verification_is_not_reported_as_tampering(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'state.db'}"
    with StateManager.from_url(url) as manager:
        manager.save_audit_logs(_events(AgentId.generate()))
        backend = manager.backend
        read = backend.iter_audit_rows
        pruned: list[int] = []

        def iter_rows(after_seq: int, batch_size: int) -> Iterator[AuditRow]:
            if not pruned:  # the anchor was read: another process prunes now
                pruned.append(backend.prune_audit(105, manager._chain))
            return read(after_seq, batch_size)

        monkeypatch.setattr(backend, "iter_audit_rows", iter_rows)
        report = manager.verify_audit_log()
        assert pruned == [5]
        assert report.ok, report
        assert (report.checked, report.anchor_seq) == (5, 5)


def test_tampering_is_still_reported_when_a_prune_ran_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    path = tmp_path / "state.db"
    with StateManager.with_sqlite(path) as manager:
        manager.save_audit_logs(_events(AgentId.generate()))
        with sqlite3.connect(path) as db:
            db.execute("UPDATE iron_audit SET details = 'edited' WHERE seq = 8")
        db.close()
        backend = manager.backend
        read = backend.iter_audit_rows
        pruned: list[int] = []

        def iter_rows(after_seq: int, batch_size: int) -> Iterator[AuditRow]:
            if not pruned:
                pruned.append(backend.prune_audit(105, manager._chain))
            return read(after_seq, batch_size)

        monkeypatch.setattr(backend, "iter_audit_rows", iter_rows)
        report = manager.verify_audit_log()
        assert not report.ok
        assert report.first_bad_seq == 8


def test_the_async_manager_also_verifies_again_after_a_prune(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with AsyncStateManager() as manager:
            await manager.save_audit_logs(_events(AgentId.generate()))
            backend = manager._backend
            read = backend.stream
            pruned: list[int] = []

            async def iter_rows(after_seq: int, batch_size: int) -> AsyncIterator[AuditRow]:
                if not pruned:
                    pruned.append(await backend.call("prune_audit", 105, manager._chain))
                async for row in read("iter_audit_rows", after_seq, batch_size):
                    yield row

            def stream(name: str, *args: Any) -> AsyncIterator[Any]:
                return iter_rows(*args) if name == "iter_audit_rows" else read(name, *args)

            monkeypatch.setattr(backend, "stream", stream)
            report = await manager.verify_audit_log()
            assert pruned == [5]
            assert report.ok, report
            assert report.checked == 5

    asyncio.run(main())
