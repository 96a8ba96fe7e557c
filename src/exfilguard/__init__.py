"""exfilguard: a hard, durable, auditable cap on the bytes that leave an inference cluster."""

from exfilguard.errors import (
    BudgetExhausted,
    ConfigError,
    ExfilguardError,
    FrameCorrupt,
    LedgerTampered,
    LedgerUnavailable,
    ModelMismatch,
    RequestInvalid,
    UpstreamUnavailable,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetExhausted",
    "ConfigError",
    "ExfilguardError",
    "FrameCorrupt",
    "LedgerTampered",
    "LedgerUnavailable",
    "ModelMismatch",
    "RequestInvalid",
    "UpstreamUnavailable",
    "__version__",
]
