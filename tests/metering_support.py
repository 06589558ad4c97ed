"""What the client hooks' tests share: the price table, an agent with a budget, the ledger."""

from __future__ import annotations

import json
from typing import Any

from iron_runtime_state import AgentId, AgentState, AgentStatus, AsyncStateManager, StateManager

PRICES = {"gpt-4o": {"input": "2.50", "output": "10.00", "cached_input": "1.25"}}
LIMIT = 1.0


def new_manager(agent: AgentId, limit: float = LIMIT) -> StateManager:
    """A memory store at ``PRICES`` with ``agent`` running under ``limit``."""
    manager = StateManager(prices=PRICES)
    manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=limit))
    return manager


async def new_async_manager(agent: AgentId, limit: float = LIMIT) -> AsyncStateManager:
    """:func:`new_manager` for asyncio."""
    manager = AsyncStateManager(prices=PRICES)
    await manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=limit))
    return manager


def spends(manager: StateManager) -> list[dict[str, Any]]:
    """The ledger's ``spend`` records, read."""
    return [json.loads(r.event.details) for r in manager.audit_log(event_type="spend")]


async def async_spends(manager: AsyncStateManager) -> list[dict[str, Any]]:
    """:func:`spends` for asyncio."""
    return [json.loads(r.event.details) for r in await manager.audit_log(event_type="spend")]
