"""The ``iron-state`` application: its commands under their headings, and where errors end.

Each command opens the store named by ``--url``, calls the public :class:`StateManager` API and
prints a table (stdout), or JSON with ``--json``. Progress bars and notes go to stderr. Errors
are raised as :class:`StateError` subclasses and turned into one line and an exit status in
one place, :meth:`_Group.main`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from ..config import ENV_DEBUG
from ..errors import AgentNotFound, BackendError, BudgetNotFound, StateError
from . import audit, budgets, copy, demo, fleet, metrics, migrate, serve, spend
from .exit_codes import (
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CommandError,
)
from .options import FLAGS

__all__ = ["COMMANDS", "Group", "app", "exit_code_for", "run"]


def exit_code_for(exc: BaseException) -> int:
    """The documented exit status for an error (see :mod:`iron_runtime_state.cli`)."""
    if isinstance(exc, CommandError):
        return exc.exit_code
    if isinstance(exc, (AgentNotFound, BudgetNotFound)):
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


def _flags_without_type(params: list[Any]) -> list[Any]:
    """``params`` with no value type shown for a flag (``--json``, ``--help``; recent Typer shows
    ``<bool>`` for them, as if they took a value)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """A command: its help shows what each option takes, and nothing for a flag."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class _Group(TyperGroup):
    """The root command: every error becomes one line on stderr and a documented exit status."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))

    def main(  # type: ignore[override]  # the same signature, narrowed to what we pass on
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        FLAGS.debug = os.environ.get(ENV_DEBUG, "").lower() in ("1", "true", "yes", "on")
        try:
            code = self._run(args, prog_name, complete_var, extra)
        finally:
            FLAGS.debug = False
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
            if FLAGS.debug:
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
            if FLAGS.debug:
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


@dataclass(frozen=True)
class Group:
    """A command with subcommands (``iron-state budget set|show|remove``)."""

    name: str
    help: str
    commands: Mapping[str, Callable[..., None]]


#: Every command, under its heading of ``iron-state --help``, in the order the help lists them.
COMMANDS: Final[tuple[tuple[str, tuple[Callable[..., None] | Group, ...]], ...]] = (
    ("Start here", (demo.demo,)),
    ("Agents", (fleet.agents, fleet.show, fleet.stats, fleet.purge)),
    (
        "Budgets",
        (
            budgets.budgets,
            spend.spend,
            Group(
                "budget",
                budgets.BUDGET_HELP,
                {"set": budgets.budget_set, "show": budgets.budget_show, "remove": budgets.budget_remove},
            ),
        ),
    ),
    ("Audit trail", (audit.audit, audit.verify, audit.checkpoint, audit.export, audit.prune)),
    ("Operate", (copy.copy, migrate.migrate, metrics.metrics, serve.serve)),
)


def _reflow(doc: str) -> str:
    # Typer's rich help keeps single line breaks after the first paragraph; join them.
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


class _SubGroup(TyperGroup):
    """A command with subcommands: its help, like the root's, shows nothing for a flag."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


def _add_commands() -> None:
    for panel, commands in COMMANDS:
        for command in commands:
            if isinstance(command, Group):
                sub = typer.Typer(
                    cls=_SubGroup,
                    help=command.help,
                    no_args_is_help=True,
                    rich_markup_mode="rich",
                    context_settings={"help_option_names": ["-h", "--help"]},
                )
                for name, function in command.commands.items():
                    sub.command(name, cls=_Command, help=_reflow(function.__doc__ or ""))(function)
                app.add_typer(sub, name=command.name, rich_help_panel=panel)
            else:
                app.command(cls=_Command, rich_help_panel=panel, help=_reflow(command.__doc__ or ""))(command)


_add_commands()


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line with ``argv`` and exit with its status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args or os.environ.get(ENV_DEBUG):
        logging.getLogger("iron_runtime_state").setLevel(logging.DEBUG)
        logging.getLogger("iron_runtime_state.audit").setLevel(logging.INFO)
    app(args=args, prog_name="iron-state")
    sys.exit(EXIT_OK)  # pragma: no cover  # app() always exits
