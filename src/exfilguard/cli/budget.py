"""CLI commands: budget (k-of-n cap changes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

budget = typer.Typer(help="Change a budget's cap or approvers: k-of-n signed requests.", no_args_is_help=True)


@budget.command("init")
def budget_init(
    url: str = typer.Option(..., "--ledger", help="Ledger URL: sqlite:///PATH or postgresql://..."),
    name: str = typer.Option(..., "--budget", help="Budget name."),
    cap: Optional[str] = typer.Option(None, "--cap", help="Create the budget with this cap if it does not exist (e.g. 10GB)."),
    approvers: list[Path] = typer.Option(..., "--approvers", help="Public key file (KEY.pub) of an approver (repeatable)."),
    threshold: int = typer.Option(..., "--threshold", help="K: distinct approvers a raise needs."),
) -> None:
    """Set a budget's approver set and threshold, once; later changes are k-of-n requests."""
    from exfilguard.ledger import open_ledger
    from exfilguard.ledger.keytools import load_public_key
    from exfilguard.ledger.approvals import init_approvers
    from exfilguard.units import parse_size

    keys = [load_public_key(p) for p in approvers]
    led = open_ledger(url)
    try:
        if cap is not None:
            led.ensure_budget(name, parse_size(cap, "--cap"))
        seq = init_approvers(led, name, threshold, keys)
    finally:
        led.close()
    typer.echo(f"budget {name!r}: {threshold} of {len(keys)} approvers set (ledger entry {seq})")


@budget.command("request")
def budget_request(
    url: str = typer.Option(..., "--ledger", help="Ledger URL: sqlite:///PATH or postgresql://..."),
    name: str = typer.Option(..., "--budget", help="Budget name."),
    cap: Optional[str] = typer.Option(None, "--cap", help="The new cap (e.g. 20GB)."),
    approvers: Optional[list[Path]] = typer.Option(None, "--approvers", help="Instead of --cap: the new approver set's public keys."),
    threshold: Optional[int] = typer.Option(None, "--threshold", help="With --approvers: the new K."),
    reason: str = typer.Option(..., "--reason", help="Why; approvers sign it and the ledger keeps it."),
    expires: str = typer.Option(..., "--expires", help="How long approvals may be gathered, e.g. 1h, 2d."),
    out: Path = typer.Option(..., "--out", help="Request file to write."),
) -> None:
    """Write a canonical change request (nonce, ledger head, expiry) for approvers to sign."""
    from exfilguard.errors import ConfigError
    from exfilguard.ledger import open_ledger
    from exfilguard.ledger.keytools import load_public_key
    from exfilguard.ledger.approvals import describe, make_request, write_json
    from exfilguard.units import parse_duration, parse_size

    if (approvers is None) != (threshold is None):
        raise ConfigError("--approvers and --threshold go together")
    new_set = (threshold, [load_public_key(p) for p in approvers]) if approvers is not None and threshold is not None else None
    led = open_ledger(url, create=False)
    try:
        req = make_request(led, name, reason=reason, expires_in=parse_duration(expires),
                           new_cap=parse_size(cap, "--cap") if cap is not None else None, new_approvers=new_set)
    finally:
        led.close()
    write_json(out, req)
    typer.echo(f"wrote {out}:\n{describe(req)}")


@budget.command("approve")
def budget_approve(
    request: Path = typer.Argument(..., help="Request file from `budget request`."),
    key: Path = typer.Option(..., "--key", help="The approver's private key (from `exfilguard keys new`)."),
    out: Path = typer.Option(..., "--out", help="Signature file to write."),
) -> None:
    """Sign a request with one approver key (read it first with `budget show`)."""
    from exfilguard.ledger import load_private_key
    from exfilguard.ledger.approvals import approve, load_request, short_id, write_json

    req = load_request(request)
    a = approve(req, load_private_key(key))
    write_json(out, a)
    typer.echo(f"wrote {out}: key {short_id(a['public_key'])} approves request {a['request']}")


@budget.command("show")
def budget_show(
    request: Path = typer.Argument(..., help="Request file."),
    as_json: bool = typer.Option(False, "--json", help="Print the request itself."),
) -> None:
    """Print what approving the request would do."""
    from exfilguard.ledger.approvals import describe, load_request

    req = load_request(request)
    typer.echo(json.dumps(req, indent=2, sort_keys=True) if as_json else describe(req))


@budget.command("apply")
def budget_apply(
    request: Path = typer.Argument(..., help="Request file."),
    signatures: list[Path] = typer.Argument(..., help="Signature files from `budget approve`."),
    url: str = typer.Option(..., "--ledger", help="Ledger URL: sqlite:///PATH or postgresql://..."),
    name: Optional[str] = typer.Option(None, "--budget", help="Refuse unless the request is for this budget."),
) -> None:
    """Apply a request signed by enough distinct approvers; running meters use the new cap at once."""
    from exfilguard.ledger import open_ledger
    from exfilguard.ledger.approvals import apply_request, describe, load_approval, load_request

    req = load_request(request)
    approvals = [load_approval(p) for p in signatures]
    led = open_ledger(url)
    try:
        seq = apply_request(led, req, approvals, budget=name)
    finally:
        led.close()
    typer.echo(f"applied (ledger entry {seq}): {describe(req).splitlines()[0]}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(budget, name="budget")
