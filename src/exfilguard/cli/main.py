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


def main() -> None:
    """Run the CLI; map exfilguard errors to their exit codes with a one-line message."""
    try:
        app(standalone_mode=False)
    except ExfilguardError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
