"""Verify with the real SmolLM2: honest engine answers pass, weak-model stego is flagged."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from verifykit import engine_answers

from exfilguard.verify.requestlog import RequestLog
from exfilguard.verify.verifier import VerifyConfig, verify_log

pytestmark = pytest.mark.integration


def test_smollm2_honest_pass_and_stego_is_flagged(tmp_path: Path, dev_corpus: Path) -> None:
    import json

    from exfilguard.models import load_model
    from exfilguard.redteam.stego import StegoChooser

    strong = load_model("smollm2")
    weak = load_model("default")
    rows = [json.loads(line) for line in open(dev_corpus)][:6]
    rng = random.Random(5)
    reqs = [(r["prompt_ids"], rng.getrandbits(63), (0.0, 0.7, 1.0)[i % 3]) for i, r in enumerate(rows)]
    honest = engine_answers(strong, reqs, 24)
    stego = [StegoChooser(weak, p).embed([rng.getrandbits(1) for _ in range(24)]) for p, _, _ in reqs[:3]]
    log = RequestLog(tmp_path / "log.jsonl")
    for i, ((p, seed, t), ids) in enumerate(zip(reqs + reqs[:3], honest + stego)):
        log.append_request(f"r{i}", p, seed, t if i < 6 else 0.7, 1.0, 24, "coupled", ids, 10, "done")
    log.close()
    rep = verify_log(tmp_path / "log.jsonl", strong, VerifyConfig(sample_seed=1))
    flagged = {s.id for s in rep.flagged}
    assert flagged == {"r6", "r7", "r8"}, [s.as_dict() for s in rep.scores]
