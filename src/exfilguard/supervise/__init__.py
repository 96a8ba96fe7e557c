"""The supervisor: what assembles the components. `exfilguard up` runs meter, inside (sandboxed),
outside and dashboard as supervised processes (up.py, sandbox.py); tests and benchmarks assemble
the same pieces in one process (assemble.py). Imports no ML library."""

from exfilguard.supervise.assemble import LoopThread, MeterProcess, free_port
from exfilguard.supervise.up import Child, ChildFailed, Supervisor, UpConfig, meter_signing_key, new_api_key, serve_up, up_config

__all__ = ["Child", "ChildFailed", "LoopThread", "MeterProcess", "Supervisor", "UpConfig", "free_port", "meter_signing_key",
           "new_api_key", "serve_up", "up_config"]
