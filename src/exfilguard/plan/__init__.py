"""exfilguard.plan: size the egress cap from model size, traffic and bits per token.

Public API: ``PlanInput`` -> ``make_plan`` -> ``Plan``; ``measure(ledger_url, ...)`` for the
bits per token a running deployment spends; ``plot_plan`` draws the lifetime picture.
"""

from exfilguard.plan.planner import Measured, Plan, PlanInput, make_plan, measure, parse_count, plot_plan

__all__ = ["Measured", "Plan", "PlanInput", "make_plan", "measure", "parse_count", "plot_plan"]
