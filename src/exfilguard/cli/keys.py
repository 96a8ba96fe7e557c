"""CLI commands: keys."""

from __future__ import annotations

from pathlib import Path

import typer

keys = typer.Typer(help="Keys: Ed25519 keys that sign tree heads (new); API keys with budgets of their own (add, list, revoke).",
                   no_args_is_help=True)


@keys.command("new")
def keys_new(
    out: Path = typer.Option(..., "--out", help="Where to write the private key; the public key goes to OUT.pub."),
) -> None:
    """Make a new Ed25519 key pair: private key to OUT (mode 0600), public key to OUT.pub."""
    from exfilguard.ledger.keys import key_id
    from exfilguard.ledger.keytools import generate_keypair, load_public_key

    priv, pub = generate_keypair(out)
    typer.echo(f"wrote {priv} (private, keep it on the meter host) and {pub} (public, for auditors); "
               f"key id {key_id(load_public_key(pub))}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(keys, name="keys")


DEFAULT_KEYS_LEDGER = "sqlite:///.exfilguard/keys.sqlite"
_LEDGER_HELP = "Ledger URL holding the API keys (`exfilguard up` uses DATA_DIR/keys.sqlite)."


@keys.command("add")
def keys_add(
    name: str = typer.Argument(..., help="Key name (shown in access logs and `keys list`)."),
    cap: str = typer.Option(None, "--cap", help="Bytes this key may ever receive (e.g. 50MB); default: no cap of its own."),
    window: list[str] = typer.Option(None, "--window", help="Rolling window DURATION=BYTES, e.g. 1h=5MB (repeatable)."),
    ledger: str = typer.Option(DEFAULT_KEYS_LEDGER, "--ledger", help=_LEDGER_HELP),
) -> None:
    """Make an API key with a budget of its own (under the meter's global cap); print its secret once."""
    from exfilguard.ledger.apikeys import KeyStore
    from exfilguard.ledger import open_ledger
    from exfilguard.units import parse_size, parse_window

    _ensure_sqlite_dir(ledger)
    cap_bytes = None if cap is None else parse_size(cap, "--cap")
    wins = [parse_window(w) for w in window or ()]
    secret = KeyStore(open_ledger(ledger)).add(name, cap_bytes, wins)
    typer.echo(f"API key {name}: {secret}")
    typer.echo(f"(shown once; stored hashed in {ledger}; cap {'none of its own' if cap_bytes is None else f'{cap_bytes} bytes'}"
               f"{''.join(f', window {w.seconds}s={w.limit}' for w in wins)})", err=True)


@keys.command("list")
def keys_list(
    ledger: str = typer.Option(DEFAULT_KEYS_LEDGER, "--ledger", help=_LEDGER_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per key."),
) -> None:
    """List API keys: name, key id, state, cap, bytes used and left."""
    import json

    from exfilguard.ledger.apikeys import UNLIMITED, KeyStore, remaining_of
    from exfilguard.ledger import open_ledger

    store = KeyStore(open_ledger(ledger, create=False))
    rows = []
    for k in store.keys():
        st = store.status(k)
        rows.append({"name": k.name, "key_id": k.key_id, "state": "active" if k.active else "revoked",
                     "cap_bytes": None if st.cap_bytes >= UNLIMITED else st.cap_bytes, "used_bytes": st.used_bytes,
                     "remaining_bytes": None if st.cap_bytes >= UNLIMITED and not st.windows else remaining_of(st),
                     "windows": st.windows})
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("name", "key id", "state", "cap", "used", "left", "windows")
    for r in rows:
        wins = ", ".join(f"{w['seconds']}s: {w['used_bytes']}/{w['limit_bytes']}" for w in r["windows"]) or "-"
        t.add_row(r["name"], r["key_id"], r["state"], "-" if r["cap_bytes"] is None else str(r["cap_bytes"]),
                  str(r["used_bytes"]), "-" if r["remaining_bytes"] is None else str(r["remaining_bytes"]), wins)
    Console().print(t)


@keys.command("revoke")
def keys_revoke(
    name: str = typer.Argument(..., help="Key name."),
    ledger: str = typer.Option(DEFAULT_KEYS_LEDGER, "--ledger", help=_LEDGER_HELP),
) -> None:
    """Revoke an API key: refused from the next request on (its budget and history stay in the ledger)."""
    from exfilguard.ledger.apikeys import KeyStore
    from exfilguard.ledger import open_ledger

    KeyStore(open_ledger(ledger, create=False)).revoke(name)
    typer.echo(f"revoked API key {name}")


def _ensure_sqlite_dir(url: str) -> None:
    """`keys add` before the first `up`: make the default data directory."""
    if url == DEFAULT_KEYS_LEDGER:
        Path(".exfilguard").mkdir(exist_ok=True)
