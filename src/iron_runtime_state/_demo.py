"""The simulated fleet behind ``iron-state demo``: the library doing its job, end to end.

Agents start with a budget limit, then work in steps: before each model call they reserve an
estimate (:meth:`StateManager.budget`) and commit what the call really cost. Some see PII, some
fail, some run out of budget (the reservation is refused, a ``budget_exceeded`` event is written
and the agent stops), some finish, and the rest are still running when the demo ends.

Everything random comes from one ``random.Random(seed)``, so a seed gives the same fleet and
the same outcomes. This module does no terminal output; the command line draws the progress
bar through ``on_progress`` and the summary from :class:`DemoResult`.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .errors import BudgetExceeded
from .ids import AgentId
from .manager import StateManager
from .models import AgentState, AgentStatus, AuditEvent

__all__ = ["DemoResult", "run_fleet"]

#: Budget limits the agents get, in currency units, with their weights.
LIMITS: Final = (10.0, 25.0, 50.0, 100.0)
LIMIT_WEIGHTS: Final = (3, 4, 2, 1)
#: Chance per agent of failing at some step, and of finishing its task early.
FAIL_CHANCE: Final = 0.05
FINISH_CHANCE: Final = 0.45
#: Chance per agent and step that the output holds PII.
PII_CHANCE: Final = 0.012
ERRORS: Final = (
    "tool call timed out",
    "rate limited by the model provider",
    "malformed model output",
    "sandbox crashed",
)
PII_KINDS: Final = ("email", "phone", "iban", "passport", "address")
#: Agents processed between two progress callbacks.
PROGRESS_EVERY: Final = 50

ProgressFn = Callable[[int, int, int], None]
"""``on_progress(advance, step, running)``: ``advance`` more agent-steps are done, in step
``step``, and ``running`` agents are still running."""


@dataclass
class _Plan:
    agent_id: AgentId
    limit: float
    fail_at: int | None
    finish_at: int | None


@dataclass
class DemoResult:
    """What one demo run did. Counts are this run's, not the whole store's."""

    fleet: str
    agent_ids: list[AgentId]
    steps: int
    seed: int | None
    seconds: float = 0.0
    calls: int = 0  # committed model calls
    refused: int = 0  # reservations refused: the agent hit its limit and stopped
    overspent: int = 0  # commits whose real cost took the agent past its limit
    pii_events: int = 0
    failed: int = 0
    finished: int = 0
    replaced: int = 0  # agents of this fleet that were already in the store (same seed)
    errors: dict[str, int] = field(default_factory=dict)


def _agent_ids(rng: random.Random, count: int, seeded: bool) -> list[AgentId]:
    if not seeded:
        return [AgentId.generate() for _ in range(count)]
    return [AgentId.from_uuid(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def _plans(rng: random.Random, ids: list[AgentId], steps: int) -> list[_Plan]:
    plans = []
    for agent_id in ids:
        limit = rng.choices(LIMITS, LIMIT_WEIGHTS)[0]
        fail_at = rng.randint(1, steps) if rng.random() < FAIL_CHANCE else None
        finish_at = rng.randint(max(1, steps // 2), steps) if rng.random() < FINISH_CHANCE else None
        plans.append(_Plan(agent_id, limit, fail_at, finish_at))
    return plans


def run_fleet(
    manager: StateManager,
    *,
    agents: int,
    steps: int,
    seed: int | None = None,
    on_progress: ProgressFn | None = None,
) -> DemoResult:
    """Simulate ``agents`` agents for ``steps`` steps in ``manager``'s store.

    Without ``seed`` the agent ids are random, so every run adds a new fleet; with a seed the
    ids are derived from it too, and a second run with the same seed replaces that fleet.
    """
    started = time.perf_counter()
    rng = random.Random(seed)
    fleet = f"demo-{seed}" if seed is not None else f"demo-{uuid.uuid4().hex[:6]}"
    ids = _agent_ids(rng, agents, seed is not None)
    plans = _plans(rng, ids, steps)
    result = DemoResult(fleet=fleet, agent_ids=ids, steps=steps, seed=seed)
    report = on_progress or (lambda advance, step, running: None)

    if seed is not None:
        result.replaced = sum(1 for s in manager.get_agent_states(ids) if s is not None)
    # Start the fleet: two batched writes, whatever its size.
    manager.save_agent_states(
        AgentState(p.agent_id, AgentStatus.RUNNING, budget_limit=p.limit) for p in plans
    )
    manager.save_audit_logs(
        AuditEvent(p.agent_id, "agent_started", details=f'{{"fleet":"{fleet}","budget_limit":{p.limit}}}')
        for p in plans
    )

    active = plans
    for step in range(1, steps + 1):
        still: list[_Plan] = []
        pending = 0
        for done, plan in enumerate(active, 1):
            if _step(manager, rng, plan, step, result):
                still.append(plan)
            pending += 1
            if pending == PROGRESS_EVERY:
                # Running now: those that went on this step, and those not yet reached.
                report(pending, step, len(still) + len(active) - done)
                pending = 0
        # Agents that stopped earlier count as done for this step too.
        report(pending + len(plans) - len(active), step, len(still))
        active = still
    result.seconds = time.perf_counter() - started
    return result


def _step(manager: StateManager, rng: random.Random, plan: _Plan, step: int, result: DemoResult) -> bool:
    """One step of one agent; ``False`` when the agent stopped or failed."""
    agent_id = plan.agent_id
    if plan.fail_at == step:
        error = rng.choice(ERRORS)
        manager.save_audit_log(AuditEvent(agent_id, "agent_error", details=f'{{"error":"{error}"}}'))
        manager.set_status(agent_id, AgentStatus.FAILED)
        result.failed += 1
        result.errors[error] = result.errors.get(error, 0) + 1
        return False
    if rng.random() < PII_CHANCE:
        kind = rng.choice(PII_KINDS)
        manager.record_pii_detection(agent_id, rng.randint(1, 3), details=f"{kind} in model output")
        result.pii_events += 1
    estimate = round(rng.uniform(0.5, 3.0), 2)
    actual = round(estimate * rng.uniform(0.5, 1.25), 4)
    try:
        with manager.budget(agent_id, estimate) as hold:
            state = hold.commit(actual)
    except BudgetExceeded:
        # Refused before the call: nothing was spent, a budget_exceeded event was written.
        result.refused += 1
        manager.set_status(agent_id, AgentStatus.STOPPED)
        return False
    result.calls += 1
    if state.budget_limit is not None and state.budget_spent > state.budget_limit:
        result.overspent += 1
    if plan.finish_at == step:
        manager.set_status(agent_id, AgentStatus.STOPPED)
        result.finished += 1
        return False
    return True
