"""Run scenario `same-host`: `exfilguard up`'s real supervisor, meter, outside and dashboard, with the
attacker's program (redteam/samehost.py) as the inside, started the way `up` starts the inside
(sandboxed unless isolate=False, the negative control). Then a colluder takes what the meter lets
through the only channel left. The result: every attempt (each must fail), whether the meter
survived and the ledger still verifies, and the bytes recovered against the cap."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exfilguard.redteam.attacker import RAW_MAGIC
from exfilguard.redteam.harness import ScenarioResult
from exfilguard.redteam.samehost import ATTEMPT_PREFIX, Targets


@dataclass
class SameHostResult(ScenarioResult):
    """What the attacker got, after the fields every scenario reports."""

    isolated: bool = True
    attempts: list[dict[str, Any]] = field(default_factory=list)
    walls_broken: list[str] = field(default_factory=list)  # the attempts that worked
    meter_survived: bool = False  # the same meter process was alive after the attempts
    ledger_verifies: bool = False  # `exfilguard ledger verify --public-key` exit 0 afterwards

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_same_host(secret: bytes, cap: int, strong: str = "tiny-random", weak: str = "tiny-random", isolate: bool = True,
                  workdir: str | None = None, progress: Callable[[str], None] | None = None) -> SameHostResult:
    """Start the stack with the attacker as the inside, let it try everything, collude, tear down."""
    from exfilguard.supervise import Supervisor, new_api_key, up_config
    from exfilguard.supervise.assemble import free_port
    from exfilguard.supervise.sandbox import prepare_socket_dir

    say = progress or (lambda s: None)
    tmp = tempfile.TemporaryDirectory(prefix="exfilguard-samehost-") if workdir is None else None
    work = Path(workdir or tmp.name)  # type: ignore[union-attr]
    data = work / "data"
    res = SameHostResult("same-host", cap, 0, 0, isolated=isolate)
    port, dport, mport = free_port(), free_port(), free_port()
    cfg = up_config(strong, weak, str(cap), port, str(data), reserve_block=str(max(64, min(1024, cap // 8))),
                    metrics=f"127.0.0.1:{mport}", dashboard_port=dport, isolate=isolate)
    new_api_key(cfg.data_dir)
    sup = Supervisor(cfg)
    try:
        say("starting the meter, the outside and the dashboard (as `up` does)")
        if sup.sandbox is not None:
            prepare_socket_dir(sup.sandbox.socket_dir)
        sup._start(sup.meter, 60.0)
        sup._start(sup.outside, cfg.ready_timeout)
        assert sup.dashboard is not None
        sup._start(sup.dashboard, 60.0)
        meter_pid = sup.meter.pid
        assert meter_pid is not None
        targets = Targets(
            tcp={"outside": [port], "meter": [sup.meter_port], "meter's metrics": [mport], "dashboard": [dport]},
            addresses=_addresses(), meter_pid=meter_pid, supervisor_pid=os.getpid(),
            files_read={"meter key": str(cfg.signing_key), "API keys": str(data / "api-keys"),
                        "request log": str(data / "request-log.jsonl")},
            ledger=str(data / "ledger.sqlite"),
        )
        listen = f"unix:{sup.sandbox.socket_inside_path}" if sup.sandbox is not None else f"127.0.0.1:{sup.inside_port}"
        attacker = [sys.executable, "-m", "exfilguard.redteam.samehost", "--targets", json.dumps(asdict(targets)),
                    "--secret-hex", secret.hex(), "--listen", listen]
        sup.inside.argv = sup.sandbox.wrap(attacker) if sup.sandbox is not None else attacker
        say("the attacker's inside tries everything")
        sup._start(sup.inside, 120.0)
        res.attempts = [json.loads(line[len(ATTEMPT_PREFIX):]) for line in sup.inside.lines if line.startswith(ATTEMPT_PREFIX)]
        res.walls_broken = [a["what"] for a in res.attempts if a["ok"]]
        time.sleep(0.5)  # a SIGKILL, had one arrived, has taken effect
        res.meter_survived = sup.meter.alive() and sup.meter.pid == meter_pid
        if res.meter_survived:
            say("colluder: raw bytes through the meter, the only channel")
            res.secret_bytes_recovered = _collude(sup.meter_port, secret)
            res.meter_bytes = int(_status(sup.status_url).get("bytes_out", 0))
    finally:
        sup.stop_all()
    verify = subprocess.run([sys.executable, "-m", "exfilguard.cli.main", "ledger", "verify", "--ledger", cfg.ledger,
                             "--public-key", f"{cfg.signing_key}.pub"], capture_output=True, text=True, timeout=120)
    res.ledger_verifies = verify.returncode == 0
    if tmp is not None:
        tmp.cleanup()
    return res


def _addresses() -> list[str]:
    """127.0.0.1 and this host's other IPv4 addresses (the ports might listen there too)."""
    out = ["127.0.0.1"]
    try:
        out += [a for a in socket.gethostbyname_ex(socket.gethostname())[2] if a not in out]
    except OSError:
        pass
    return out


def _collude(meter_port: int, secret: bytes) -> int:
    """Ask the inside for the whole secret as raw bytes through the meter; count the right ones."""
    got = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", meter_port), timeout=30) as s:
            s.sendall(RAW_MAGIC + (0).to_bytes(8, "big") + len(secret).to_bytes(8, "big"))
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got += b
    except OSError:
        pass
    return sum(1 for i, b in enumerate(got) if i < len(secret) and secret[i] == b)


def _status(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return dict(json.loads(r.read()))
    except (OSError, ValueError):
        return {}
