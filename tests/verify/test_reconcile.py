"""The request log is keyed and reconciled with the meter's ledger: a real stack (tiny-random inside,
real meter and SQLite ledger, outside API, real openai client), then `exfilguard verify` as a user runs it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_outside_audit import Stack

from exfilguard.ledger.keys import load_private_key
from exfilguard.verify.alerts import AlertConfig
from exfilguard.verify.requestlog import SIG_DOMAIN, read_log

pytestmark = pytest.mark.slow


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exfilguard.cli.main", "verify", *args], capture_output=True, text=True,
                          timeout=120)


def rewrite(path: Path, lines: list[dict], key=None) -> None:
    """Write records again with a recomputed hash chain (and, with `key`, signed again): an attacker's edit."""
    prev, out = "0" * 64, []
    for i, d in enumerate(lines):
        d = {k: v for k, v in d.items() if k != "sig"}
        d["seq"], d["prev"] = i, prev
        d = {"seq": d.pop("seq"), "prev": d.pop("prev"), **d}
        line = json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()
        if key is not None:
            line = line[:-1] + b',"sig":"' + key.sign(SIG_DOMAIN + line).hex().encode() + b'"}'
        out.append(line)
        prev = hashlib.sha256(line).hexdigest()
    path.write_bytes(b"".join(x + b"\n" for x in out))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from exfilguard.models import load_model

    tmp = tmp_path_factory.mktemp("rec")
    s = Stack(tmp, load_model("tiny-random"), 10**6, AlertConfig())
    try:
        for i in range(30):
            kw = dict(model="tiny-random", prompt=f"say {i}", max_tokens=[4, 12, 40][i % 3], seed=i, temperature=1.0)
            if i % 4 == 0:
                list(s.client.completions.create(stream=True, **kw))
            elif i % 4 == 1:
                list(s.client.completions.create(stream=True, stop=["e", "a"], **kw))  # cut early: frames drain after it
            else:
                s.client.completions.create(**kw)
    finally:
        s.close()  # the meter settles every reservation as it stops
    return tmp


def test_honest_log_is_signed_and_reconciles(served):
    log, led = served / "requests.jsonl", f"sqlite:///{served / 'ledger.sqlite'}"
    pub = load_private_key(Path(str(log) + ".key")).public_key()
    recs = list(read_log(log, pub))  # every line signed with the outside's key
    assert sum(type(r).__name__ == "RequestRecord" for r in recs) == 30
    assert sum(type(r).__name__ == "ConnRecord" for r in recs) >= 1
    r = verify("--log", str(log), "--ledger", led, "--log-key", str(log) + ".key.pub", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(r.stdout)["reconciliation"]
    assert rec["ok"] and rec["unexplained"] == 0 and rec["answers"] == 30
    assert rec["ledger_forwarded"] == rec["answer_bytes"] + rec["hello_bytes"] > 0


def test_deleted_answer_with_a_recomputed_chain_is_caught(served, tmp_path):
    log, led = served / "requests.jsonl", f"sqlite:///{served / 'ledger.sqlite'}"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    victim = next(i for i, d in enumerate(lines) if d["type"] == "request" and d["wire_bytes"] > 0 and i > 3)
    edited = lines[:victim] + lines[victim + 1:]
    # Without the outside's key (the inside cannot read it): the chain is whole, the signatures are not.
    bad = tmp_path / "unsigned.jsonl"
    rewrite(bad, edited)
    r = verify("--log", str(bad), "--ledger", led, "--log-key", str(log) + ".key.pub")
    assert r.returncode == 11 and "signature" in r.stderr, r.stderr
    # Even signed again with the key itself, the meter's count gives it away: exit 13 of its own.
    resigned = tmp_path / "resigned.jsonl"
    rewrite(resigned, edited, load_private_key(Path(str(log) + ".key")))
    r = verify("--log", str(resigned), "--ledger", led, "--log-key", str(log) + ".key.pub")
    assert r.returncode == 13, r.stdout + r.stderr
    assert f"{lines[victim]['wire_bytes']} bytes left with no logged answer" in r.stderr
    # A made-up answer claims bytes that never crossed the meter.
    forged = tmp_path / "forged.jsonl"
    rewrite(forged, lines + [{**lines[victim], "id": "cmpl-forged"}], load_private_key(Path(str(log) + ".key")))
    r = verify("--log", str(forged), "--ledger", led, "--log-key", str(log) + ".key.pub")
    assert r.returncode == 13 and "never crossed the meter" in r.stderr, r.stderr


def test_timing_charges_are_said_by_the_auditor(served):
    """A meter with --timing-charge counts bytes no frame carries; given their total, the log still reconciles."""
    from exfilguard.verify.reconcile import Reconciliation

    r = Reconciliation(answers=3, answer_bytes=100, connections=1, hello_bytes=50, ledger_forwarded=166,
                       ledger_outstanding=0, tolerance=0, timing_charged=16)
    assert r.ok and r.unexplained == 0
    assert not Reconciliation(3, 100, 1, 50, 166, 0, 0).ok  # the same 16 B unexplained without it
