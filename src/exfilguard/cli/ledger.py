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
    """Print a budget's cap, forwarded, reserved, outstanding and remaining bytes and the tree head, as the
    replayed log adds them up (exit 5 when the ledger's rows or entries do not add up)."""
    from exfilguard.ledger import open_ledger, reads

    led = open_ledger(url, create=False)
    try:
        name = budget or reads.status(led, None).budget  # (the only budget, or a one-line error naming them)
        st = led.checked_status(name)
    finally:
        led.close()
    if as_json:
        typer.echo(json.dumps(st.as_dict()))
        return
    typer.echo(
        f"budget {st.budget}: cap {st.cap_bytes} B, reserved {st.reserved_bytes} B = forwarded {st.forwarded_bytes} B "
        f"(settled) + outstanding {st.outstanding_bytes} B (open reservations), left for new answers {st.remaining_bytes} B\n"
        f"tree size {st.tree_size}, root {st.root}"
    )
    for w in st.windows:
        typer.echo(f"window {w['seconds']}s: {w['used_bytes']} of {w['limit_bytes']} B used")


@ledger.command("verify")
def ledger_verify(
    url: str = typer.Option(..., "--ledger", help="Ledger URL: sqlite:///PATH or postgresql://..."),
    public_key: Optional[list[Path]] = typer.Option(
        None, "--public-key",
        help="Public key (FILE.pub) of a meter (repeatable). With one, every head must verify and the last entry must be covered by a signed head.",
    ),
    trusted_head: Optional[list[Path]] = typer.Option(
        None, "--trusted-head",
        help="A signed head or checkpoint saved outside the ledger (`ledger checkpoint`, `meter --publish-heads DIR`), "
        "or a directory of them (repeatable): the ledger must not be shorter than or inconsistent with it.",
    ),
    sth_interval: float = typer.Option(
        30.0, "--sth-interval",
        help="The meter's --sth-interval: entries younger than it (+10 s) may be unsigned yet (pending, not a problem).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Recompute the Merkle tree, check every signed tree head and the accounting; exit 0 if all hold."""
    from exfilguard.errors import LedgerTampered
    from exfilguard.ledger import open_ledger
    from exfilguard.ledger.keytools import load_public_key
    from exfilguard.ledger.verify import verify_ledger
    from exfilguard.ledger.checkpoint import load_trusted_heads

    keys = [load_public_key(p) for p in public_key or ()]
    trusted = [cp.head for cp in load_trusted_heads(trusted_head or (), keys or None)]
    led = open_ledger(url, create=False)
    try:
        rep = verify_ledger(led, keys, trusted, sth_interval=sth_interval)
    finally:
        led.close()
    if as_json:
        typer.echo(json.dumps({
            "ok": rep.ok, "tree_size": rep.tree_size, "root": rep.root, "signed_heads": rep.signed_heads,
            "unsigned_tail": rep.unsigned_tail, "pending_entries": rep.pending_entries, "next_head_in_s": rep.next_head_in_s,
            "trusted_heads": rep.trusted_heads, "rollback_detectable": rep.rollback_detectable,
            "problems": rep.problems, "notes": rep.notes,
        }))
    else:
        for p in rep.problems:
            typer.echo(f"BAD: {p}")
        for n in rep.notes:
            typer.echo(f"note: {n}")
    if not rep.rollback_detectable:
        typer.echo("WARNING: no trusted head given: a rollback of this ledger to an earlier signed head cannot be "
                   "detected; pass --trusted-head with the meter's --publish-heads directory", err=True)
    if not rep.ok:
        more = f" (and {len(rep.problems) - 1} more problems)" if len(rep.problems) > 1 else ""
        raise LedgerTampered(f"ledger does not verify: {rep.problems[0]}{more}")
    if not as_json:
        trusted_note = f", consistent with {rep.trusted_heads} trusted heads" if trusted else ""
        typer.echo(f"ok: {rep.tree_size} entries, root {rep.root}, {rep.signed_heads} signed tree heads verified{trusted_note}")


@ledger.command("checkpoint")
def ledger_checkpoint(
    url: str = typer.Option(..., "--ledger", help="Ledger URL: sqlite:///PATH or postgresql://..."),
    signing_key: Path = typer.Option(..., "--signing-key", help="Ed25519 key (from `exfilguard keys new`) that signs the checkpoint."),
    out: Path = typer.Option(..., "--out", help="File to write (never overwritten); keep it outside the ledger's host."),
) -> None:
    """Audit the ledger and write a signed checkpoint of its head and budgets, for `verify --trusted-head`."""
    from exfilguard.ledger import load_private_key, open_ledger
    from exfilguard.ledger.checkpoint import make_checkpoint, write_checkpoint

    key = load_private_key(signing_key)
    led = open_ledger(url, create=False)
    try:
        cp = make_checkpoint(led, key)
    finally:
        led.close()
    write_checkpoint(out, cp)
    typer.echo(f"wrote checkpoint {out}: {cp.head.tree_size} entries, root {cp.head.root.hex()}, key {cp.head.key_id}; "
               + ", ".join(f"{b['budget']} {b['used_bytes']}/{b['cap_bytes']} B" for b in cp.budgets))


@ledger.command("prove")
def ledger_prove(
    url: str = typer.Option(..., "--ledger", help="Ledger URL: sqlite:///PATH or postgresql://..."),
    out: Path = typer.Option(..., "--out", help="Proof file to write."),
    old: Optional[Path] = typer.Option(None, "--old", help="Older checkpoint (consistency proof to --new)."),
    new: Optional[Path] = typer.Option(None, "--new", help="Newer checkpoint (consistency proof from --old)."),
    entry: Optional[int] = typer.Option(None, "--entry", help="Sequence number of one entry (inclusion proof in --checkpoint)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint the entry's proof leads to."),
) -> None:
    """Write an RFC 6962 consistency proof between two checkpoints, or an inclusion proof of one entry."""
    from exfilguard.errors import ConfigError
    from exfilguard.ledger import open_ledger
    from exfilguard.ledger.checkpoint import load_checkpoint
    from exfilguard.ledger.proofs import prove_consistency, prove_inclusion, write_proof

    if entry is None and (old is None or new is None):
        raise ConfigError("give --old and --new (consistency proof) or --entry and --checkpoint (inclusion proof)")
    if entry is not None and (checkpoint is None or old is not None):
        raise ConfigError("an inclusion proof takes --entry SEQ and --checkpoint FILE (no --old)")
    led = open_ledger(url, create=False)
    try:
        if entry is None:
            assert old is not None and new is not None
            proof = prove_consistency(led, load_checkpoint(old).head, load_checkpoint(new).head)
            what = f"consistency proof from {proof.old_size} to {proof.new_size} entries ({len(proof.path)} hashes)"
        else:
            assert checkpoint is not None
            proof = prove_inclusion(led, entry, load_checkpoint(checkpoint).head)
            what = f"inclusion proof of entry {entry} in {proof.tree_size} entries ({len(proof.path)} hashes)"
    finally:
        led.close()
    write_proof(out, proof)
    typer.echo(f"wrote {out}: {what}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(ledger, name="ledger")
