"""CLI commands: plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from exfilguard.plan.planner import DEFAULT_DECODE_RATE


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, f in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.4g} {unit}"
    return f"{n:.4g} B"


def _rows(plan: Any) -> list[tuple[str, str]]:
    rows = [
        ("weight size", _size(plan.weight_bytes)),
        ("legitimate egress per day", _size(plan.egress_bytes_per_day)),
        ("legitimate egress over the lifetime", _size(plan.lifetime_egress_bytes)),
        ("lifetime tokens / parameters", f"{plan.tokens_per_param:.4g}"),
        ("lifetime egress / weight size", f"{plan.egress_to_weight_ratio:.4g}"),
        ("recommended cap", f"{_size(plan.recommended_cap_bytes)} ({plan.recommended_cap_bytes:.0f} B)"),
        ("cap per day (a 1d window)", _size(plan.cap_per_day_bytes)),
        ("days to exfiltrate the weights at that rate", f"{plan.days_to_exfiltrate:.4g}"),
        ("days to exfiltrate, weights compressed", f"{plan.days_to_exfiltrate_compressed:.4g}"),
        ("cap below the weight size", "yes" if plan.weights_safe else "NO"),
        ("cap below the compressed weight size", "yes" if plan.weights_safe_compressed else "NO"),
        ("max bits per token that keeps the compressed weights out", f"{plan.max_bits_per_token_safe:.4g}"),
        (f"outside CPU cores to decode (at {plan.decode_rate:g} tokens/s/core)", f"{plan.outside_cores:.4g}"),
    ]
    if plan.chosen_cap_bytes is not None:
        rows += [
            ("chosen cap", _size(plan.chosen_cap_bytes)),
            ("bits per token the chosen cap needs", f"{plan.chosen_cap_bits_per_token:.4g}"),
            ("chosen cap below the compressed weight size", "yes" if plan.chosen_cap_safe else "NO"),
        ]
    return rows


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command()
    def plan(
        params: str = typer.Option(..., "--params", help="Parameters of the strong model (135M, 70B, 1T, 1e12)."),
        bytes_per_param: float = typer.Option(..., "--bytes-per-param", help="Bytes per parameter (2 for bf16, 1 for int8)."),
        tokens_per_day: str = typer.Option(..., "--tokens-per-day", help="Generated tokens served per day (10B, 1e10)."),
        bits_per_token: float = typer.Option(..., "--bits-per-token", help="Bits per generated token that cross the meter."),
        lifetime_days: float = typer.Option(..., "--lifetime-days", help="Days the model will be served."),
        headroom: float = typer.Option(0.25, "--headroom", help="Fraction of the expected lifetime egress added to the cap."),
        attacker_compression: float = typer.Option(100.0, "--attacker-compression", help="How many-fold an attacker compresses the weights (16-100x reported)."),
        decode_rate: float = typer.Option(DEFAULT_DECODE_RATE, "--decode-rate", help="Tokens/s the outside decodes per CPU core (README: measured at 32 streams)."),
        cap: Optional[str] = typer.Option(None, "--cap", help="A cap you have in mind (bytes, e.g. 500GB): the bits per token it needs."),
        measured: Optional[str] = typer.Option(None, "--measured", help="Ledger URL of a running deployment: plan again from the bits per token it spends."),
        measured_tokens: Optional[str] = typer.Option(None, "--measured-tokens", help="Tokens served over the budget's life (the ledger counts only bytes)."),
        budget: Optional[str] = typer.Option(None, "--budget", help="Budget in the --measured ledger (default: the only one)."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of cumulative egress against the cap and the weights."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Size the egress cap: weight size, legitimate egress, a cap with headroom, days to exfiltrate."""
        from exfilguard.units import parse_size
        from exfilguard.plan import PlanInput, make_plan, measure, parse_count, plot_plan

        inp = PlanInput(
            params=parse_count(params, "--params"),
            bytes_per_param=bytes_per_param,
            tokens_per_day=parse_count(tokens_per_day, "--tokens-per-day"),
            bits_per_token=bits_per_token,
            lifetime_days=lifetime_days,
            headroom=headroom,
            attacker_compression=attacker_compression,
            cap_bytes=float(parse_size(cap, "--cap")) if cap is not None else None,
            decode_rate=decode_rate,
        )
        result = make_plan(inp)
        out: dict[str, Any] = result.as_dict()
        out["inputs"] = {k: v for k, v in vars(inp).items()}
        m = mplan = None
        if measured_tokens is not None and measured is None:
            from exfilguard.errors import ConfigError

            raise ConfigError("--measured-tokens needs --measured LEDGER_URL")
        if measured is not None:
            tokens = parse_count(measured_tokens, "--measured-tokens") if measured_tokens is not None else None
            m = measure(measured, inp.tokens_per_day, tokens, budget)
            mplan = make_plan(PlanInput(**{**vars(inp), "bits_per_token": m.bits_per_token}))
            out["measured"] = {**m.as_dict(), "plan": mplan.as_dict()}
        if plot is not None:
            plot_plan(inp, result, str(plot), mplan, m.bits_per_token if m else None)
            out["plot"] = str(plot)
        if as_json:
            typer.echo(json.dumps(out))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"plan at {inp.bits_per_token:g} bits/token")
        table.add_column("figure")
        table.add_column("planned", justify="right")
        if mplan is not None:
            table.add_column(f"measured ({m.bits_per_token:.4g} bits/token)", justify="right")
            for (name, a), (_, b) in zip(_rows(result), _rows(mplan)):
                table.add_row(name, a, b)
        else:
            for name, a in _rows(result):
                table.add_row(name, a)
        console = Console()
        console.print(table)
        if m is not None:
            how = ("from --measured-tokens" if m.tokens_source == "given"
                   else "assuming the planned --tokens-per-day over that span (the ledger counts bytes, not tokens; "
                        "give --measured-tokens for a measured figure)")
            console.print(f"measured: {m.used_bytes} B used in budget {m.budget!r} over {m.span_days:.4g} days "
                          f"({_size(m.bytes_per_day)}/day); bits per token {how}")
        if plot is not None:
            console.print(f"plot written to {plot}")
