"""CLI commands: audit (offline checks of checkpoints and proofs; no ledger access)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

audit = typer.Typer(help="Check checkpoints and proofs offline, without access to the ledger.", no_args_is_help=True)


@audit.command("verify")
def audit_verify(
    proof: Path = typer.Option(..., "--proof", help="Proof file from `exfilguard ledger prove`."),
    public_key: list[Path] = typer.Option(..., "--public-key", help="Public key (FILE.pub) that signs checkpoints (repeatable)."),
    old: Optional[Path] = typer.Option(None, "--old", help="Older checkpoint (consistency proof)."),
    new: Optional[Path] = typer.Option(None, "--new", help="Newer checkpoint (consistency proof)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint the entry is in (inclusion proof)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check a consistency proof between two checkpoints, or an entry's inclusion proof; exit 0 if it holds."""
    from exfilguard.errors import ConfigError
    from exfilguard.ledger.keytools import load_public_key
    from exfilguard.ledger.checkpoint import load_checkpoint
    from exfilguard.ledger.proofs import ConsistencyProof, check_consistency, check_inclusion, load_proof

    keys = [load_public_key(p) for p in public_key]
    pf = load_proof(proof)
    if isinstance(pf, ConsistencyProof):
        if old is None or new is None:
            raise ConfigError("a consistency proof is checked against two checkpoints: give --old and --new")
        cold, cnew = load_checkpoint(old, keys), load_checkpoint(new, keys)
        check_consistency(cold, cnew, pf)
        was = {b["budget"]: b for b in cold.budgets}
        out = {"ok": True, "kind": "consistency", "old_size": cold.head.tree_size, "new_size": cnew.head.tree_size,
               "new_root": cnew.head.root.hex(), "budgets": cnew.budgets}
        if as_json:
            typer.echo(json.dumps(out))
            return
        typer.echo(f"ok: the log of {cnew.head.tree_size} entries (root {cnew.head.root.hex()}) extends the log of "
                   f"{cold.head.tree_size} entries; history was not rewritten")
        for b in cnew.budgets:
            prev = was.get(b["budget"])
            change = f" (cap was {prev['cap_bytes']} B)" if prev and prev["cap_bytes"] != b["cap_bytes"] else ""
            typer.echo(f"budget {b['budget']}: cap {b['cap_bytes']} B{change}, used {b['used_bytes']} B")
        return
    cp_path = checkpoint or new
    if cp_path is None:
        raise ConfigError("an inclusion proof is checked against a checkpoint: give --checkpoint")
    cp = load_checkpoint(cp_path, keys)
    event = check_inclusion(cp, pf)
    checked = _check_approvals(event)
    if as_json:
        typer.echo(json.dumps({"ok": True, "kind": "inclusion", "seq": pf.seq, "tree_size": cp.head.tree_size,
                               "event": event, "approvers": checked}))
        return
    typer.echo(f"ok: entry {pf.seq} is in the log of {cp.head.tree_size} entries (root {cp.head.root.hex()}):")
    typer.echo(pf.entry.decode("ascii"))
    if checked is not None:
        typer.echo(f"its {len(checked)} approval signature(s) verify, by keys {', '.join(checked) or '(none)'}")


def _check_approvals(event: dict) -> list[str] | None:
    """For a budget change, check every embedded approval signature over the embedded request."""
    if event.get("kind") not in ("cap_change", "approvers_set") or event.get("request") is None:
        return None
    from exfilguard.errors import LedgerTampered
    from exfilguard.ledger.approvals import check_event_approvals, short_id

    keys = [a.get("public_key", "") for a in event.get("approvals", []) if isinstance(a, dict)]
    req = event["request"]
    # The set in force is not in one entry: check the signatures against the keys the request
    # names (`ledger verify` checks them against the set replayed from the whole log).
    problems = check_event_approvals(event, req.get("approvers", {}).get("keys", []), req.get("approvers", {}).get("threshold", 0))
    if problems:
        raise LedgerTampered(f"entry {event['seq']}: {'; '.join(problems)}")
    return [short_id(k) for k in keys]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(audit, name="audit")
