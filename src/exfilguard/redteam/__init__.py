"""exfilguard.redteam: a compromised inside tries to get a secret past the meter.

``run_redteam(RedteamConfig(...))`` runs one scenario (raw, fake-tokens, stego, drip, burst)
against the real meter, ledger and outside API on loopback and returns what got out and what
noticed it (``RedteamResult``). See docs/redteam.md.
"""

from exfilguard.redteam.attacker import SCENARIOS, AttackConfig, AttackerInside
from exfilguard.redteam.harness import RedteamConfig, RedteamResult, run_redteam

__all__ = ["SCENARIOS", "AttackConfig", "AttackerInside", "RedteamConfig", "RedteamResult", "run_redteam"]
