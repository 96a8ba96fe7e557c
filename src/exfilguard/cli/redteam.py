"""CLI command: redteam (exfiltration scenarios against the real stack on loopback)."""

from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command()
    def redteam(
        scenario: str = typer.Option(..., help="raw, fake-tokens, stego, drip, burst, same-host or timing"),
        secret: str = typer.Option(..., help="file the attacker tries to move out (a stand-in for weights)"),
        cap: str = typer.Option("64KiB", help="egress cap of the meter, in bytes (64KiB, 1MB, ...)"),
        strong: str = typer.Option("smollm2", help="strong model the attacker owns (and verify re-runs)"),
        weak: str = typer.Option("default", help="weak model on both sides of the cap"),
        warmup: int = typer.Option(8, help="honest answers before the attacker takes over"),
        answers: Optional[int] = typer.Option(None, help="stop after this many attack answers (default: until cut off)"),
        max_tokens: int = typer.Option(64, help="tokens per answer"),
        sample_rate: float = typer.Option(1.0, help="fraction of logged answers verify re-runs"),
        connections: int = typer.Option(16, help="burst: connections at once"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ) -> None:
        """Run one exfiltration scenario against meter + ledger + outside on loopback; report what got out."""
        from pathlib import Path

        from exfilguard.errors import ConfigError
        from exfilguard.units import parse_size
        from exfilguard.redteam import RedteamConfig, run_redteam

        try:
            data = Path(secret).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --secret {secret}: {exc.strerror}") from None
        if scenario == "same-host":
            from exfilguard.redteam.samehost_harness import run_same_host

            res_sh = run_same_host(data, parse_size(cap, "--cap"), strong=strong, weak=weak)
            print(json.dumps(res_sh.as_dict()) if as_json else _same_host_text(res_sh))
            return
        if scenario == "timing":
            from exfilguard.redteam.timing import TimingConfig, run_timing

            res_t = run_timing(TimingConfig(secret=data, cap=parse_size(cap, "--cap"), strong=strong, weak=weak))
            print(json.dumps(res_t.as_dict()) if as_json else _timing_text(res_t))
            return
        cfg = RedteamConfig(scenario=scenario, secret=data, cap=parse_size(cap, "--cap"), strong=strong, weak=weak,
                            warmup=warmup, answers=answers, max_tokens=max_tokens, sample_rate=sample_rate,
                            connections=connections)
        cfg.validate()
        if as_json:
            res = run_redteam(cfg)
            d = res.as_dict()
            print(json.dumps(d))
            return
        from rich.console import Console
        from rich.table import Table

        c = Console(stderr=True)
        with c.status("redteam") as st:
            res = run_redteam(cfg, progress=lambda s: st.update(s))
        t = Table(title=f"redteam {scenario}: secret {len(data)} bytes, cap {res.cap_bytes} bytes")
        t.add_column("figure")
        t.add_column("value", justify="right")
        rows = [
            ("bytes through the meter", res.meter_bytes), ("secret bytes recovered", res.secret_bytes_recovered),
            ("meter cut it off", f"yes, at {res.meter_bytes_at_cut} bytes" if res.cut_off else "no"),
            ("attack answers", res.attack_answers),
            ("flagged", f"yes ({', '.join(res.flagged_by)})" if res.flagged else "no"),
            ("secret bytes out before the flag", "-" if res.bytes_before_flag is None else res.bytes_before_flag),
            ("verify: answers re-run / attack flagged / honest flagged",
             f"{res.verify_checked} / {res.verify_flagged_attack} / {res.verify_flagged_honest}"),
            ("alerts during warm-up (false)", res.warmup_alerts),
        ]
        for k, v in rows:
            t.add_row(k, str(v))
        Console().print(t)


def _same_host_text(res: "object") -> str:
    """same-host as lines a person reads: each attempt and what stopped it, then the figures."""
    d = res.as_dict()  # type: ignore[attr-defined]
    lines = [f"same-host ({'isolated' if d['isolated'] else 'NOT isolated'}): cap {d['cap_bytes']} bytes"]
    for a in d["attempts"]:
        lines.append(f"  {'BROKEN' if a['ok'] else 'held  '} {a['what']}: {a['detail']}")
    lines.append(f"meter survived: {'yes' if d['meter_survived'] else 'NO'}; ledger verifies: {'yes' if d['ledger_verifies'] else 'NO'}")
    lines.append(f"secret bytes recovered {d['secret_bytes_recovered']} (meter forwarded {d['meter_bytes']}, cap {d['cap_bytes']})")
    return "\n".join(lines)


def _timing_text(res: "object") -> str:
    """timing as lines: per channel, bits recovered against bits the meter charged."""
    d = res.as_dict()  # type: ignore[attr-defined]
    lines = [f"timing: cap {d['cap_bytes']} bytes"]
    for c in d["channels"]:
        lines.append(f"  {c['channel']}: {c['bits_correct']}/{c['bits_sent']} bits decoded right, {c['recovered_bits']:g} bits of "
                     f"information; meter forwarded {c['meter_bytes']} bytes, ledger charged {c['charged_bytes']} bytes "
                     f"({c['charged_bits']} bits, {c['timing_charge_bits']} beyond the content): "
                     f"recovered <= charged {'yes' if c['target_met'] else 'NO'}")
    return "\n".join(lines)
