"""The models package: fingerprints, the shipped tokenizer, scoring paths, spec errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from exfilguard.errors import ConfigError
from exfilguard.models import load_model



@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


def test_tiny_random_fingerprint_is_stable_across_processes(tiny):
    code = "from exfilguard.models import load_model; print(load_model('tiny-random').fingerprint)"
    fps = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() for _ in range(2)}
    assert fps == {tiny.fingerprint}
    assert len(tiny.fingerprint) == 64


def test_tokenizer_reproduces_corpus_prompt_ids(dev_corpus):
    from exfilguard.models.hf import load_tokenizer

    tok = load_tokenizer()
    rows = [json.loads(line) for _, line in zip(range(30), dev_corpus.open())]
    for r in rows:
        ids = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        assert list(ids) == r["prompt_ids"]


def test_incremental_score_close_to_teacher_forced(tiny):
    prefix, toks = [1, 9690, 198, 2683], [359, 253, 5356, 5646, 11173, 3365]
    inc = tiny.score(prefix, toks)
    fast = tiny.score_fast(prefix, toks)
    assert inc.shape == fast.shape == (len(toks), tiny.vocab_size)
    assert inc.dtype == np.float32
    np.testing.assert_allclose(inc, fast, atol=1e-3, rtol=1e-3)


def test_unknown_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model spec"):
        load_model("no-such-model")
    with pytest.raises(ConfigError):
        load_model("hf:/no/such/path")


@pytest.mark.parametrize("spec, kind", [("ngram", "n-gram"), ("student", "student")])
def test_bad_weak_model_files_name_the_file_and_kind(tmp_path, spec, kind):
    """Not an .npz, or an .npz of another format: a ConfigError naming the file and the kind."""
    from exfilguard.models.specs import load_model

    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match=f"{junk}: not an exfilguard {kind} file"):
        load_model(f"{spec}:{junk}")
    other = tmp_path / "other.npz"
    np.savez(other, meta=np.frombuffer(json.dumps({"format": "something-else"}).encode(), dtype=np.uint8))
    with pytest.raises(ConfigError, match=f"unknown {kind} format 'something-else'"):
        load_model(f"{spec}:{other}")
