"""Distillation: CPU training of a tiny student (loss falls, seeded, resumable) and the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from exfilguard.models.distill import Row, TrainConfig, evaluate, first_per_temperature, read_corpus, train_student, write_corpus
from exfilguard.models.student import load_student

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "data" / "smollm2_train.jsonl.gz"


def _rows() -> list[Row]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        body = [100 + (i % 4)] + (np.arange(12) % 5 + 200).tolist() + rng.integers(300, 305, size=4).tolist() + [2]
        rows.append(Row((1, 9690, 198), tuple(body), 0.7))
    return rows


def _cfg(**kw) -> TrainConfig:
    base = dict(size="tiny", steps=12, batch_size=4, lr=1e-2, warmup=2, seed=0, checkpoint_every=0, kl_weight=0.0)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_training_on_cpu_reduces_loss_and_is_deterministic(tmp_path):
    a = train_student(_rows(), tmp_path / "a.npz", _cfg(), progress=False, log=lambda s: None)
    b = train_student(_rows(), tmp_path / "b.npz", _cfg(), progress=False, log=lambda s: None)
    assert np.mean(a["losses"][-3:]) < a["losses"][0] - 1.0
    assert a["losses"] == b["losses"]
    wa, wb = _weights(tmp_path / "a.npz"), _weights(tmp_path / "b.npz")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    c = train_student(_rows(), tmp_path / "c.npz", _cfg(seed=1), progress=False, log=lambda s: None)
    assert c["losses"] != a["losses"]


def test_resume_gives_the_uninterrupted_result(tmp_path):
    full = train_student(_rows(), tmp_path / "full.npz", _cfg(), progress=False, log=lambda s: None)
    out = tmp_path / "r.npz"
    part = train_student(_rows(), out, _cfg(), progress=False, log=lambda s: None, stop_after=5)
    assert not part["done"] and not out.exists() and out.with_name("r.npz.ckpt").is_file()
    msgs: list[str] = []
    rest = train_student(_rows(), out, _cfg(), progress=False, log=msgs.append)
    assert rest["done"] and any("resuming" in m for m in msgs)
    assert not out.with_name("r.npz.ckpt").exists()
    assert part["losses"] + rest["losses"] == full["losses"]
    wa, wb = _weights(tmp_path / "full.npz"), _weights(out)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_evaluate_reports_bits_per_temperature(tmp_path):
    train_student(_rows(), tmp_path / "a.npz", _cfg(), progress=False, log=lambda s: None)
    m = load_student(tmp_path / "a.npz")
    table = evaluate([m], _rows(), temperatures=(0.7,))
    bits = table[m.info.spec][0.7]
    assert 0 < bits < np.log2(49152)


def test_corpus_roundtrip(tmp_path):
    write_corpus(_rows(), tmp_path / "c.jsonl.gz")
    assert read_corpus([tmp_path / "c.jsonl.gz"]) == _rows()


def _cli():
    from exfilguard.cli.main import app

    return app


def test_cli_help():
    r = CliRunner().invoke(_cli(), ["distill", "--help"])
    assert r.exit_code == 0
    for opt in ("--strong", "--corpus", "--kind", "--out", "--device", "--size", "--generate"):
        assert opt in r.output


@pytest.fixture(scope="module")
def slice20(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "slice.jsonl"
    with gzip.open(TRAIN, "rt") as fh, open(path, "w") as out:
        for _, line in zip(range(20), fh):
            out.write(line)
    return path


def test_cli_end_to_end_ngram(tmp_path, slice20):
    out = tmp_path / "ng.npz"
    r = CliRunner().invoke(_cli(), ["distill", "--corpus", str(slice20), "--kind", "ngram", "--order", "3", "--out", str(out), "--eval", str(slice20), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "T=0.7" in r.output


def test_cli_end_to_end_student(tmp_path, slice20):
    out = tmp_path / "st.npz"
    args = ["distill", "--corpus", str(slice20), "--kind", "student", "--size", "tiny", "--kl", "0", "--steps", "3", "--batch-size", "2", "--out", str(out), "--no-progress"]
    r = CliRunner().invoke(_cli(), args)
    assert r.exit_code == 0, r.output
    assert load_student(out).info.vocab_size == 49152
    rows = [json.loads(x) for x in open(slice20)]
    assert len(rows) == 20


def test_cli_quantises_a_student_into_an_exact_one(tmp_path, slice20):
    src, out = tmp_path / "st.npz", tmp_path / "st_exact.npz"
    r = CliRunner().invoke(_cli(), ["distill", "--corpus", str(slice20), "--kind", "student", "--size", "tiny", "--kl", "0", "--steps", "2", "--batch-size", "2", "--out", str(src), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(_cli(), ["distill", "--kind", "exact", "--from", str(src), "--out", str(out), "--eval", str(slice20), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "exact student" in r.output and f"exact:{out}" in r.output and "T=0.7" in r.output
    from exfilguard.models.exact_student import load_exact_student

    assert load_exact_student(out).session([1, 2]).frequencies().sum(dtype=np.int64) == 1 << 24


def test_cli_exact_without_from_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(_cli(), ["distill", "--kind", "exact", "--out", str(tmp_path / "x.npz")])
    from exfilguard.errors import ConfigError

    assert isinstance(r.exception, ConfigError) and "--from" in str(r.exception)  # main() maps it to exit 2


def test_first_per_temperature_keeps_order_and_counts_each_temperature():
    rows = [Row((1,), (i,), t) for i, t in enumerate([0.0, 0.7, 0.0, 1.0, 0.0, 0.7, 0.7])]
    kept = first_per_temperature(rows, 2)
    assert [r.token_ids[0] for r in kept] == [0, 1, 2, 3, 5]
    assert first_per_temperature(rows, 0) == rows
