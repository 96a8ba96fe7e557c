"""exfilguard: a hard, durable, auditable cap on the bytes that leave an inference cluster.

The error tree is exfilguard.errors; each component is a package of its own (see DESIGN.md).
This file imports nothing: every component, the meter's trusted base first, runs it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
