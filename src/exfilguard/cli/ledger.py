"""CLI commands: ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

ledger = typer.Typer(help="Read and audit the egress ledger.", no_args_is_help=True)


@ledger.command("status")
def ledger_status(
    url: str = typer.Option(..., "--ledger", help="Ledger URL: sqlite:///PATH or postgresql://..."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Budget name (default: the only one)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Print a budget's cap, forwarded, reserved, outstanding and remaining bytes and the tree head."""
    from exfilguard.ledger import open_ledger

    led = open_ledger(url, create=False)
    try:
        st = led.status(budget)
    finally:
        led.close()
    if as_json:
        typer.echo(json.dumps(st.as_dict()))
        return
    typer.echo(
        f"budget {st.budget}: cap {st.cap_bytes} B, reserved {st.reserved_bytes} B = forwarded {st.forwarded_bytes} B "
        f"(settled) + outstanding {st.outstanding_bytes} B (open reservations), remaining {st.remaining_bytes} B\n"
        f"tree size {st.tree_size}, root {st.root}"
    )
    for w in st.windows:
        typer.echo(f"window {w['seconds']}s: {w['used_bytes']} of {w['limit_bytes']} B used")


@ledger.command("verify")
def ledger_verify(
    url: str = typer.Option(..., "--ledger", help="Ledger URL: sqlite:///PATH or postgresql://..."),
    public_key: list[Path] = typer.Option(..., "--public-key", help="Public key (FILE.pub) of a meter (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Recompute the Merkle tree, check every signed tree head and the accounting; exit 0 if all hold."""
    from exfilguard.errors import LedgerTampered
    from exfilguard.ledger import load_public_key, open_ledger, verify_ledger

    keys = [load_public_key(p) for p in public_key]
    led = open_ledger(url, create=False)
    try:
        rep = verify_ledger(led, keys)
    finally:
        led.close()
    if as_json:
        typer.echo(json.dumps({
            "ok": rep.ok, "tree_size": rep.tree_size, "root": rep.root, "signed_heads": rep.signed_heads,
            "unsigned_tail": rep.unsigned_tail, "problems": rep.problems, "notes": rep.notes,
        }))
    else:
        for p in rep.problems:
            typer.echo(f"BAD: {p}")
        for n in rep.notes:
            typer.echo(f"note: {n}")
    if not rep.ok:
        more = f" (and {len(rep.problems) - 1} more problems)" if len(rep.problems) > 1 else ""
        raise LedgerTampered(f"ledger does not verify: {rep.problems[0]}{more}")
    if not as_json:
        typer.echo(f"ok: {rep.tree_size} entries, root {rep.root}, {rep.signed_heads} signed tree heads verified")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(ledger, name="ledger")
