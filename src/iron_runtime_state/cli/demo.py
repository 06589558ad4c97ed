"""``demo``: run a simulated fleet on a store and show what the library recorded."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from .._demo import DEMO_PRICES, DemoResult, run_fleet, team_scope
from ..config import CLI_DEFAULT_URL, DASHBOARD_PORT, METRICS_PORT
from ..manager import StateManager
from ..models import AgentState, AgentStatus, AuditRecord, BudgetState
from .audit import tail_audit
from .budgets import budget_json, budgets_table
from .options import DebugOption, JsonOption, UrlOption
from .render import audit_table, fmt_money, fmt_used, plural, status_text
from .session import Session, clear_store, url_flag

__all__ = ["demo"]


def demo(
    agents: Annotated[
        int, typer.Option("--agents", "-n", min=1, max=1_000_000, metavar="N", help="Agents in the fleet.")
    ] = 1000,
    steps: Annotated[
        int,
        typer.Option("--steps", "-s", min=1, max=10_000, metavar="M", help="Model calls per agent, at most."),
    ] = 10,
    seed: Annotated[
        int | None,
        typer.Option("--seed", metavar="S", help="Make the run reproducible (same ids and outcomes)."),
    ] = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="First remove every agent and audit record from the store.")
    ] = False,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Simulate a fleet of agents in two teams: metered model calls held and settled on each
    agent, its team and the org, a spend ledger, threshold alerts, PII, failures, exhausted limits.

    Runs on the embedded default store, a SQLite file in this folder (or --url). Every run adds
    a new fleet; --reset empties the store first.
    """
    session = Session(url, json_output)
    with session.open(must_exist=False, prices=DEMO_PRICES) as manager:
        if reset:
            removed, cleared, pruned = clear_store(manager)
            session.note(
                f"reset: removed {removed:,} agents, {cleared:,} budget scopes and {pruned:,} audit "
                f"records from {manager.url}"
            )
        with session.progress() as progress:
            task = progress.add_task("starting", total=agents * steps)

            def advance(done: int, step: int, running: int) -> None:
                progress.update(task, advance=done, description=f"step {step}/{steps} · {running:,} running")

            result = run_fleet(manager, agents=agents, steps=steps, seed=seed, on_progress=advance)
        states = [s for s in manager.get_agent_states(result.agent_ids) if s is not None]
        scopes = [b for b in map(manager.get_budget, result.scopes) if b is not None]
        stats = manager.stats()
        audit_records = manager.audit_count()
        if result.replaced:
            session.note(
                f"note: seed {seed}'s fleet was already in the store; its {result.replaced:,} agents "
                "were replaced (use another --seed, or none, to add a new fleet)"
            )
        by_status = _by_status(states)
        if session.json:
            session.emit(
                {
                    "url": manager.url,
                    "fleet": result.fleet,
                    "seed": seed,
                    "agents": agents,
                    "steps": steps,
                    "seconds": round(result.seconds, 3),
                    "by_status": by_status,
                    "calls": result.calls,
                    "refused": result.refused,
                    "refused_by": result.refused_by,
                    "budgets": [budget_json(b) for b in scopes],
                    "by_team": _by_team(states),
                    "spend_by_model": [row.to_dict() for row in result.spend_by_model],
                    "threshold_alerts": result.threshold_alerts,
                    "pii_events": result.pii_events,
                    "agents_with_pii": sum(1 for s in states if s.pii_detections),
                    "failed": result.failed,
                    "finished": result.finished,
                    "errors": result.errors,
                    "replaced": result.replaced,
                    "store": {**stats.to_dict(), "audit_records": audit_records},
                }
            )
            return
        last = tail_audit(manager, 8)
        _print_demo(session, manager, result, states, scopes, by_status, stats.total, audit_records, last)


def _by_status(states: Sequence[AgentState]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for status in AgentStatus:
        group = [s for s in states if s.status is status]
        rows[status.value] = {
            "agents": len(group),
            "budget_spent": round(sum(s.budget_spent for s in group), 4),
            "budget_limit": round(sum(s.budget_limit or 0.0 for s in group), 4),
            "pii_detections": sum(s.pii_detections for s in group),
        }
    return rows


def _by_team(states: Sequence[AgentState]) -> dict[str, int]:
    teams: dict[str, int] = {}
    for s in states:
        team = s.labels.get("team", "")
        teams[team] = teams.get(team, 0) + 1
    return dict(sorted(teams.items()))


def _refusals(result: DemoResult) -> str:
    """``252 agents stopped at a limit (reservation refused): 40 at their own, 212 at team:...``."""
    text = f"{plural(result.refused, 'agent')} stopped at a limit (reservation refused)"
    parts = [
        f"{count:,} at {'their own' if by == 'agent' else by}"
        for by, count in sorted(result.refused_by.items(), key=lambda item: (item[0] != "agent", item[0]))
    ]
    return f"{text}: {', '.join(parts)}" if parts else text


def _spend(result: DemoResult) -> str:
    """``demo-large 6,883.26 on 3,561 calls, demo-small ...; 683 threshold alerts ...``."""
    models = ", ".join(
        f"{row.group['model'] or 'no model'} {fmt_money(row.amount)} on {plural(row.calls, 'call')}"
        for row in result.spend_by_model
    )
    return (
        f"{models or 'nothing'} (from the spend ledger); "
        f"{plural(result.threshold_alerts, 'threshold alert')} (50%, 80% or 100% of a budget reached)"
    )


def _print_demo(
    session: Session,
    manager: StateManager,
    result: DemoResult,
    states: Sequence[AgentState],
    scopes: Sequence[BudgetState],
    by_status: dict[str, dict[str, Any]],
    store_agents: int,
    audit_records: int,
    last: Sequence[AuditRecord],
) -> None:
    out = session.out
    n = len(result.agent_ids)
    out.print(
        Text.assemble(
            (f"Fleet {result.fleet}", "bold"),
            f": {n:,} agents, up to {result.steps} model calls each, "
            f"in {result.seconds:.1f} s on {manager.url}",
        )
    )
    out.print("[bold]Agents by status[/bold]")
    table = Table()
    for name, justify in (
        ("status", "left"),
        ("agents", "right"),
        ("spent", "right"),
        ("limits", "right"),
        ("used", "right"),
        ("PII", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    total = {"agents": 0, "budget_spent": 0.0, "budget_limit": 0.0, "pii_detections": 0}
    for status in AgentStatus:
        row = by_status[status.value]
        for key in total:
            total[key] += row[key]
        table.add_row(
            status_text(status),
            f"{row['agents']:,}",
            fmt_money(row["budget_spent"]),
            fmt_money(row["budget_limit"]),
            fmt_used(row["budget_spent"], row["budget_limit"]),
            f"{row['pii_detections']:,}",
        )
    table.add_section()
    table.add_row(
        "total",
        f"{int(total['agents']):,}",
        fmt_money(total["budget_spent"]),
        fmt_money(total["budget_limit"]),
        fmt_used(total["budget_spent"], total["budget_limit"]),
        f"{int(total['pii_detections']):,}",
    )
    out.print(table)
    pii_agents = sum(1 for s in states if s.pii_detections)
    errors = ", ".join(
        f"{count} {error}" for error, count in sorted(result.errors.items(), key=lambda e: -e[1])
    )
    lines = [
        (
            "Budget",
            f"{plural(result.calls, 'model call')} held at their worst case and settled at their "
            f"real usage; {_refusals(result)}",
        ),
        ("Spend", _spend(result)),
        ("PII", f"{plural(result.pii_events, 'detection event')} on {plural(pii_agents, 'agent')}"),
        ("Failures", f"{plural(result.failed, 'agent')} failed" + (f": {errors}" if errors else "")),
        ("Finished", f"{plural(result.finished, 'agent')} completed their task; the others still run"),
        (
            "Store",
            f"{plural(store_agents, 'agent')} and {plural(audit_records, 'audit record')} in {manager.url}",
        ),
    ]
    for label, text in lines:
        # Wrapped by hand, with a hanging indent, so that nothing pads lines with spaces.
        first, *rest = textwrap.wrap(
            f"{label:<10}{text}", width=min(out.width, 120), subsequent_indent=" " * 10
        )
        out.print(Text.assemble((first[:10], "bold"), first[10:]))
        for line in rest:
            out.print(line, markup=False)
    if scopes:
        out.print()
        sizes = ", ".join(f"{count:,} {team}" for team, count in _by_team(states).items())
        out.print(
            Text.assemble(("Budgets", "bold"), f" of the org and its teams ({sizes} agents), per month")
        )
        out.print(budgets_table(scopes))
    out.print()
    out.print("[bold]Last audit events[/bold]")
    out.print(audit_table(last, out.width))
    flag = url_flag(session.url)
    example = next((s for s in states if s.status is AgentStatus.FAILED), states[0] if states else None)
    # The team whose budget refused the most calls (the one worth a look), by name on a tie.
    teams = sorted({s.labels["team"] for s in states if "team" in s.labels})
    team = max(teams, key=lambda t: result.refused_by.get(team_scope(result.fleet, t), 0), default=None)
    commands = [
        (f"iron-state stats{flag}", "fleet totals"),
        (f"iron-state budgets{flag}", "the org's and the teams' budgets"),
        (f"iron-state agents --status failed{flag}", "the agents that failed"),
        (f"iron-state agents --sort spent --limit 10{flag}", "the biggest spenders"),
    ]
    if team is not None:
        labels = f"--label fleet={result.fleet} --label team={team}"
        commands.append(
            (
                f"iron-state agents {labels} --sort spent --limit 5{flag}",
                f"the {team} team's biggest spenders",
            )
        )
    if example is not None:
        commands.append((f"iron-state show {example.agent_id}{flag}", "one agent and its audit events"))
    commands += [
        (f"iron-state spend --by model,day{flag}", "the spend ledger by model and day"),
        (f"iron-state audit --type budget_threshold --limit 5{flag}", "threshold alerts"),
        (f"iron-state audit --type budget_exceeded --limit 5{flag}", "refused calls, naming the budget"),
        (f"iron-state verify{flag}", "check the audit trail's hash chain"),
        (f"iron-state metrics --port {METRICS_PORT}{flag}", "serve Prometheus metrics"),
        (
            f"iron-state serve --port {DASHBOARD_PORT}{flag}",
            f"the live dashboard: http://127.0.0.1:{DASHBOARD_PORT}/",
        ),
    ]
    out.print()
    if manager.url.startswith("memory:"):
        out.print(
            "memory:// lives only as long as this command; run the demo with --url sqlite:///demo.db "
            "(or redis://...) to explore the fleet afterwards.",
            markup=False,
        )
        return
    out.print("[bold]Explore further[/bold]")
    for command, why in commands:
        out.print(Text.assemble("  ", (command, "cyan"), ("  # " + why, "dim")))
