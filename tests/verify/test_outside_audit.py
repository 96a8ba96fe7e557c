"""The outside's request log and alerts on a real stack: tiny-random inside, real meter and
SQLite ledger, outside API, real openai client."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from exfilguard.verify.requestlog import AlertRecord, RequestRecord, read_log

KEY = "sk-audit"
pytestmark = pytest.mark.slow  # a whole stack per test, ~30 s each on 2 cores


class Stack:
    def __init__(self, tmp: Path, model, cap: int, alerts) -> None:
        from exfilguard.meter import Meter, MeterConfig
        from exfilguard.outside.app import OutsideConfig
        from exfilguard.outside.audit import AuditConfig
        from exfilguard.outside.client import status_from_json
        from exfilguard.inside.serve import make_backend, start_inside
        from exfilguard.outside.serve import start_outside
        from exfilguard.supervise.assemble import LoopThread
        from exfilguard.protocol.codec_adapter import RealCodecFactory

        self.log_path = tmp / "requests.jsonl"
        codecs = RealCodecFactory(model)
        self.lt = LoopThread()
        self.inside = self.lt.run(start_inside(make_backend(model), codecs, model.tokenizer, model.info.vocab_size))
        self.meter = Meter(MeterConfig(listen="127.0.0.1:0", upstream=f"127.0.0.1:{self.inside.port}",
                                       ledger=f"sqlite:///{tmp / 'ledger.sqlite'}", cap=cap, reserve_block=1024,
                                       metrics="127.0.0.1:0"))
        self.lt.run(self.meter.start())
        mhost, mport = self.meter.metrics_address

        async def probe() -> str:
            return status_from_json(self.meter.status())

        cfg = OutsideConfig(model_name="tiny-random", default_max_tokens=16, audit=AuditConfig(
            request_log=str(self.log_path), alerts=alerts, meter_status_url=f"http://{mhost}:{mport}/status", budget_poll_s=0.1))
        self.outside, port = self.lt.run(start_outside(codecs, model.tokenizer, codecs.weak_fingerprint, [KEY], "127.0.0.1",
                                                       self.meter.listen_address[1], probe, config=cfg))
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def close(self) -> None:
        self.lt.run(self.outside.stop())
        self.lt.run(self.meter.stop())
        self.lt.run(self.inside.stop())
        self.lt.close()


@pytest.fixture(scope="module")
def tiny():
    from exfilguard.models import load_model

    return load_model("tiny-random")


def test_every_answer_is_logged_with_its_ids_and_verifies(tiny, tmp_path: Path) -> None:
    from exfilguard.verify.alerts import AlertConfig
    from exfilguard.verify.verifier import VerifyConfig, verify_log

    s = Stack(tmp_path, tiny, 10**6, AlertConfig())
    try:
        texts = []
        for i in range(3):
            r = s.client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": f"hi {i}"}],
                                                 max_tokens=12, temperature=0.8 if i else 0.0)
            texts.append((r.id, r.choices[0].message.content))
        stream = s.client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "stream"}],
                                                  max_tokens=12, stream=True, seed=42)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        metrics = httpx.get(s.base + "/metrics").text
    finally:
        s.close()
    recs = [r for r in read_log(s.log_path) if isinstance(r, RequestRecord)]
    assert len(recs) == 4
    for (rid, text), rec in zip(texts, recs):
        assert rec.id == rid and rec.tokens > 0 and rec.wire_bytes > 0 and rec.seed is not None
        assert tiny.tokenizer.decode(rec.output_ids, skip_special_tokens=True).startswith(text)
    assert recs[3].seed == 42 and tiny.tokenizer.decode(recs[3].output_ids, skip_special_tokens=True).startswith(streamed)
    assert "exfilguard_outside_answers_total 4.0" in metrics
    rep = verify_log(s.log_path, tiny, VerifyConfig(sample_seed=3))
    assert len(rep.scores) == 4 and not rep.flagged, [x.as_dict() for x in rep.scores]


def test_throttle_refuses_answers_while_the_budget_burns(tiny, tmp_path: Path) -> None:
    from exfilguard.verify.alerts import AlertConfig

    # A cap of 20 kB planned to last an hour: one reserved block in a fraction of a second burns.
    s = Stack(tmp_path, tiny, 20_000, AlertConfig(lifetime_s=3600, burn_window_s=60, throttle=True))
    try:
        s.client.completions.create(model="tiny-random", prompt="one", max_tokens=8)
        deadline = time.monotonic() + 30
        err = None
        while time.monotonic() < deadline and err is None:
            try:
                s.client.completions.create(model="tiny-random", prompt="again", max_tokens=8)
                time.sleep(0.1)
            except openai.RateLimitError as exc:
                err = exc
        metrics = httpx.get(s.base + "/metrics").text
    finally:
        s.close()
    assert err is not None and err.body["type"] == "egress_throttled"
    assert "exfilguard_outside_throttled 1.0" in metrics
    alerts = [r for r in read_log(s.log_path) if isinstance(r, AlertRecord)]
    assert [a.kind for a in alerts] == ["burn_rate"]
