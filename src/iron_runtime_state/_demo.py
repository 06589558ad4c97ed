"""The simulated fleet behind ``iron-state demo``: the library doing its job, end to end.

The fleet is an organisation of two teams, as a platform team runs one: every agent carries the
labels ``fleet`` and ``team``, has a budget limit of its own, and draws on two monthly budget
scopes above it, the fleet's ``org:<fleet>`` and its team's ``team:<fleet>.<team>``. The support
team's budget is the tighter one: it runs out before the end of a default run.

Agents then work in steps, each a metered model call, as a program does it with the library:
the manager knows the prices of the demo's made-up models (:data:`DEMO_PRICES`, per million
tokens), every agent uses one of them, and before each call it holds the call's worst case
(:meth:`StateManager.reserve_for_call`: its prompt and ``max_output_tokens`` at the model's
price, held on the agent and on both scopes), then settles the real usage
(:meth:`BudgetHold.commit_usage`), which appends a ``spend`` record to the ledger and, when the
spend crosses 50 %, 80 % or 100 % of a budget, a ``budget_threshold`` event. Some see PII, some
fail, some run out of budget (their own, or their team's: the hold is refused, a
``budget_exceeded`` event names the budget and the agent stops), some finish, and the rest are
still running when the demo ends.

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

from .errors import BudgetExceeded, ConfigurationError
from .ids import AgentId
from .ledger import SpendRow
from .manager import StateManager
from .models import AgentState, AgentStatus, AuditEvent

__all__ = ["DEMO_PRICES", "DemoResult", "org_scope", "run_fleet", "team_scope"]

#: Budget limits the agents get, in currency units, with their weights.
LIMITS: Final = (10.0, 25.0, 50.0, 100.0)
LIMIT_WEIGHTS: Final = (3, 4, 2, 1)
#: The teams, their share of the agents, and their monthly budget per agent and step: the
#: support team's runs out before the end of a run, the research team's does not.
TEAMS: Final = ("support", "research")
TEAM_WEIGHTS: Final = (3, 2)
TEAM_BUDGET_PER_AGENT_STEP: Final = {"support": 1.1, "research": 2.0}
#: The organisation's monthly budget per agent and step (above both teams).
ORG_BUDGET_PER_AGENT_STEP: Final = 1.6
#: The demo's models and their prices per million tokens (made up: a call costs 0.5 to 3
#: units, an agent's step of real work), with the share of agents using each.
DEMO_PRICES: Final = {
    "demo-large": {"input": 300, "cached_input": 30, "output": 1200},
    "demo-small": {"input": 160, "cached_input": 16, "output": 640},
}
MODELS: Final = tuple(DEMO_PRICES)
MODEL_WEIGHTS: Final = (1, 1)
#: A call's prompt, in tokens; after the first step up to half of it is the provider's cache.
INPUT_TOKENS: Final = (2_000, 8_000)
#: The cap on a call's reply, which its hold covers; the reply uses a fifth of it to all of it.
MAX_OUTPUT_TOKENS: Final = 1_000
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
    team: str
    model: str
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
    #: The ``run`` tag of this run's spends, which tells them apart in the ledger from those of
    #: an earlier run of the same seed (whose fleet this run replaced).
    run: str = ""
    calls: int = 0  # model calls held and settled
    refused: int = 0  # holds refused: the agent hit its limit (or its team's) and stopped
    #: Refusals by the budget that refused: ``"agent"`` (its own limit) or a scope's name.
    refused_by: dict[str, int] = field(default_factory=dict)
    #: The budget scopes of this fleet: the org's, then each team's.
    scopes: list[str] = field(default_factory=list)
    #: This run's spend by model, from the spend ledger (``spend_report(group_by=("model",))``).
    spend_by_model: list[SpendRow] = field(default_factory=list)
    #: ``budget_threshold`` events this run wrote: spends that first reached 50 %, 80 % or
    #: 100 % of an agent's limit or of a scope's this period.
    threshold_alerts: int = 0
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
        team = rng.choices(TEAMS, TEAM_WEIGHTS)[0]
        model = rng.choices(MODELS, MODEL_WEIGHTS)[0]
        fail_at = rng.randint(1, steps) if rng.random() < FAIL_CHANCE else None
        finish_at = rng.randint(max(1, steps // 2), steps) if rng.random() < FINISH_CHANCE else None
        plans.append(_Plan(agent_id, limit, team, model, fail_at, finish_at))
    return plans


def org_scope(fleet: str) -> str:
    """The budget scope of a demo fleet's organisation."""
    return f"org:{fleet}"


def team_scope(fleet: str, team: str) -> str:
    """The budget scope of one team of a demo fleet."""
    return f"team:{fleet}.{team}"


def _set_budgets(manager: StateManager, fleet: str, plans: list[_Plan], steps: int) -> list[str]:
    """The fleet's monthly org and team budgets, from nothing spent; their names."""
    sizes = {team: sum(1 for p in plans if p.team == team) for team in TEAMS}
    limits = {org_scope(fleet): ORG_BUDGET_PER_AGENT_STEP * len(plans) * steps}
    for team in TEAMS:
        limits[team_scope(fleet, team)] = TEAM_BUDGET_PER_AGENT_STEP[team] * sizes[team] * steps
    for scope, limit in limits.items():
        # A fleet run again with the same seed starts its budgets afresh too (set_budget on an
        # existing scope would keep its spend).
        manager.remove_budget(scope)
        manager.set_budget(scope, limit=max(1, round(limit)), period="month")
    return list(limits)


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
    ``manager`` must price the demo's models: open it with ``prices=DEMO_PRICES``.
    """
    missing = [model for model in MODELS if manager.prices.price(model) is None]
    if missing:
        raise ConfigurationError(
            f"this manager has no price for the demo's model {missing[0]!r}; open it with "
            "prices=DEMO_PRICES (from iron_runtime_state._demo)"
        )
    started = time.perf_counter()
    rng = random.Random(seed)
    fleet = f"demo-{seed}" if seed is not None else f"demo-{uuid.uuid4().hex[:6]}"
    ids = _agent_ids(rng, agents, seed is not None)
    plans = _plans(rng, ids, steps)
    result = DemoResult(fleet=fleet, agent_ids=ids, steps=steps, seed=seed, run=uuid.uuid4().hex[:8])
    report = on_progress or (lambda advance, step, running: None)

    if seed is not None:
        result.replaced = sum(1 for s in manager.get_agent_states(ids) if s is not None)
    result.scopes = _set_budgets(manager, fleet, plans, steps)
    # Start the fleet: two batched writes, whatever its size.
    manager.save_agent_states(
        AgentState(
            p.agent_id,
            AgentStatus.RUNNING,
            budget_limit=p.limit,
            labels={"fleet": fleet, "team": p.team},
            budget_scopes=(org_scope(fleet), team_scope(fleet, p.team)),
        )
        for p in plans
    )
    started_records = manager.save_audit_logs(
        AuditEvent(
            p.agent_id,
            "agent_started",
            details=f'{{"fleet":"{fleet}","team":"{p.team}","budget_limit":{p.limit}}}',
        )
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
    tags = {"run": result.run}
    result.spend_by_model = manager.spend_report(group_by=("model",), labels={"fleet": fleet}, tags=tags)
    # The alerts come after the agents' start records (the first spend comes after them).
    after = started_records[-1].seq if started_records else None
    result.threshold_alerts = sum(
        1 for _ in manager.iter_audit_log(event_type="budget_threshold", after_seq=after)
    )
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
    input_tokens = rng.randint(*INPUT_TOKENS)
    # From the second step on, the start of the prompt (the task, the tools) is cached.
    cached = rng.randint(0, input_tokens // 2) if step > 1 else 0
    output_tokens = rng.randint(MAX_OUTPUT_TOKENS // 5, MAX_OUTPUT_TOKENS)
    try:
        # The hold covers the worst case, the reply's cap included, so the real usage is never
        # more than what was held: no call takes a budget past its limit.
        with manager.reserve_for_call(
            agent_id,
            model=plan.model,
            input_tokens=input_tokens,
            max_output_tokens=MAX_OUTPUT_TOKENS,
            tags={"run": result.run},
        ) as hold:
            hold.commit_usage(
                input_tokens=input_tokens, output_tokens=output_tokens, cached_input_tokens=cached
            )
    except BudgetExceeded as exc:
        # Refused before the call: nothing was spent anywhere, a budget_exceeded event names
        # the budget that refused (the agent's own, or a scope's).
        result.refused += 1
        by = exc.scope or "agent"
        result.refused_by[by] = result.refused_by.get(by, 0) + 1
        manager.set_status(agent_id, AgentStatus.STOPPED)
        return False
    result.calls += 1
    if plan.finish_at == step:
        manager.set_status(agent_id, AgentStatus.STOPPED)
        result.finished += 1
        return False
    return True
