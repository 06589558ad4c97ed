"""``copy``: agents and the audit trail from one store to another (backups, migrations)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Final

import typer

from ..config import ENV_AUDIT_KEY
from ..manager import StateManager
from ..models import AuditVerification
from .exit_codes import EXIT_CHECK_FAILED, CommandError
from .options import DebugOption, JsonOption
from .render import fmt_exact, print_verification
from .session import Session, clear_store, open_store, sqlite_path

__all__ = ["copy"]

#: Agents written per call to the destination.
COPY_BATCH: Final = 500
#: Audit records sealed per call to the destination.
AUDIT_BATCH: Final = 1000


def copy(
    source: Annotated[
        str, typer.Argument(metavar="SOURCE_URL", help="The store to read, e.g. sqlite:///iron_state.db.")
    ],
    destination: Annotated[
        str, typer.Argument(metavar="DEST_URL", help="The store to write, e.g. redis://localhost:6379/0.")
    ],
    append: Annotated[
        bool, typer.Option("--append", help="Add to a destination that already holds data.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Empty a destination that holds data first (destructive).")
    ] = False,
    dest_audit_key_env: Annotated[
        str,
        typer.Option(
            "--dest-audit-key-env",
            metavar="NAME",
            help="Environment variable holding the destination's audit HMAC key.",
        ),
    ] = ENV_AUDIT_KEY,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Copy agents and the audit trail from one store to another (backup, SQLite to Redis, ...).

    The source's chain is verified first. Audit events are appended in seq order and sealed
    into the destination's own chain (new seq numbers and hashes), which is verified at the
    end. Budget scopes are then set at the destination with their limits and periods (a
    budget_set event each), but not what they have spent in the current period; open budget
    reservations are not copied.
    """
    session = Session(source, json_output)
    if append and force:
        raise CommandError("choose one of --append and --force")
    with open_store(source) as src:
        # The source is read whole before the destination is opened: a source that cannot be
        # read, or whose chain is broken, leaves no destination behind.
        src_report = src.verify_audit_log()
        if not src_report.ok:
            raise CommandError(
                f"the source's audit trail is broken at seq {src_report.first_bad_seq} "
                f"({src_report.reason}); a copy would seal it as valid. "
                "Run `iron-state verify` and `export` it to investigate",
                EXIT_CHECK_FAILED,
            )
        created = _new_file(destination)
        try:
            with open_store(destination, must_exist=False, key_env=dest_audit_key_env) as dst:
                report = _copy_into(session, src, dst, append=append, force=force)
        except BaseException:
            if created is not None:
                _remove_store_file(created)
            raise
    if not report.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _copy_into(
    session: Session, src: StateManager, dst: StateManager, *, append: bool, force: bool
) -> AuditVerification:
    """Copy every agent and audit record of ``src`` into ``dst``; the destination's verification."""
    if src.url == dst.url or _same_file(src.url, dst.url):
        raise CommandError(f"the source and the destination are the same store ({src.url})")
    held = dst.stats().total, dst.audit_count(), len(dst.list_budgets())
    if any(held) and not (append or force):
        raise CommandError(
            f"{dst.url} already holds {held[0]:,} agents, {held[2]:,} budget scopes and {held[1]:,} "
            "audit records; pass --append to add to them, or --force to empty it first"
        )
    if force and any(held):
        removed, scopes, pruned = clear_store(dst)
        session.note(
            f"emptied {dst.url}: removed {removed:,} agents, {scopes:,} budget scopes "
            f"and {pruned:,} audit records"
        )
    started = time.perf_counter()
    total_agents, total_records = src.stats().total, src.audit_count()
    with session.progress() as progress:
        agents_task = progress.add_task("agents", total=total_agents)
        records_task = progress.add_task("audit records", total=total_records)
        copied_agents = 0
        for batch in _batches(src.iter_agent_states(batch_size=COPY_BATCH), COPY_BATCH):
            copied_agents += dst.save_agent_states(batch)
            progress.update(agents_task, advance=len(batch))
        copied_records = 0
        for records in _batches(src.iter_audit_log(page_size=5 * AUDIT_BATCH), AUDIT_BATCH):
            copied_records += len(dst.save_audit_logs((r.event for r in records), ledger=True))
            progress.update(records_task, advance=len(records))
        # After the trail, whose budget_set events tell the scopes' history: each set_budget
        # here appends one more, at the time of the copy.
        budgets = src.list_budgets()
        for budget in budgets:
            dst.set_budget(budget.scope, limit=budget.limit, period=budget.period, tz=budget.tz)
    not_carried = sum(b.spent_exact for b in budgets)
    if not_carried:
        session.note(
            f"note: {len(budgets):,} budget scopes were copied with their limits and periods, not their "
            f"spend this period ({fmt_exact(float(not_carried))} in all), which starts from 0 at the "
            "destination"
        )
    report = dst.verify_audit_log()
    seconds = time.perf_counter() - started
    if session.json:
        session.emit(
            {
                "source": src.url,
                "destination": dst.url,
                "agents": copied_agents,
                "budget_scopes": len(budgets),
                "audit_records": copied_records,
                "seconds": round(seconds, 3),
                "verification": report.to_dict(),
            }
        )
    else:
        session.say(
            f"copied {copied_agents:,} agents, {len(budgets):,} budget scopes and {copied_records:,} "
            f"audit records from {src.url} to {dst.url} in {seconds:.1f} s"
        )
        print_verification(session.out, dst.url, report)
    return report


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _new_file(url: str) -> Path | None:
    """The SQLite file ``url`` names if it does not exist yet (the copy will create it), else ``None``."""
    path = sqlite_path(url)
    return path if path is not None and not path.exists() else None


def _remove_store_file(path: Path) -> None:
    """Remove a store file this copy created, with SQLite's files beside it."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _same_file(a: str, b: str) -> bool:
    pa, pb = sqlite_path(a), sqlite_path(b)
    if pa is None or pb is None or not pb.exists():
        return False
    return pa.resolve() == pb.resolve()
