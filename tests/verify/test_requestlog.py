"""The request log: written append-only and hash-chained; every kind of damage is an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exfilguard.errors import LogCorrupt
from exfilguard.verify.requestlog import AlertRecord, RequestLog, RequestRecord, read_log


def write_log(path: Path, n: int = 3) -> None:
    log = RequestLog(path)
    for i in range(n):
        log.append_request(f"id{i}", [1, 2, 3], 1000 + i, 0.7, 1.0, 16, "coupled", [5, 6, 7 + i], 12, "done")
    log.append_alert("bits_per_token", {"id": "id1", "z": 9.0})
    log.close()


def test_roundtrip_and_reopen_continues_the_chain(tmp_path: Path) -> None:
    p = tmp_path / "log.jsonl"
    write_log(p)
    log = RequestLog(p)  # reopened: continues seq and chain
    log.append_request("id9", [4], None, 1.0, 0.9, 8, "model", [], 3, "closed")
    log.close()
    recs = list(read_log(p))
    assert [r.seq for r in recs] == [0, 1, 2, 3, 4]
    assert isinstance(recs[3], AlertRecord) and recs[3].kind == "bits_per_token"
    r0 = recs[0]
    assert isinstance(r0, RequestRecord)
    assert (r0.prompt_ids, r0.seed, r0.output_ids, r0.wire_bytes) == ([1, 2, 3], 1000, [5, 6, 7], 12)
    last = recs[4]
    assert isinstance(last, RequestRecord) and last.seed is None and last.output_ids == []


def lines(p: Path) -> list[bytes]:
    return p.read_bytes().split(b"\n")[:-1]


def put(p: Path, ls: list[bytes], tail: bytes = b"\n") -> None:
    p.write_bytes(b"\n".join(ls) + tail)


def damage(p: Path, how: str) -> None:
    ls = lines(p)
    if how == "truncated":
        p.write_bytes(p.read_bytes()[:-7])
    elif how == "edited":
        d = json.loads(ls[1])
        d["output_ids"] = [9, 9, 9]
        ls[1] = json.dumps(d, separators=(",", ":")).encode()
        put(p, ls)
    elif how == "line_removed":
        put(p, ls[:1] + ls[2:])
    elif how == "reordered":
        put(p, [ls[1], ls[0]] + ls[2:])
    elif how == "not_json":
        put(p, ls[:2] + [b"{not json"] + ls[3:])
    elif how == "missing_field":
        d = json.loads(ls[0])
        del d["seed"], d["output_ids"]
        ls[0] = json.dumps(d).encode()
        put(p, ls)
    elif how == "bad_token":
        d = json.loads(ls[0])
        d["output_ids"] = [1, -5]
        ls[0] = json.dumps(d).encode()
        put(p, ls)
    elif how == "unknown_type":
        d = json.loads(ls[0])
        d["type"] = "whatever"
        ls[0] = json.dumps(d).encode()
        put(p, ls)


HOWS = ["truncated", "edited", "line_removed", "reordered", "not_json", "missing_field", "bad_token", "unknown_type"]


@pytest.mark.parametrize("how", HOWS)
def test_damaged_log_is_an_error(tmp_path: Path, how: str) -> None:
    p = tmp_path / "log.jsonl"
    write_log(p)
    damage(p, how)
    with pytest.raises(LogCorrupt):
        list(read_log(p))


def test_appending_to_a_cut_off_log_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "log.jsonl"
    write_log(p)
    damage(p, "truncated")
    with pytest.raises(LogCorrupt, match="cut off"):
        RequestLog(p)


def run_verify(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.run([sys.executable, "-m", "exfilguard.cli.main", "verify", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("how", ["truncated", "edited", "empty", "missing"])
def test_verify_cli_reports_a_corrupt_log(tmp_path: Path, how: str) -> None:
    p = tmp_path / "log.jsonl"
    if how == "empty":
        p.write_bytes(b"")
    elif how != "missing":
        write_log(p)
        damage(p, how)
    r = run_verify("--log", str(p), "--strong", "tiny-random", "--json")
    assert r.returncode == LogCorrupt.exit_code, r.stderr
    assert r.stdout == ""  # no verdict printed for a log that could not be read whole
    assert r.stderr.startswith("error: request log") and len(r.stderr.strip().splitlines()) == 1
