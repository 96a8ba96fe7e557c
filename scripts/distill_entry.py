"""Run `exfilguard distill` without the rest of the CLI (for machines without the full install)."""

import typer

from exfilguard.cli import distill

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
distill.register(app)

if __name__ == "__main__":
    app()
