"""The commands of ``iron-state`` (Typer and Rich); :mod:`iron_runtime_state.cli` is the entry point.

Each command opens the store named by ``--url``, calls the public :class:`StateManager` API and
prints a table (stdout), or JSON with ``--json``. Progress bars and notes go to stderr. Errors
are raised as :class:`StateError` subclasses and turned into one line and an exit status in
one place, :meth:`_Group.main`.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import inspect
import itertools
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn, TypeVar
from urllib.parse import unquote

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from . import __version__
from ._demo import DemoResult, run_fleet
from .cli import (
    DEFAULT_URL,
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from .errors import (
    AgentNotFound,
    BackendError,
    ConfigurationError,
    StateError,
    ValidationError,
)
from .ids import AgentId
from .manager import StateManager
from .models import MAX_TIMESTAMP, AgentState, AgentStatus, AuditRecord, AuditVerification

__all__ = ["CommandError", "app", "run"]

ENV_URL: Final = "IRON_STATE_URL"
ENV_AUDIT_KEY: Final = "IRON_STATE_AUDIT_KEY"
ENV_DEBUG: Final = "IRON_STATE_DEBUG"
DEFAULT_METRICS_PORT: Final = 9464  # metrics.DEFAULT_PORT, without importing prometheus_client
COPY_BATCH: Final = 500
AUDIT_BATCH: Final = 1000
DETAILS_WIDTH: Final = 100

logger: Final = logging.getLogger("iron_runtime_state.cli")


class CommandError(StateError):
    """A command that cannot go on (a refused destination, a missing file); carries its exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- errors and exit statuses, in one place --------------------------------------------------------


class _Flags:
    """What the options parsed so far asked for (reset by every run)."""

    debug = False


_FLAGS = _Flags()


def _set_debug(value: bool) -> bool:
    if value:
        _FLAGS.debug = True
    return value


def exit_code_for(exc: BaseException) -> int:
    """The documented exit status for an error (see :mod:`iron_runtime_state.cli`)."""
    if isinstance(exc, CommandError):
        return exc.exit_code
    if isinstance(exc, AgentNotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, BackendError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, (ValueError, TypeError)):  # IdError, ValidationError, ConfigurationError, ...
        return EXIT_USAGE
    return EXIT_CHECK_FAILED


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _fail(message: str, code: int) -> int:
    sys.stdout.flush()
    print(f"error: {_one_line(message)}", file=sys.stderr)
    return code


def _usage_error_types() -> tuple[type[BaseException], ...]:
    # Click's exception base: typer >= 0.22 vendors Click as typer._click, older ones use click.
    # Found through a public name, so both work.
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == "ClickException":
            return (cls,)
    return ()  # pragma: no cover


_USAGE_ERRORS: Final = _usage_error_types()


class _Group(TyperGroup):
    """The root command: every error becomes one line on stderr and a documented exit status."""

    def main(  # type: ignore[override]  # the same signature, narrowed to what we pass on
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        _FLAGS.debug = os.environ.get(ENV_DEBUG, "").lower() in ("1", "true", "yes", "on")
        try:
            code = self._run(args, prog_name, complete_var, extra)
        finally:
            _FLAGS.debug = False
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(
        self,
        args: Sequence[str] | None,
        prog_name: str | None,
        complete_var: str | None,
        extra: dict[str, Any],
    ) -> int:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except StateError as exc:
            if _FLAGS.debug:
                raise
            return _fail(str(exc), exit_code_for(exc))
        except _USAGE_ERRORS as exc:
            return self._usage(exc)
        except typer.Abort:
            return _fail("aborted", EXIT_CHECK_FAILED)
        except BrokenPipeError:
            # The reader went away (``iron-state audit | head``): not an error.
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # stop the interpreter's final flush
            return EXIT_OK
        except OSError as exc:
            if _FLAGS.debug:
                raise
            return _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", EXIT_USAGE)
        if rv == EXIT_INTERRUPTED:
            print("interrupted", file=sys.stderr)
        return rv if isinstance(rv, int) else EXIT_OK

    def _usage(self, exc: BaseException) -> int:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare ``iron-state``: show the help
            # Typer's rich help has already printed itself while the error was made.
            text = exc.format_message() if hasattr(exc, "format_message") else ""
            if text.strip():
                print(text)
            return EXIT_OK
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        return _fail(f"{message}{hint}", int(getattr(exc, "exit_code", EXIT_USAGE)))


app = typer.Typer(
    name="iron-state",
    cls=_Group,
    help=(
        "Look at and manage the live state of a fleet of AI agents: statuses, budgets, PII "
        "detections and the hash-chained audit trail.\n\n"
        "New here? Run [bold]iron-state demo[/bold]."
    ),
    epilog=(
        "Exit statuses: 0 ok, 1 check failed, 2 bad input, 3 store unreachable, 4 not found. "
        "Guide: docs/cli.md"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


_F = TypeVar("_F", bound=Callable[..., Any])


def _reflow(doc: str) -> str:
    # Typer's rich help keeps single line breaks after the first paragraph; join them.
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


def _command(panel: str) -> Callable[[_F], _F]:
    """Register a command under a heading of ``iron-state --help``, its docstring as help."""

    def register(fn: _F) -> _F:
        app.command(rich_help_panel=panel, help=_reflow(fn.__doc__ or ""))(fn)
        return fn

    return register


def _version(value: bool) -> None:
    if value:
        print(f"iron-state {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """The live state of a fleet of AI agents."""


# -- options every command shares ------------------------------------------------------------------

UrlOption = Annotated[
    str,
    typer.Option(
        "--url",
        "-u",
        envvar=ENV_URL,
        show_envvar=True,
        help="Store URL: sqlite:///file.db, sqlite:////abs/path.db, redis://host:6379/0, memory://",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Machine output: one JSON document on stdout (messages on stderr).")
]
DebugOption = Annotated[
    bool,
    typer.Option(
        "--debug", envvar=ENV_DEBUG, callback=_set_debug, help="Show tracebacks and debug logs on errors."
    ),
]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


class StatusChoice(str, enum.Enum):
    """An agent status, as typed on the command line."""

    running = "running"
    stopped = "stopped"
    failed = "failed"


class ExportFormat(str, enum.Enum):
    """The formats of ``iron-state export``."""

    jsonl = "jsonl"
    csv = "csv"


class SortKey(str, enum.Enum):
    """How ``iron-state agents`` orders its rows."""

    store = "store"
    id = "id"
    spent = "spent"
    pii = "pii"
    used = "used"


# -- opening stores ----------------------------------------------------------------------------------


def sqlite_path(url: str) -> Path | None:
    """The file a ``sqlite:///`` URL names (``None`` for other URLs and in-memory SQLite)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "sqlite" or not rest.startswith("/"):
        return None
    raw = unquote(rest[1:].split("?", 1)[0])
    if raw in ("", ":memory:"):
        return None
    return Path(raw)


def _check_url(url: str) -> None:
    if "://" in url:
        return
    hint = ""
    if url.endswith((".db", ".sqlite", ".sqlite3")):
        hint = f"; did you mean sqlite:///{url}?"
    elif url.startswith("localhost") or re.fullmatch(r"[\w.-]+:\d+(/\d+)?", url):
        hint = f"; did you mean redis://{url}?"
    raise ConfigurationError(
        f"{url[:64]!r} is not a store URL (sqlite:///file.db, redis://host:6379/0, memory://){hint}"
    )


def _audit_key(env_name: str) -> str | None:
    key = os.environ.get(env_name) or None
    if key is not None and len(key.encode("utf-8")) < 16:
        raise ConfigurationError(
            f"${env_name} is shorter than 16 bytes; use a long random key, e.g. "
            'python -c "import secrets; print(secrets.token_hex(32))"'
        )
    return key


def open_store(url: str, *, must_exist: bool = True, key_env: str = ENV_AUDIT_KEY) -> StateManager:
    """A manager for ``url``; with ``must_exist``, a missing SQLite file is an error, not a new file.

    The audit chain's HMAC key, if any, comes from the environment variable ``key_env``.
    """
    _check_url(url)
    path = sqlite_path(url)
    if must_exist and path is not None and not path.exists():
        raise CommandError(
            f"{url}: no such file {str(path)!r} (create a store with `iron-state demo{_url_flag(url)}`, "
            "or pass the right --url)",
            EXIT_NOT_FOUND,
        )
    return StateManager.from_url(url, audit_key=_audit_key(key_env))


class Session:
    """One command's output streams and store."""

    def __init__(self, url: str, json_output: bool = False) -> None:
        self.url = url
        self.json = json_output
        self.out = _console(stderr=False)
        self.err = _console(stderr=True)

    def open(self, *, must_exist: bool = True) -> StateManager:
        """The manager for ``--url`` (close it, or use it in a ``with``)."""
        return open_store(self.url, must_exist=must_exist)

    def emit(self, data: Any) -> None:
        """Write one JSON document to stdout."""
        sys.stdout.write(json.dumps(data, indent=2, allow_nan=False))
        sys.stdout.write("\n")

    def say(self, message: str) -> None:
        """A line of human output on stdout (plain text: no Rich markup is read in it)."""
        self.out.print(message, markup=False)

    def note(self, message: str) -> None:
        """A message for the person at the terminal (stderr, never mixed into output)."""
        self.err.print(message, markup=False)

    def progress(self) -> Progress:
        """A progress bar on stderr (drawn only when stderr is a terminal)."""
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            disable=not self.err.is_terminal,
        )


def _console(*, stderr: bool) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        # A pipe or file: do not cut tables at 80 columns (Rich's default width there).
        console = Console(stderr=stderr, highlight=False, width=max(console.width, 200))
    return console


# -- formatting --------------------------------------------------------------------------------------


def fmt_time(timestamp: int) -> str:
    """Unix seconds as ISO 8601 UTC, e.g. ``2024-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_money(value: float | None) -> str:
    """An amount with two decimals, ``-`` for none."""
    return "-" if value is None else f"{value:,.2f}"


def fmt_used(spent: float, limit: float | None) -> str:
    """Spend as a percentage of the limit."""
    if limit is None:
        return "-"
    if limit == 0:
        return "100%" if spent == 0 else "over"
    return f"{100 * spent / limit:.0f}%"


def _n(count: int, noun: str) -> str:
    """``1 agent``, ``2 agents``, ``1,000 agents``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _clip(text: str, width: int = DETAILS_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _status_text(status: AgentStatus) -> Text:
    style = {"running": "green", "stopped": "yellow", "failed": "red"}[status.value]
    return Text(status.value, style=style)


def _audit_table(records: Sequence[AuditRecord], width: int) -> Table:
    """Audit records, one line each, fitted to ``width`` columns.

    Only the details are shortened (with an ellipsis); in a narrow terminal the time column goes
    first, so that the ids, which users copy into other commands, stay whole.
    """
    seq_w = max((len(str(r.seq)) for r in records), default=3)
    event_w = max((len(r.event_type) for r in records), default=5)

    def room(time_w: int) -> int:
        # Rich's default box: each column adds 2 of padding and 1 border, plus the last border.
        columns = 5 if time_w else 4
        return width - (max(seq_w, 3) + time_w + 42 + max(event_w, 5)) - 3 * columns - 1

    # The full UTC time, then a shorter one, then none: the ids, which users copy, stay whole.
    time_w, time_fmt = next(
        ((w, f) for w, f in ((20, "%Y-%m-%dT%H:%M:%SZ"), (14, "%m-%d %H:%M:%S")) if room(w) >= 24), (0, "")
    )
    details_w = max(12, min(DETAILS_WIDTH, room(time_w)))
    table = Table()
    table.add_column("seq", no_wrap=True, justify="right")
    if time_w:
        table.add_column("time (UTC)", no_wrap=True, min_width=time_w)
    table.add_column("agent", no_wrap=True, min_width=42)
    table.add_column("event", no_wrap=True)
    table.add_column("details", no_wrap=True, overflow="ellipsis", max_width=details_w)
    for r in records:
        cells: list[str | Text] = [str(r.seq)]
        if time_w:
            cells.append(datetime.fromtimestamp(r.timestamp, tz=timezone.utc).strftime(time_fmt))
        cells += [
            Text(r.agent_id.as_str()),
            Text(r.event_type, style="cyan"),
            Text(_clip(r.details, details_w)),
        ]
        table.add_row(*cells)
    return table


def _agents_table(states: Iterable[AgentState]) -> Table:
    table = Table()
    table.add_column("agent", no_wrap=True)
    table.add_column("status")
    table.add_column("spent", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("used", justify="right")
    table.add_column("PII", justify="right")
    for s in states:
        table.add_row(
            Text(s.agent_id.as_str()),
            _status_text(s.status),
            fmt_money(s.budget_spent),
            fmt_money(s.budget_limit),
            fmt_used(s.budget_spent, s.budget_limit),
            str(s.pii_detections),
        )
    return table


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- times and durations -----------------------------------------------------------------------------

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_TIME_HELP: Final = (
    "Unix seconds (1714564800), an ISO 8601 time (2024-05-01, 2024-05-01T12:00:00Z; UTC unless "
    "it has an offset) or a duration ago (90s, 30m, 2h, 7d, 1w)"
)


def parse_duration(text: str, what: str) -> float:
    """``30m``, ``2h``, ``7d``, ``1w`` or plain seconds, as seconds."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise ValidationError(
            f"{what}: cannot read {text[:32]!r} as a duration; use e.g. 90s, 30m, 2h, 7d, 1w"
        )
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def parse_time(text: str, what: str, now: float | None = None) -> int:
    """A point in time as Unix seconds; see ``_TIME_HELP`` for the accepted forms."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    if _DURATION_RE.fullmatch(value.lower()) and not value.isdigit():
        seconds = parse_duration(value, what)
        return max(0, math.floor((time.time() if now is None else now) - seconds))
    try:
        moment = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        raise ValidationError(f"{what}: cannot read {value[:32]!r} as a time; use {_TIME_HELP}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    stamp = math.floor(moment.timestamp())
    if not 0 <= stamp <= MAX_TIMESTAMP:
        raise ValidationError(f"{what}: {value[:32]!r} is before 1970 or too far ahead")
    return stamp


# -- audit helpers -----------------------------------------------------------------------------------


def tail_audit(manager: StateManager, count: int, **filters: Any) -> list[AuditRecord]:
    """The newest ``count`` records matching ``filters``, oldest first.

    Queries only go forward in ``seq``, so this reads a window before the head and widens it
    until it holds ``count`` matches (or covers the whole trail).
    """
    if count <= 0:
        return []
    head = manager.backend.audit_head()[0]
    floor = max(manager.backend.audit_anchor()[0], filters.pop("after_seq", None) or 0)
    window = max(4 * count, 256)
    while True:
        after = max(head - window, floor)
        records = manager.audit_log(after_seq=after, **filters)
        if len(records) >= count or after <= floor:
            return records[-count:]
        window *= 8


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


AgentFilter = Annotated[str | None, typer.Option("--agent", "-a", help="Only this agent's records.")]
TypeFilter = Annotated[
    str | None, typer.Option("--type", "-t", help="Only this event type, e.g. budget_exceeded, pii_detected.")
]
SinceFilter = Annotated[str | None, typer.Option("--since", help=f"Records at or after: {_TIME_HELP}.")]
UntilFilter = Annotated[str | None, typer.Option("--until", help=f"Records at or before: {_TIME_HELP}.")]


def _clear_store(manager: StateManager) -> tuple[int, int]:
    """Remove every agent and every audit record; returns how many of each."""
    agents = 0
    for agent_id in manager.list_agents():
        agents += manager.remove_agent_state(agent_id)
    records = manager.prune_audit_log(before=MAX_TIMESTAMP)
    return agents, records


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not _stdin_is_terminal():
        raise CommandError(f"{question} Pass --yes to confirm (stdin is not a terminal)")
    if not typer.confirm(question, default=False, err=True):
        raise CommandError("cancelled, nothing was changed", EXIT_CHECK_FAILED)


def _url_flag(url: str) -> str:
    """``--url ...`` to repeat in suggested commands, or nothing for the default store."""
    if url == (os.environ.get(ENV_URL) or DEFAULT_URL):
        return ""
    return f" --url {shlex.quote(url)}"


# ================================================================================================
# demo
# ================================================================================================


@_command("Start here")
def demo(
    agents: Annotated[
        int, typer.Option("--agents", "-n", min=1, max=1_000_000, help="Agents in the fleet.")
    ] = 1000,
    steps: Annotated[
        int, typer.Option("--steps", "-s", min=1, max=10_000, help="Model calls per agent, at most.")
    ] = 10,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Make the run reproducible (same ids and outcomes).")
    ] = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="First remove every agent and audit record from the store.")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Simulate a fleet of agents: budgets reserved and spent, PII, failures, exhausted limits.

    Runs on the embedded default store, a SQLite file in this folder (or --url). Every run adds
    a new fleet; --reset empties the store first.
    """
    session = Session(url, json_output)
    with session.open(must_exist=False) as manager:
        if reset:
            removed, pruned = _clear_store(manager)
            session.note(f"reset: removed {removed:,} agents and {pruned:,} audit records from {manager.url}")
        with session.progress() as progress:
            task = progress.add_task("starting", total=agents * steps)

            def advance(done: int, step: int, running: int) -> None:
                progress.update(task, advance=done, description=f"step {step}/{steps} · {running:,} running")

            result = run_fleet(manager, agents=agents, steps=steps, seed=seed, on_progress=advance)
        states = [s for s in manager.get_agent_states(result.agent_ids) if s is not None]
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
                    "overspent": result.overspent,
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
        _print_demo(session, manager, result, states, by_status, stats.total, audit_records, last)


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


def _print_demo(
    session: Session,
    manager: StateManager,
    result: DemoResult,
    states: Sequence[AgentState],
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
            _status_text(status),
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
            f"{_n(result.calls, 'model call')} reserved and committed; "
            f"{_n(result.refused, 'agent')} stopped at their limit (reservation refused); "
            f"{_n(result.overspent, 'call')} cost more than reserved and went over",
        ),
        ("PII", f"{_n(result.pii_events, 'detection event')} on {_n(pii_agents, 'agent')}"),
        ("Failures", f"{_n(result.failed, 'agent')} failed" + (f": {errors}" if errors else "")),
        ("Finished", f"{_n(result.finished, 'agent')} completed their task; the others still run"),
        ("Store", f"{_n(store_agents, 'agent')} and {_n(audit_records, 'audit record')} in {manager.url}"),
    ]
    for label, text in lines:
        # Wrapped by hand, with a hanging indent, so that nothing pads lines with spaces.
        first, *rest = textwrap.wrap(
            f"{label:<10}{text}", width=min(out.width, 120), subsequent_indent=" " * 10
        )
        out.print(Text.assemble((first[:10], "bold"), first[10:]))
        for line in rest:
            out.print(line, markup=False)
    out.print()
    out.print("[bold]Last audit events[/bold]")
    out.print(_audit_table(last, out.width))
    flag = _url_flag(session.url)
    example = next((s for s in states if s.status is AgentStatus.FAILED), states[0] if states else None)
    commands = [
        (f"iron-state stats{flag}", "fleet totals"),
        (f"iron-state agents --status failed{flag}", "the agents that failed"),
        (f"iron-state agents --sort spent --limit 10{flag}", "the biggest spenders"),
    ]
    if example is not None:
        commands.append((f"iron-state show {example.agent_id}{flag}", "one agent and its audit events"))
    commands += [
        (f"iron-state audit --type budget_exceeded --limit 5{flag}", "refused and exceeded budgets"),
        (f"iron-state verify{flag}", "check the audit trail's hash chain"),
        (f"iron-state metrics --port {DEFAULT_METRICS_PORT}{flag}", "serve Prometheus metrics"),
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


# ================================================================================================
# inspection: agents, show, stats, audit
# ================================================================================================


@_command("Inspect")
def agents(
    status: Annotated[
        StatusChoice | None, typer.Option("--status", help="Only agents with this status.")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", "-l", min=0, help="Rows to show; 0 for all. [default: 50, all with --json]"),
    ] = None,
    sort: Annotated[
        SortKey,
        typer.Option("--sort", help="Order: store (fastest), id, spent, pii or used (highest first)."),
    ] = SortKey.store,
    url: UrlOption = DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """List agents with their status, spend against their limit and PII detections."""
    session = Session(url, json_output)
    wanted = None if status is None else AgentStatus(status.value)
    if limit is None:
        limit = 0 if json_output else 50
    with session.open() as manager:
        stats = manager.stats()
        matching = stats.total if wanted is None else getattr(stats, wanted.value)
        rows = _select_agents(manager.iter_agent_states(status=wanted), sort, limit)
        if session.json:
            _emit_stream(state.to_dict() for state in rows)
            return
        shown = list(rows)
        session.out.print(_agents_table(shown))
        what = "agents" if wanted is None else f"{wanted.value} agents"
        more = "" if len(shown) >= matching else " (--limit 0 for all)"
        session.note(f"{len(shown):,} of {matching:,} {what} in {manager.url}{more}")


def _select_agents(states: Iterator[AgentState], sort: SortKey, limit: int) -> Iterator[AgentState]:
    if sort is SortKey.store:
        return states if limit == 0 else itertools.islice(states, limit)
    keys: dict[SortKey, Callable[[AgentState], Any]] = {
        SortKey.id: lambda s: s.agent_id.as_str(),
        SortKey.spent: lambda s: s.budget_spent,
        SortKey.pii: lambda s: s.pii_detections,
        SortKey.used: lambda s: (
            -1.0 if s.budget_limit is None else s.budget_spent / (s.budget_limit or 1e-12)
        ),
    }
    key = keys[sort]
    ascending = sort is SortKey.id
    if limit == 0:
        return iter(sorted(states, key=key, reverse=not ascending))
    pick = heapq.nsmallest if ascending else heapq.nlargest
    return iter(pick(limit, states, key=key))


def _emit_stream(items: Iterable[Any]) -> None:
    """A JSON array on stdout, written item by item (flat memory for any count)."""
    write = sys.stdout.write
    first = True
    write("[")
    for item in items:
        write("\n  " if first else ",\n  ")
        write(json.dumps(item, allow_nan=False))
        first = False
    write("\n]\n" if not first else "]\n")


@_command("Inspect")
def show(
    agent_id: Annotated[
        str,
        typer.Argument(
            metavar="AGENT_ID", help="The agent, e.g. agent_550e8400-e29b-41d4-a716-446655440000."
        ),
    ],
    events: Annotated[
        int, typer.Option("--events", "-e", min=0, help="How many of its newest audit events.")
    ] = 10,
    url: UrlOption = DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """One agent: status, budget (spent, limit, still available) and its latest audit events."""
    session = Session(url, json_output)
    aid = AgentId.parse_flexible(agent_id)
    with session.open() as manager:
        state = manager.get_agent_state(aid)
        if state is None:
            raise CommandError(f"agent {aid} is not in {manager.url}", EXIT_NOT_FOUND)
        try:
            available = manager.budget_available(aid)
        except AgentNotFound:  # removed between the two reads
            raise CommandError(f"agent {aid} is not in {manager.url}", EXIT_NOT_FOUND) from None
        records = tail_audit(manager, events, agent_id=aid)
        if session.json:
            session.emit(
                {
                    **state.to_dict(),
                    "budget_available": _finite(round(available, 10)),
                    "events": [r.to_dict() for r in records],
                }
            )
            return
        limit = (
            "none"
            if state.budget_limit is None
            else f"{fmt_money(state.budget_limit)} ({fmt_used(state.budget_spent, state.budget_limit)} used)"
        )
        for label, value in (
            ("agent", Text(aid.as_str())),
            ("status", _status_text(state.status)),
            ("spent", fmt_money(state.budget_spent)),
            ("limit", limit),
            ("available", "unlimited" if math.isinf(available) else fmt_money(available)),
            ("PII", str(state.pii_detections)),
        ):
            session.out.print(Text.assemble((f"{label:<11}", "bold"), value))
        if events:
            session.out.print()
            if records:
                session.out.print(f"[bold]Last {_n(len(records), 'audit event')}[/bold]")
                session.out.print(_audit_table(records, session.out.width))
            else:
                session.say("no audit events for this agent")


@_command("Inspect")
def stats(url: UrlOption = DEFAULT_URL, json_output: JsonOption = False, debug: DebugOption = False) -> None:
    """Fleet totals: agents by status, budget spent, PII detections and audit records."""
    session = Session(url, json_output)
    with session.open() as manager:
        totals = manager.stats()
        records = manager.audit_count()
        if session.json:
            session.emit({"url": manager.url, **totals.to_dict(), "audit_records": records})
            return
        session.out.print(f"[bold]{escape(manager.url)}[/bold]")
        table = Table(show_header=False)
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("agents", f"{totals.total:,}")
        for status in AgentStatus:
            table.add_row(Text.assemble("  ", _status_text(status)), f"{getattr(totals, status.value):,}")
        table.add_row("budget spent", fmt_money(totals.budget_spent))
        table.add_row("PII detections", f"{totals.pii_detections:,}")
        table.add_row("audit records", f"{records:,}")
        session.out.print(table)


#: How ``audit --follow`` waits between polls; tests replace it.
_sleep: Callable[[float], None] = time.sleep


@_command("Inspect")
def audit(
    agent: AgentFilter = None,
    event_type: TypeFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    after_seq: Annotated[
        int | None, typer.Option("--after-seq", min=0, help="Only records after this seq.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-l", min=0, help="Show the newest N matching records; 0 for all.")
    ] = 20,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records as they arrive (Ctrl-C stops).")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="Seconds between polls with --follow.")
    ] = 1.0,
    url: UrlOption = DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """The audit trail, oldest first: the newest --limit records matching the filters.

    With --json: a JSON array; with --json --follow: one JSON object per line (JSON Lines).
    """
    session = Session(url, json_output)
    filters = _audit_filters(agent, event_type, since, until)
    if after_seq is not None:
        filters["after_seq"] = after_seq
    with session.open() as manager:
        # Read before the first query: whatever is appended after it is picked up by --follow.
        head = manager.backend.audit_head()[0] if follow else 0
        if limit == 0:
            records: Iterable[AuditRecord] = manager.iter_audit_log(**filters)
        else:
            records = tail_audit(manager, limit, **dict(filters))
        if not follow:
            if session.json:
                _emit_stream(r.to_dict() for r in records)
            else:
                shown = list(records)
                session.out.print(_audit_table(shown, session.out.width))
                session.note(f"{len(shown):,} records shown; the trail holds {manager.audit_count():,}")
            return
        _follow(session, manager, records, head, filters, interval)


def _follow(
    session: Session,
    manager: StateManager,
    first: Iterable[AuditRecord],
    head: int,
    filters: dict[str, Any],
    interval: float,
) -> None:
    def show_records(records: Iterable[AuditRecord]) -> int:
        last = 0
        for r in records:
            if session.json:
                sys.stdout.write(json.dumps(r.to_dict()) + "\n")
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
                        _clip(r.details, 120),
                    )
                )
            last = r.seq
        sys.stdout.flush()
        return last

    filters.pop("after_seq", None)
    seen = max(show_records(first), head)
    session.note(f"following {manager.url}; Ctrl-C to stop")
    try:
        while True:
            _sleep(interval)
            head = manager.backend.audit_head()[0]
            if head <= seen:
                continue
            shown = show_records(manager.iter_audit_log(after_seq=seen, **filters))
            seen = max(seen, head, shown)
    except KeyboardInterrupt:
        session.note("stopped")


# ================================================================================================
# the audit trail: verify, export, prune, purge
# ================================================================================================


@_command("Audit trail")
def verify(url: UrlOption = DEFAULT_URL, json_output: JsonOption = False, debug: DebugOption = False) -> None:
    """Check the audit trail's hash chain. Exit status 1, with the first bad record, if it is broken.

    A chain sealed with an HMAC key verifies only with the same $IRON_STATE_AUDIT_KEY.
    """
    session = Session(url, json_output)
    with session.open() as manager:
        report = manager.verify_audit_log()
        if session.json:
            session.emit({"url": manager.url, **report.to_dict()})
        else:
            _print_verification(session, manager.url, report)
    if not report.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _print_verification(session: Session, url: str, report: AuditVerification) -> None:
    span = ""
    if report.checked:
        span = f", seq {report.anchor_seq + 1 if report.anchor_seq else 1}..{report.last_seq}"
    if report.ok:
        pruned = f" (pruned before seq {report.anchor_seq + 1})" if report.anchor_seq else ""
        session.out.print(
            Text.assemble(
                ("ok", "bold green"), f": {report.checked:,} audit records verified{span}{pruned} in {url}"
            )
        )
    else:
        session.out.print(
            Text.assemble(
                ("BROKEN", "bold red"),
                f": the chain breaks at seq {report.first_bad_seq}: {report.reason} "
                f"({report.checked:,} records before it verified) in {url}",
            )
        )


@_command("Audit trail")
def export(
    format: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="jsonl (with hashes) or csv.")
    ] = ExportFormat.jsonl,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write to this file instead of stdout.", dir_okay=False),
    ] = None,
    agent: AgentFilter = None,
    event_type: TypeFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    url: UrlOption = DEFAULT_URL,
    debug: DebugOption = False,
) -> None:
    """Export the audit trail (or the filtered part) as JSON Lines or CSV, in seq order.

    Each JSONL line carries prev_hash and hash, so the chain can be checked elsewhere.
    """
    session = Session(url)
    filters = _audit_filters(agent, event_type, since, until)
    with session.open() as manager:
        if output is None:
            count = manager.export_audit_log(sys.stdout, format=format.value, **filters)
            sys.stdout.flush()
        else:
            count = manager.export_audit_log(output, format=format.value, **filters)
        session.note(
            f"exported {count:,} audit records as {format.value}" + (f" to {output}" if output else "")
        )


@_command("Audit trail")
def prune(
    before: Annotated[str, typer.Option("--before", help=f"Remove records older than this: {_TIME_HELP}.")],
    yes: YesOption = False,
    url: UrlOption = DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Remove the oldest audit records (retention). What remains still verifies.

    Only a prefix is removed: pruning stops at the first record that is not old enough.
    """
    session = Session(url, json_output)
    cutoff = parse_time(before, "--before")
    with session.open() as manager:
        _confirm(yes, f"Remove the audit records before {fmt_time(cutoff)} from {manager.url}?")
        removed = manager.prune_audit_log(before=cutoff)
        remaining = manager.audit_count()
        if session.json:
            session.emit({"url": manager.url, "before": cutoff, "removed": removed, "remaining": remaining})
            return
        session.say(
            f"removed {removed:,} audit records before {fmt_time(cutoff)}; "
            f"{remaining:,} remain in {manager.url}"
        )


@_command("Audit trail")
def purge(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", help="Only agents unchanged for this long: 90s, 30m, 2h, 7d, 1w (0: all)."
        ),
    ],
    status: Annotated[
        list[StatusChoice] | None,
        typer.Option("--status", help="stopped or failed; repeat for both. [default: both]"),
    ] = None,
    yes: YesOption = False,
    url: UrlOption = DEFAULT_URL,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Remove finished agents (stopped and/or failed) whose state has not changed for a while.

    Their audit records stay (prune those with `prune`).
    """
    session = Session(url, json_output)
    seconds = parse_duration(older_than, "--older-than")
    wanted = [AgentStatus(s.value) for s in status] if status else [AgentStatus.STOPPED, AgentStatus.FAILED]
    if AgentStatus.RUNNING in wanted:
        raise ValidationError(
            "purge removes finished agents only: use --status stopped and/or --status failed"
        )
    names = " and ".join(s.value for s in wanted)
    with session.open() as manager:
        since = f" unchanged for {older_than}" if seconds else ""
        _confirm(yes, f"Remove every {names} agent{since} from {manager.url}?")
        removed = manager.purge_agents(older_than=seconds, status=wanted)
        if session.json:
            session.emit({"url": manager.url, "removed": len(removed), "agent_ids": removed})
            return
        session.say(f"removed {len(removed):,} {names} agents{since} from {manager.url}")


# ================================================================================================
# copy
# ================================================================================================


@_command("Operate")
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
    end. Open budget reservations are not copied.
    """
    session = Session(source, json_output)
    if append and force:
        raise CommandError("choose one of --append and --force")
    with (
        open_store(source) as src,
        open_store(destination, must_exist=False, key_env=dest_audit_key_env) as dst,
    ):
        if src.url == dst.url or _same_file(source, destination):
            raise CommandError(f"the source and the destination are the same store ({src.url})")
        src_report = src.verify_audit_log()
        if not src_report.ok:
            raise CommandError(
                f"the source's audit trail is broken at seq {src_report.first_bad_seq} "
                f"({src_report.reason}); a copy would seal it as valid. "
                "Run `iron-state verify` and `export` it to investigate",
                EXIT_CHECK_FAILED,
            )
        held = dst.stats().total, dst.audit_count()
        if any(held) and not (append or force):
            raise CommandError(
                f"{dst.url} already holds {held[0]:,} agents and {held[1]:,} audit records; "
                "pass --append to add to them, or --force to empty it first"
            )
        if force and any(held):
            removed, pruned = _clear_store(dst)
            session.note(f"emptied {dst.url}: removed {removed:,} agents and {pruned:,} audit records")
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
                copied_records += len(dst.save_audit_logs(r.event for r in records))
                progress.update(records_task, advance=len(records))
        report = dst.verify_audit_log()
        seconds = time.perf_counter() - started
        if session.json:
            session.emit(
                {
                    "source": src.url,
                    "destination": dst.url,
                    "agents": copied_agents,
                    "audit_records": copied_records,
                    "seconds": round(seconds, 3),
                    "verification": report.to_dict(),
                }
            )
        else:
            session.say(
                f"copied {copied_agents:,} agents and {copied_records:,} audit records "
                f"from {src.url} to {dst.url} in {seconds:.1f} s"
            )
            _print_verification(session, dst.url, report)
    if not report.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _same_file(a: str, b: str) -> bool:
    pa, pb = sqlite_path(a), sqlite_path(b)
    if pa is None or pb is None or not pb.exists():
        return False
    return pa.resolve() == pb.resolve()


# ================================================================================================
# metrics
# ================================================================================================

_STOP_SIGNALS: Final = (signal.SIGTERM,)


def _serve_until_stopped(stop: threading.Event) -> None:
    """Block until ``stop`` is set (SIGTERM) or Ctrl-C; tests replace it."""
    while not stop.wait(0.5):
        pass


@_command("Operate")
def metrics(
    port: Annotated[
        int, typer.Option("--port", "-p", min=0, max=65535, help="TCP port (0: any free port).")
    ] = DEFAULT_METRICS_PORT,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    url: UrlOption = DEFAULT_URL,
    debug: DebugOption = False,
) -> None:
    """Serve Prometheus metrics for the store on http://HOST:PORT/metrics until stopped.

    Gauges: iron_state_agents{status}, iron_state_budget_spent, iron_state_pii_detections,
    iron_state_audit_records, iron_state_up, iron_state_scrape_duration_seconds.
    """
    session = Session(url)
    from .metrics import serve_metrics  # without the extra: a one-line MissingDependency

    with session.open() as manager:
        manager.stats()  # fail now, with a clear message, if the store cannot be reached
        try:
            server, thread = serve_metrics(manager, port, host)
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        stop = threading.Event()
        previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}

        def on_signal(signum: int, frame: types.FrameType | None) -> None:
            stop.set()

        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            for sig in _STOP_SIGNALS:
                signal.signal(sig, on_signal)
        shown_host = f"[{host}]" if ":" in host else host
        session.note(
            f"serving metrics for {manager.url} on http://{shown_host}:{server.server_port}/metrics "
            "(Ctrl-C to stop)"
        )
        try:
            _serve_until_stopped(stop)
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            if in_main_thread:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        session.note("stopped")


# -- entry point -------------------------------------------------------------------------------------


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line with ``argv`` and exit with its status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args or os.environ.get(ENV_DEBUG):
        logging.getLogger("iron_runtime_state").setLevel(logging.DEBUG)
        logging.getLogger("iron_runtime_state.audit").setLevel(logging.INFO)
    app(args=args, prog_name="iron-state")
    sys.exit(EXIT_OK)  # pragma: no cover  # app() always exits
