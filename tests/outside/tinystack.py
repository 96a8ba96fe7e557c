"""A tiny-random stack (inside + stand-in meter + outside) in one background loop."""

from __future__ import annotations

import json
import time

from standin_meter import StandInMeter

from exfilguard.protocol.codec_adapter import RealCodecFactory

KEY = "sk-test-key"


def access_lines(caplog, n: int) -> list[dict]:
    """The last n access-log lines, waiting for them: a streamed answer logs (and settles its key's
    bytes) after its client has read [DONE] and hung up."""
    deadline = time.monotonic() + 30
    while True:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "exfilguard.access"]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines[-n:]
        time.sleep(0.05)


class TinyStack:
    def __init__(self, cap: int = 10**9, flush_every: int = 4, outside_fingerprint: str | None = None,
                 keys_ledger: str | None = None, max_tokens_default: int = 16, meter_ledger: str | None = None,
                 access_log_file: str | None = None) -> None:
        from exfilguard.models import load_model
        from exfilguard.outside.app import OutsideConfig
        from exfilguard.inside.serve import make_backend, start_inside
        from exfilguard.outside.serve import start_outside
        from exfilguard.supervise.assemble import LoopThread

        self.model = load_model("tiny-random")
        tok = self.model.tokenizer
        fp = self.model.info.fingerprint
        self.codecs = RealCodecFactory(self.model)
        self.lt = LoopThread()
        self.inside = self.lt.run(start_inside(make_backend(self.model), self.codecs, tok, self.model.info.vocab_size))
        cfg = OutsideConfig(model_name="tiny-random", flush_every=flush_every, default_max_tokens=max_tokens_default,
                            max_context=4096, keys_ledger=keys_ledger, access_log_file=access_log_file)
        self.real_meter = meter_ledger is not None
        if self.real_meter:  # the real `exfilguard meter` process, with its JSON /status
            from exfilguard.outside.client import http_status_probe
            from exfilguard.supervise.assemble import MeterProcess

            self.meter = MeterProcess(self.inside.port, meter_ledger, cap)
            self.meter.start()
            mport, probe = self.meter.port, http_status_probe(self.meter.status_url)
            cfg.meter_status_url = self.meter.status_url
        else:
            self.meter = StandInMeter(self.inside.port, cap)
            mport, probe = self.lt.run(self.meter.start()), self.meter.status
        self.outside, self.port = self.lt.run(
            start_outside(self.codecs, tok, outside_fingerprint or fp, [KEY], "127.0.0.1", mport, probe, config=cfg)
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = KEY):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.lt.run(self.outside.stop())
        if self.real_meter:
            self.meter.stop()
        else:
            self.lt.run(self.meter.stop())
        self.lt.run(self.inside.stop())
        self.lt.close()
