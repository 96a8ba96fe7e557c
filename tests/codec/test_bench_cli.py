"""`exfilguard bench codec` from the CLI: the benchmark logic lives in exfilguard.cli.benches,
not in the codec package, and the command still runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import exfilguard.codec


def test_codec_package_holds_no_benchmark_code() -> None:
    folder = Path(exfilguard.codec.__file__).parent
    assert not (folder / "bench.py").exists() and not (folder / "coupled_bench.py").exists()


def test_bench_codec_json(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    rows = [{"prompt_ids": [1, 9690, 198], "token_ids": [4792, 346, 457, 253, 2066], "temperature": t} for t in (0.0, 0.7)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exe = Path(sys.executable).with_name("exfilguard")
    out = subprocess.run(
        [str(exe), "bench", "codec", "--corpus", str(corpus), "--codec", "raw", "--codec", "zstd", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["tokens"] == 10 and r["generations"] == 2
    for name in ("raw", "zstd"):
        assert r["all"]["codecs"][name]["roundtrip_ok"] is True
