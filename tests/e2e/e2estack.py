"""Stacks over the real SmolLM2 for the end-to-end tests: models loaded once per session."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "outside"))

from standin_meter import StandInMeter  # noqa: E402

from exfilguard.outside.app import OutsideConfig  # noqa: E402
from exfilguard.outside.client import http_status_probe  # noqa: E402
from exfilguard.inside.serve import make_backend, start_inside  # noqa: E402
from exfilguard.outside.serve import start_outside  # noqa: E402
from exfilguard.supervise.assemble import LoopThread, MeterProcess  # noqa: E402
from exfilguard.protocol.codec_adapter import RealCodecFactory  # noqa: E402

KEY = "sk-e2e-key"


def real_meter_available() -> bool:
    """Whether `exfilguard meter` exists yet (the meter is written by another engineer)."""
    from exfilguard.cli.main import app

    return any((c.name or getattr(c.callback, "__name__", "")) == "meter" for c in app.registered_commands) or any(
        g.name == "meter" for g in app.registered_groups
    )


class Stack:
    """inside + meter + outside over already loaded models, in a background loop."""

    def __init__(self, strong: Any, weak: Any, tmp: Path, cap: int = 10**9, flush_every: int = 4, real_meter: bool | None = None):
        self.strong, self.weak = strong, weak
        self.codecs = RealCodecFactory(weak)
        tok = strong.tokenizer
        self.lt = LoopThread()
        self.inside = self.lt.run(start_inside(make_backend(strong), self.codecs, tok, strong.info.vocab_size))
        self.real_meter = real_meter_available() if real_meter is None else real_meter
        if self.real_meter:
            self.meter: Any = MeterProcess(self.inside.port, f"sqlite:///{tmp / 'ledger.sqlite'}", cap)
            self.meter.start()
            mport, probe = self.meter.port, http_status_probe(self.meter.status_url)
        else:
            self.meter = StandInMeter(self.inside.port, cap)
            mport = self.lt.run(self.meter.start())
            probe = self.meter.status
        cfg = OutsideConfig(model_name="smollm2", flush_every=flush_every, default_max_tokens=16)
        self.outside, self.port = self.lt.run(
            start_outside(self.codecs, tok, self.codecs.weak_fingerprint, [KEY], "127.0.0.1", mport, probe, config=cfg)
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = KEY) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=300)

    def kill_meter(self) -> None:
        if self.real_meter:
            self.meter.proc.kill()
            self.meter.proc.wait()
        else:
            self.lt.run(self.meter.stop())

    def close(self) -> None:
        self.lt.run(self.outside.stop())
        if self.real_meter:
            self.meter.stop()
        else:
            self.lt.run(self.meter.stop())
        self.lt.run(self.inside.stop())
        self.lt.close()
