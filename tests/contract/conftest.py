"""Fixtures that run every contract test against every store kind in ``stores.PROVISIONERS``,
through each API: ``StateManager`` ("sync") and ``AsyncStateManager`` ("async").

For "async" the tests, written once against StateManager, get a facade (facade.py) that turns
each call into the AsyncStateManager's coroutine on an event loop in a background thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager

from .facade import LoopThread
from .stores import PROVISIONERS, StoreHandle

APIS = ("sync", "async")


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    """Which manager the tests drive: StateManager, or AsyncStateManager behind the facade."""
    return str(request.param)


@pytest.fixture(params=sorted(PROVISIONERS))
def store(request: pytest.FixtureRequest, tmp_path: Path, api: str) -> Iterator[StoreHandle]:
    """An empty store of each kind in turn, opening managers of the api under test."""
    handle = PROVISIONERS[request.param](request, tmp_path)
    loop = LoopThread() if api == "async" else None
    if loop is not None:
        handle.wrap_async = loop.facade
    try:
        yield handle
    finally:
        try:
            handle.close_all()
        finally:
            if loop is not None:
                loop.close()


@pytest.fixture
def manager(store: StoreHandle) -> StateManager:
    """A manager over the empty store."""
    return store.open()


@pytest.fixture
def agent(manager: StateManager) -> AgentId:
    """A running agent with a budget limit of 10.0, saved in the store."""
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=10.0))
    return agent_id
