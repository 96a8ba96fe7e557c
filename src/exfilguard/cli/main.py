"""Entry point: one Typer app; each command group lives in its own module under cli/."""

from __future__ import annotations

import importlib
import sys

import typer

from exfilguard.errors import ExfilguardError

app = typer.Typer(
    name="exfilguard",
    help="A hard, durable, auditable cap on every byte that leaves the inference servers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module defines register(app). Kept as names so that `exfilguard --help` imports no ML
# library until a command that needs one runs.
COMMAND_MODULES = (
    "bench", "meter", "ledger", "keys", "serve", "distill", "plan", "dashboard", "budget", "audit", "verify", "redteam",
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"exfilguard.cli.{_name}").register(app)


def _usage_line(exc: Exception) -> str:
    """One line for a usage error: what is wrong, and where to get help."""
    # click spreads some messages (the choices of an enum) over lines: one line, one error.
    msg = " ".join(exc.format_message().split()).replace(": ,", ":").rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        return f"error: {ctx.command_path}: {msg} (see '{ctx.command_path} --help')"
    return f"error: {msg}"


def main() -> None:
    """Run the CLI; map exfilguard errors to their exit codes, and usage errors to one line and exit 2."""
    # typer raises the exceptions of the click it bundles (typer._click), not of the click package.
    from typer._click.exceptions import ClickException as TyperClickException

    try:
        import click

        click_exceptions: tuple[type[Exception], ...] = (TyperClickException, click.ClickException)
    except ImportError:  # click is typer's dependency in older typers only
        click_exceptions = (TyperClickException,)
    try:
        app(standalone_mode=False, prog_name="exfilguard")  # also under `python -m exfilguard.cli.main`
    except ExfilguardError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except click_exceptions as exc:
        if exc.format_message().strip():  # a group run bare printed its help already; nothing to add
            typer.secho(_usage_line(exc), fg=typer.colors.RED, err=True)
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
