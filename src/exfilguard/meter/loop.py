"""The meter process's event loop: uvloop when installed (as uvicorn's ``--loop auto``).

The meter is CPU-bound at high message rates: every answer crosses it twice (a read and a
write each way), and uvloop's libuv transports cost a third of asyncio's per message
(bench/meter_bench.py, "small"). The ledger runs on its own thread; its Python work
(replaying appended events, hashing, encoding) must not hold the GIL for CPython's default
5 ms while connections wait to forward, so the meter process switches every 0.5 ms.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

LOOPS = ("auto", "asyncio", "uvloop")
GIL_SWITCH_S = 0.0005


def run(main: Coroutine[Any, Any, Any], loop: str = "auto") -> Any:
    """Run `main` to completion on the chosen loop: auto (uvloop if installed), asyncio or uvloop."""
    from exfilguard.base_errors import ConfigError

    if loop not in LOOPS:
        main.close()
        raise ConfigError(f"--loop must be one of {', '.join(LOOPS)}, not {loop!r}")
    sys.setswitchinterval(GIL_SWITCH_S)
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                main.close()
                raise ConfigError("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def name() -> str:
    """The running loop's implementation, for logs and /status: uvloop or asyncio."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
