"""k-of-n budget changes on real SQLite and PostgreSQL: every refusal the issue lists, each with
its own error, plus what verify finds when someone forges a change behind the ledger's back."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exfilguard.errors import (
    ApprovalRefused,
    ApprovalsShort,
    ConfigError,
    RequestExpired,
    RequestReplayed,
    RequestStale,
    RequestTampered,
    WrongBudget,
)
from exfilguard.ledger import approvals as A
from exfilguard.ledger import reads
from exfilguard.ledger import open_ledger
from exfilguard.ledger.verify import verify_ledger
from exfilguard.ledger.events import decode_event
from sqlkit import forge

EXFILGUARD = [sys.executable, "-m", "exfilguard.cli.main"]
HOUR = 3600


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def keys():
    return [Ed25519PrivateKey.generate() for _ in range(4)]  # 0..2 approvers, 3 an outsider


@pytest.fixture
def led(url, keys):
    """Budget 'b', cap 1000, 2 of 3 approvers, 400 bytes reserved."""
    led = open_ledger(url)
    led.ensure_budget("b", 1000)
    A.init_approvers(led, "b", 2, [k.public_key() for k in keys[:3]])
    led.reserve("b", 400, "m", 1)
    yield led
    led.close()


def raise_to(led, cap, **kw):
    return A.make_request(led, "b", reason=kw.pop("reason", "more traffic"), expires_in=kw.pop("expires_in", HOUR), new_cap=cap, **kw)


def signed(req, *ks):
    return [A.approve(req, k) for k in ks]


def test_raise_with_k_distinct_approvers_applies_and_verifies(led, keys):
    req = raise_to(led, 5000)
    seq = A.apply_request(led, req, signed(req, keys[0], keys[2]))
    assert reads.status(led, "b").cap_bytes == 5000
    ev = decode_event(next(e for s, e in reads.entries(led, seq)))
    assert ev["kind"] == "cap_change" and (ev["old_cap"], ev["new_cap"]) == (1000, 5000)
    assert len(ev["approvals"]) == 2 and ev["request"] == req
    # the new cap is what reserve grants against
    assert led.reserve("b", 10_000, "m", 2).granted == 4600
    rep = verify_ledger(led)
    assert rep.ok, rep.problems


def test_one_signature_short(led, keys):
    req = raise_to(led, 5000)
    with pytest.raises(ApprovalsShort, match="1 of the 2 approvals needed"):
        A.apply_request(led, req, signed(req, keys[1]))
    assert reads.status(led, "b").cap_bytes == 1000


def test_duplicate_key_counts_once(led, keys):
    req = raise_to(led, 5000)
    a = signed(req, keys[0])[0]
    upper = {**a, "public_key": a["public_key"].upper()}  # same key, other spelling
    with pytest.raises(ApprovalsShort, match="duplicate"):
        A.apply_request(led, req, [a, a])
    with pytest.raises(ApprovalsShort, match="duplicate"):
        A.apply_request(led, req, [a, upper])
    assert reads.status(led, "b").cap_bytes == 1000


def test_unknown_key_counts_zero(led, keys):
    req = raise_to(led, 5000)
    with pytest.raises(ApprovalsShort, match="outside the approver set counted zero"):
        A.apply_request(led, req, signed(req, keys[0], keys[3]))
    assert reads.status(led, "b").cap_bytes == 1000


def test_expired(led, keys):
    req = raise_to(led, 5000, expires_in=60, now=int((time.time() - HOUR) * 1e6))
    with pytest.raises(RequestExpired, match="expired"):
        A.apply_request(led, req, signed(req, keys[0], keys[1]))
    assert reads.status(led, "b").cap_bytes == 1000


def test_expired_is_checked_by_the_ledger_clock_too(led, keys):
    # Past the client-side check, the transaction itself refuses an expired request.
    req = raise_to(led, 5000, expires_in=60, now=int((time.time() - HOUR) * 1e6))
    ap = req["approvers"]
    with pytest.raises(RequestExpired):
        A.apply_budget_change(led, "b", nonce=req["nonce"], expires=req["expires"], approvers=(ap["threshold"], ap["keys"]),
                              approvals=[], request=req, old_cap=1000, new_cap=5000)


def test_replayed(led, keys):
    req = raise_to(led, 5000)
    sigs = signed(req, keys[0], keys[1])
    seq = A.apply_request(led, req, sigs)
    with pytest.raises(RequestReplayed, match=f"ledger entry {seq}"):
        A.apply_request(led, req, sigs)
    # a lowering and then the old raise again: still refused as a replay, never re-applied
    low = A.make_request(led, "b", reason="less", expires_in=HOUR, new_cap=1000)
    A.apply_request(led, low, signed(low, keys[2]))
    with pytest.raises(RequestReplayed):
        A.apply_request(led, req, sigs)
    assert reads.status(led, "b").cap_bytes == 1000


def test_replay_race_applies_once(led, keys):
    req = raise_to(led, 5000)
    sigs = signed(req, keys[0], keys[1])
    results: list[object] = []
    url = led.url if led.db.dialect == "sqlite" else led.db._dsn

    def go():
        other = open_ledger(url, create=False)
        try:
            results.append(A.apply_request(other, req, sigs))
        except ApprovalRefused as exc:
            results.append(exc)
        finally:
            other.close()

    ts = [threading.Thread(target=go) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sum(isinstance(r, int) for r in results) == 1, results
    assert all(isinstance(r, (int, RequestReplayed, RequestStale)) for r in results), results
    assert verify_ledger(led).ok


def test_stale_after_the_cap_changed(led, keys):
    first, second = raise_to(led, 5000), raise_to(led, 9000)
    A.apply_request(led, first, signed(first, keys[0], keys[1]))
    with pytest.raises(RequestStale, match="cap 5000 bytes now; the request was made when it was 1000"):
        A.apply_request(led, second, signed(second, keys[0], keys[1]))
    assert reads.status(led, "b").cap_bytes == 5000


def test_stale_after_the_approver_set_changed(led, keys):
    req = raise_to(led, 5000)
    sigs = signed(req, keys[0], keys[1])
    change = A.make_request(led, "b", reason="rotate", expires_in=HOUR, new_approvers=(2, [k.public_key() for k in keys[:2]]))
    A.apply_request(led, change, signed(change, keys[0], keys[2]))
    with pytest.raises(RequestStale, match="approver set"):
        A.apply_request(led, req, sigs)


def test_tampered_request(led, keys, tmp_path):
    req = raise_to(led, 5000)
    sigs = signed(req, keys[0], keys[1])
    bigger = {**req, "new_cap": 10**12}
    with pytest.raises(RequestTampered, match="changed after it was signed"):
        A.apply_request(led, bigger, sigs)
    # a flipped bit in a signature
    s = sigs[1]["signature"]
    bad = {**sigs[1], "signature": s[:-1] + ("0" if s[-1] != "0" else "1")}
    with pytest.raises(RequestTampered, match="does not verify"):
        A.apply_request(led, req, [sigs[0], bad])
    # files: an edited request file, a request file that is not JSON, a truncated one
    p = tmp_path / "req.json"
    A.write_json(p, bigger)
    with pytest.raises(RequestTampered):
        A.apply_request(led, A.load_request(p), sigs)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(RequestTampered, match="not JSON"):
        A.load_request(tmp_path / "junk.json")
    (tmp_path / "extra.json").write_text(json.dumps({**req, "note": "x"}))
    with pytest.raises(RequestTampered, match="unexpected"):
        A.load_request(tmp_path / "extra.json")
    assert reads.status(led, "b").cap_bytes == 1000


def test_wrong_budget(led, keys, url, tmp_path):
    led.ensure_budget("other", 1000)
    A.init_approvers(led, "other", 1, [keys[3].public_key()])
    req = raise_to(led, 5000)
    sigs = signed(req, keys[0], keys[1])
    with pytest.raises(WrongBudget, match="for budget 'b', not 'other'"):
        A.apply_request(led, req, sigs, budget="other")
    # signatures for a request on another budget do not carry over
    req_other = A.make_request(led, "other", reason="x", expires_in=HOUR, new_cap=5000)
    with pytest.raises(WrongBudget, match="approves a request for budget 'b'"):
        A.apply_request(led, req_other, sigs)
    # the same budget name on another ledger: the request's head is not in its history
    other_url = f"sqlite:///{tmp_path}/other.db"
    led2 = open_ledger(other_url)
    led2.ensure_budget("b", 1000)
    A.init_approvers(led2, "b", 2, [k.public_key() for k in keys[:3]])
    with pytest.raises(WrongBudget, match="another ledger"):
        A.apply_request(led2, req, sigs)
    led2.reserve("b", 1, "m", 1)
    with pytest.raises(WrongBudget, match="another ledger"):
        A.apply_request(led2, req, sigs)
    # a budget this ledger does not have
    ghost = {**req, "budget": "ghost"}
    with pytest.raises(WrongBudget, match="does not have"):
        A.apply_request(led, ghost, signed(ghost, keys[0], keys[1]))
    assert reads.status(led, "b").cap_bytes == 1000 and reads.status(led2, "b").cap_bytes == 1000
    led2.close()


def test_lowering_needs_one_approver_and_never_below_reserved(led, keys):
    low = A.make_request(led, "b", reason="incident", expires_in=HOUR, new_cap=600)
    assert A.needed(low) == 1
    with pytest.raises(ApprovalsShort):
        A.apply_request(led, low, signed(low, keys[3]))  # an outsider is nobody
    A.apply_request(led, low, signed(low, keys[2]))
    assert reads.status(led, "b").cap_bytes == 600
    too_low = A.make_request(led, "b", reason="stop", expires_in=HOUR, new_cap=100)
    with pytest.raises(ApprovalRefused, match="400 bytes are already reserved"):
        A.apply_request(led, too_low, signed(too_low, keys[0]))
    assert reads.status(led, "b").cap_bytes == 600
    assert verify_ledger(led).ok


def test_approver_set_change_is_k_of_n(led, keys):
    new_set = (1, [keys[3].public_key()])
    change = A.make_request(led, "b", reason="rotate", expires_in=HOUR, new_approvers=new_set)
    with pytest.raises(ApprovalsShort):
        A.apply_request(led, change, signed(change, keys[0]))
    with pytest.raises(ApprovalsShort):  # the incoming key is not an approver yet
        A.apply_request(led, change, signed(change, keys[0], keys[3]))
    A.apply_request(led, change, signed(change, keys[0], keys[1]))
    assert A.approver_set(led, "b") == (1, [A.raw_key(keys[3].public_key())])
    # the old approvers are nobody now; the new one alone is enough
    req = raise_to(led, 2000)
    with pytest.raises(ApprovalsShort):
        A.apply_request(led, req, signed(req, keys[0], keys[1], keys[2]))
    A.apply_request(led, req, signed(req, keys[3]))
    assert reads.status(led, "b").cap_bytes == 2000
    rep = verify_ledger(led)
    assert rep.ok, rep.problems


def test_init_refusals(url, keys):
    led = open_ledger(url)
    with pytest.raises(ConfigError, match="no budget"):
        A.init_approvers(led, "b", 1, [keys[0].public_key()])
    led.ensure_budget("b", 10)
    with pytest.raises(ConfigError, match="twice"):
        A.init_approvers(led, "b", 1, [keys[0].public_key(), keys[0].public_key()])
    with pytest.raises(ConfigError, match="threshold 3"):
        A.init_approvers(led, "b", 3, [keys[0].public_key(), keys[1].public_key()])
    with pytest.raises(ConfigError, match="no approvers yet"):
        A.make_request(led, "b", reason="x", expires_in=HOUR, new_cap=20)
    A.init_approvers(led, "b", 1, [keys[0].public_key()])
    with pytest.raises(ConfigError, match="k-of-n change"):
        A.init_approvers(led, "b", 1, [keys[1].public_key()])
    with pytest.raises(ConfigError, match="already has cap"):
        A.make_request(led, "b", reason="x", expires_in=HOUR, new_cap=10)
    with pytest.raises(ConfigError, match="reason"):
        A.make_request(led, "b", reason=" ", expires_in=HOUR, new_cap=20)
    led.close()


# -- what an auditor's verify finds when the database is edited behind the ledger's back ----------
def _db(url):
    if url.startswith("sqlite"):
        import sqlite3

        return sqlite3.connect(url[len("sqlite:///"):], isolation_level=None), "?"
    import psycopg

    return psycopg.connect(url, autocommit=True), "%s"


def test_verify_catches_a_cap_raised_without_approvals(led, keys, url):
    # An attacker with write access appends a well-formed cap_change signed by keys it owns.
    req = raise_to(led, 10**9)
    fake = signed(req, keys[3])
    forge(url, "cap_change", budget="b", old_cap=1000, new_cap=10**9,
          approvals=[{"public_key": f["public_key"], "signature": f["signature"]} for f in fake], request=req)
    conn, ph = _db(url)
    conn.execute(f"UPDATE budgets SET cap_bytes = {ph} WHERE name = 'b'", (10**9,))
    rep = verify_ledger(led)
    assert any("only 0 distinct approver keys signed it, 2 needed" in p for p in rep.problems), rep.problems


def test_verify_catches_edited_approver_and_nonce_tables(led, keys, url):
    req = raise_to(led, 5000)
    A.apply_request(led, req, signed(req, keys[0], keys[1]))
    assert verify_ledger(led).ok
    conn, ph = _db(url)
    conn.execute(f"UPDATE budget_approvers SET threshold = 1 WHERE budget = {ph}", ("b",))
    rep = verify_ledger(led)
    assert any("approver set in the table differs" in p for p in rep.problems), rep.problems
    conn.execute(f"UPDATE budget_approvers SET threshold = 2 WHERE budget = {ph}", ("b",))
    conn.execute("DELETE FROM applied_requests")
    rep = verify_ledger(led)
    assert any("could be replayed" in p for p in rep.problems), rep.problems


def test_verify_catches_a_replayed_change_in_the_log(led, keys, url):
    req = raise_to(led, 5000)
    seq = A.apply_request(led, req, signed(req, keys[0], keys[1]))
    ev = decode_event(next(e for s, e in reads.entries(led, seq)))
    low = A.make_request(led, "b", reason="less", expires_in=HOUR, new_cap=1000)
    A.apply_request(led, low, signed(low, keys[0]))
    # re-append the old raise as-is: the signatures are genuine, the nonce is spent
    forge(url, "cap_change", **{k: ev[k] for k in ("budget", "old_cap", "new_cap", "approvals", "request")})
    rep = verify_ledger(led)
    assert any("replayed" in p for p in rep.problems), rep.problems


# -- the commands ------------------------------------------------------------------------------------
def _cli(*args, cwd=None):
    return subprocess.run([*EXFILGUARD, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_cli_flow_and_exit_codes(tmp_path):
    url = f"sqlite:///{tmp_path}/l.db"
    for k in ("a", "b", "c"):
        assert _cli("keys", "new", "--out", str(tmp_path / k)).returncode == 0
    out = _cli("budget", "init", "--ledger", url, "--budget", "x", "--cap", "1000", "--approvers", str(tmp_path / "a.pub"),
               "--approvers", str(tmp_path / "b.pub"), "--approvers", str(tmp_path / "c.pub"), "--threshold", "2")
    assert out.returncode == 0, out.stderr
    req = tmp_path / "req.json"
    out = _cli("budget", "request", "--ledger", url, "--budget", "x", "--cap", "2KB", "--reason", "launch",
               "--expires", "1h", "--out", str(req))
    assert out.returncode == 0, out.stderr
    show = _cli("budget", "show", str(req))
    assert show.returncode == 0 and "RAISE the cap of budget 'x' from 1,000 to 2,000 bytes" in show.stdout
    assert "needs 2 of the current 3 approvers" in show.stdout
    for k in ("a", "b"):
        o = _cli("budget", "approve", str(req), "--key", str(tmp_path / k), "--out", str(tmp_path / f"{k}.sig"))
        assert o.returncode == 0, o.stderr
    short = _cli("budget", "apply", str(req), str(tmp_path / "a.sig"), str(tmp_path / "a.sig"), "--ledger", url)
    assert short.returncode == 10 and "1 of the 2 approvals needed" in short.stderr
    ok = _cli("budget", "apply", str(req), str(tmp_path / "a.sig"), str(tmp_path / "b.sig"), "--ledger", url)
    assert ok.returncode == 0, ok.stderr
    again = _cli("budget", "apply", str(req), str(tmp_path / "a.sig"), str(tmp_path / "b.sig"), "--ledger", url)
    assert again.returncode == 10 and "applied already" in again.stderr
    st = json.loads(_cli("ledger", "status", "--ledger", url, "--json").stdout)
    assert st["cap_bytes"] == 2000
    bad = _cli("budget", "request", "--ledger", url, "--budget", "x", "--cap", "3000", "--reason", "r",
               "--expires", "soon", "--out", str(tmp_path / "r2.json"))
    assert bad.returncode == 2 and "duration 'soon' is not a positive duration" in bad.stderr
    nosig = _cli("budget", "apply", str(req), str(tmp_path / "none.sig"), "--ledger", url)
    assert nosig.returncode == 2 and "cannot read signature file" in nosig.stderr
