"""The audit trail: ``audit`` (read and follow it), ``verify``, ``export`` and ``prune``."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from ..config import CLI_DEFAULT_URL
from ..ids import AgentId
from ..manager import StateManager
from ..models import AuditCheckpoint, AuditRecord
from .exit_codes import EXIT_CHECK_FAILED, EXIT_USAGE, CommandError
from .options import TIME_HELP, DebugOption, JsonOption, UrlOption, YesOption, parse_time
from .render import audit_table, clip, emit_stream, fmt_time, print_verification, record_json
from .session import Session, confirm

__all__ = [
    "ExportFormat",
    "audit",
    "checkpoint",
    "export",
    "prune",
    "read_checkpoint",
    "tail_audit",
    "verify",
]

AgentFilter = Annotated[
    str | None, typer.Option("--agent", "-a", metavar="ID", help="Only this agent's records.")
]
TypeFilter = Annotated[
    str | None,
    typer.Option(
        "--type", "-t", metavar="TYPE", help="Only this event type, e.g. budget_exceeded, pii_detected."
    ),
]
SinceFilter = Annotated[
    str | None, typer.Option("--since", metavar="WHEN", help=f"Records at or after: {TIME_HELP}.")
]
UntilFilter = Annotated[
    str | None, typer.Option("--until", metavar="WHEN", help=f"Records at or before: {TIME_HELP}.")
]


class ExportFormat(str, enum.Enum):
    """The formats of ``iron-state export``."""

    jsonl = "jsonl"
    csv = "csv"


def _audit_filters(
    agent: str | None, event_type: str | None, since: str | None, until: str | None
) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    if agent is not None:
        filters["agent_id"] = AgentId.parse_flexible(agent)
    if event_type is not None:
        filters["event_type"] = event_type
    if since is not None:
        filters["since"] = parse_time(since, "--since")
    if until is not None:
        filters["until"] = parse_time(until, "--until")
    return filters


def tail_audit(manager: StateManager, count: int, **filters: Any) -> list[AuditRecord]:
    """The newest ``count`` records matching ``filters``, oldest first.

    Queries only go forward in ``seq``, so this reads a window before the head and widens it
    until it holds ``count`` matches (or covers the whole trail).
    """
    if count <= 0:
        return []
    marks = manager.backend.audit_marks()
    head = marks.head[0]
    floor = max(marks.anchor[0], filters.pop("after_seq", None) or 0)
    window = max(4 * count, 256)
    while True:
        after = max(head - window, floor)
        records = manager.audit_log(after_seq=after, **filters)
        if len(records) >= count or after <= floor:
            return records[-count:]
        window *= 8


#: Seconds ``audit --follow`` waits for a record before it starts waiting again (tests set it low).
_FOLLOW_IDLE = 60.0


def _idle() -> None:
    """Called each time ``audit --follow`` waited ``_FOLLOW_IDLE`` seconds for nothing; tests replace it."""


def audit(
    agent: AgentFilter = None,
    event_type: TypeFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    after_seq: Annotated[
        int | None, typer.Option("--after-seq", min=0, metavar="SEQ", help="Only records after this seq.")
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", "-l", min=0, metavar="N", help="Show the newest N matching records; 0 for all."
        ),
    ] = 20,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records as they arrive (Ctrl-C stops).")
    ] = False,
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            min=0.05,
            metavar="SECONDS",
            hidden=True,
            help="Ignored (kept for old scripts): --follow waits on the store for new records.",
        ),
    ] = 1.0,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """The audit trail, oldest first: the newest --limit records matching the filters.

    With --follow, new records are printed as they are appended: the command waits on the store
    (StateManager.watch), so they show within a fraction of a second without polling. With
    --json: a JSON array; with --json --follow: one JSON object per line (JSON Lines).
    """
    session = Session(url, json_output)
    filters = _audit_filters(agent, event_type, since, until)
    if after_seq is not None:
        filters["after_seq"] = after_seq
    with session.open() as manager:
        # Read before the first query: whatever is appended after it is picked up by --follow.
        head = manager.backend.audit_marks().head[0] if follow else 0
        if limit == 0:
            records: Iterable[AuditRecord] = manager.iter_audit_log(**filters)
        else:
            records = tail_audit(manager, limit, **dict(filters))
        if not follow:
            if session.json:
                emit_stream(record_json(r) for r in records)
            else:
                shown = list(records)
                session.out.print(audit_table(shown, session.out.width))
                session.note(f"{len(shown):,} records shown; the trail holds {manager.audit_count():,}")
            return
        _follow(session, manager, records, head, filters)


def _follow(
    session: Session,
    manager: StateManager,
    first: Iterable[AuditRecord],
    head: int,
    filters: dict[str, Any],
) -> None:
    def show(r: AuditRecord) -> None:
        if session.json:
            session.emit_line(record_json(r))
        else:
            session.out.print(
                Text.assemble(
                    (f"{r.seq:>8} ", "dim"),
                    fmt_time(r.timestamp),
                    " ",
                    r.agent_id.as_str(),
                    " ",
                    (r.event_type, "cyan"),
                    " ",
                    clip(r.details, 120),
                )
            )

    seen = head
    for record in first:
        show(record)
        seen = max(seen, record.seq)
    filters.pop("after_seq", None)
    since, until = filters.pop("since", None), filters.pop("until", None)
    session.note(f"following {manager.url}; Ctrl-C to stop")
    try:
        while True:
            # Blocks on the store between records; ends after _FOLLOW_IDLE seconds without one.
            for record in manager.watch(after_seq=seen, idle_timeout=_FOLLOW_IDLE, **filters):
                seen = record.seq
                if (since is None or record.timestamp >= since) and (
                    until is None or record.timestamp <= until
                ):
                    show(record)
            _idle()
    except KeyboardInterrupt:
        session.note("stopped")


CheckpointOption = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        metavar="FILE",
        help="A checkpoint saved by 'iron-state checkpoint': fail if the trail no longer extends it.",
    ),
]


def verify(
    url: UrlOption = CLI_DEFAULT_URL,
    checkpoint: CheckpointOption = None,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Check the audit trail. Exit status 1, with the first bad record, if it is broken.

    Every record, the trail's head, anchor and count; with $IRON_STATE_AUDIT_KEY the seals of
    the head and anchor too (a chain sealed with a key verifies only with the same key). With
    --checkpoint, also that the trail still holds the record the checkpoint saw, which is how
    a removal of the newest records shows.
    """
    session = Session(url, json_output)
    witness = None if checkpoint is None else read_checkpoint(checkpoint)
    with session.open() as manager:
        report = manager.verify_audit_log(since_checkpoint=witness)
        if session.json:
            session.emit({"url": manager.url, **report.to_dict()})
        else:
            print_verification(session.out, manager.url, report)
    if not report.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


def checkpoint(
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="FILE", help="Write it to FILE (created; not overwritten)."),
    ] = None,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="With --out: a summary as JSON on stdout (without --out, stdout is the checkpoint: JSON).",
        ),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Print a checkpoint of the audit trail's head as JSON: keep it outside the store.

    'iron-state verify --checkpoint FILE' later fails if the store no longer extends it, for
    example after its newest records were removed. With $IRON_STATE_AUDIT_KEY it is signed.
    """
    session = Session(url, json_output)
    with session.open() as manager:
        witness = manager.audit_checkpoint()
    text = json.dumps(witness.to_dict(), sort_keys=True)
    if out is None:
        session.out.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    try:
        with out.open("x", encoding="utf-8") as file:
            file.write(text + "\n")
    except FileExistsError:
        raise CommandError(
            f"{str(out)[:200]} exists; choose a new file for the checkpoint", EXIT_USAGE
        ) from None
    if session.json:
        session.emit({"url": manager.url, "out": str(out), "seq": witness.seq, "hash": witness.hash})
        return
    session.note(f"checkpoint of seq {witness.seq} written to {out}")


def read_checkpoint(path: Path) -> AuditCheckpoint:
    """The checkpoint saved in ``path`` by ``iron-state checkpoint``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommandError(f"no checkpoint file {str(path)[:200]}", EXIT_USAGE) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CommandError(
            f"cannot read the checkpoint {str(path)[:200]}: {str(exc)[:200]}", EXIT_USAGE
        ) from None
    return AuditCheckpoint.from_dict(data)


def export(
    format: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", metavar="[jsonl|csv]", help="jsonl (with hashes) or csv."),
    ] = ExportFormat.jsonl,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", metavar="FILE", help="Write to this file instead of stdout.", dir_okay=False
        ),
    ] = None,
    agent: AgentFilter = None,
    event_type: TypeFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="With --output: a summary as JSON on stdout. Without it, stdout is the export (JSON Lines).",
        ),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Export the audit trail (or the filtered part) as JSON Lines or CSV, in seq order.

    Each JSONL line carries prev_hash and hash, so the chain can be checked elsewhere.
    """
    session = Session(url, json_output)
    if session.json and output is None and format is not ExportFormat.jsonl:
        raise CommandError(
            "--json without --output would print CSV as JSON: pass --output FILE (stdout then gets "
            "a JSON summary), or --format jsonl"
        )
    filters = _audit_filters(agent, event_type, since, until)
    with session.open() as manager:
        if output is None:
            count = manager.export_audit_log(sys.stdout, format=format.value, **filters)
            sys.stdout.flush()
        else:
            count = manager.export_audit_log(output, format=format.value, **filters)
        if session.json and output is not None:
            session.emit(
                {"url": manager.url, "output": str(output), "format": format.value, "records": count}
            )
            return
        session.note(
            f"exported {count:,} audit records as {format.value}" + (f" to {output}" if output else "")
        )


def prune(
    before: Annotated[
        str, typer.Option("--before", metavar="WHEN", help=f"Remove records older than this: {TIME_HELP}.")
    ],
    yes: YesOption = False,
    url: UrlOption = CLI_DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Remove the oldest audit records (retention). What remains still verifies.

    Only a prefix is removed: pruning stops at the first record that is not old enough.
    """
    session = Session(url, json_output)
    cutoff = parse_time(before, "--before")
    with session.open() as manager:
        confirm(yes, f"Remove the audit records before {fmt_time(cutoff)} from {manager.url}?")
        removed = manager.prune_audit_log(before=cutoff)
        remaining = manager.audit_count()
        if session.json:
            session.emit({"url": manager.url, "before": cutoff, "removed": removed, "remaining": remaining})
            return
        session.say(
            f"removed {removed:,} audit records before {fmt_time(cutoff)}; "
            f"{remaining:,} remain in {manager.url}"
        )
