"""CLI commands: keys."""

from __future__ import annotations

from pathlib import Path

import typer

keys = typer.Typer(help="Ed25519 keys that sign the ledger's tree heads.", no_args_is_help=True)


@keys.command("new")
def keys_new(
    out: Path = typer.Option(..., "--out", help="Where to write the private key; the public key goes to OUT.pub."),
) -> None:
    """Make a new Ed25519 key pair: private key to OUT (mode 0600), public key to OUT.pub."""
    from exfilguard.ledger.keys import generate_keypair, key_id, load_public_key

    priv, pub = generate_keypair(out)
    typer.echo(f"wrote {priv} (private, keep it on the meter host) and {pub} (public, for auditors); "
               f"key id {key_id(load_public_key(pub))}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(keys, name="keys")
