"""Fixtures that run every contract test against every store kind in ``stores.PROVISIONERS``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager

from .stores import PROVISIONERS, StoreHandle


@pytest.fixture(params=sorted(PROVISIONERS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreHandle]:
    """An empty store of each kind in turn."""
    handle = PROVISIONERS[request.param](request, tmp_path)
    try:
        yield handle
    finally:
        handle.close_all()


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
