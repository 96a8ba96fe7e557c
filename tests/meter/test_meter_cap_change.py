"""A k-of-n cap change applied while a real meter runs (subprocess, loopback) changes what it
grants, with no restart; SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from meterkit import MeterProcess, Upstream, get_status, pull

from exfilguard.errors import ApprovalRefused, ApprovalsShort
from exfilguard.ledger import approvals as A
from exfilguard.ledger import reads
from exfilguard.ledger import open_ledger
from exfilguard.ledger.verify import verify_ledger

BLOCK = 16384
CAP = 4 * BLOCK


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("pg_url")


def _change(url: str, approvers, cap: int, signers) -> None:
    led = open_ledger(url, create=False)
    try:
        req = A.make_request(led, "default", reason="test", expires_in=600, new_cap=cap)
        A.apply_request(led, req, [A.approve(req, k) for k in signers])
    finally:
        led.close()


def _wait_status(mp: MeterProcess, key: str, want: int) -> dict:
    deadline = time.monotonic() + 60
    st = get_status(mp.metrics_port)
    while st[key] != want and time.monotonic() < deadline:
        time.sleep(0.1)
        st = get_status(mp.metrics_port)
    return st


def test_raise_and_lower_reach_a_running_meter(tmp_path, url):
    up = Upstream("flood")
    mp = MeterProcess(tmp_path, url, up.addr, CAP, block=BLOCK)
    host = "127.0.0.1"
    try:
        mp.wait_ready()
        approvers = [Ed25519PrivateKey.generate() for _ in range(3)]
        led = open_ledger(url, create=False)
        A.init_approvers(led, "default", 2, [k.public_key() for k in approvers])
        led.close()

        assert asyncio.run(pull(host, mp.port)) == CAP  # the cap, exactly
        assert asyncio.run(pull(host, mp.port)) == 0  # exhausted

        _change(url, approvers, 4 * CAP, approvers[:2])  # raise, 2 of 3, while the meter runs
        assert asyncio.run(pull(host, mp.port)) == 3 * CAP  # what the raise added, exactly
        assert asyncio.run(pull(host, mp.port)) == 0
        assert _wait_status(mp, "cap_bytes", 4 * CAP)["cap_bytes"] == 4 * CAP  # and it reports the new cap

        with pytest.raises(ApprovalsShort):  # one approver is not enough to raise ...
            _change(url, approvers, 5 * CAP, approvers[:1])
        assert asyncio.run(pull(host, mp.port)) == 0
        with pytest.raises(ApprovalRefused, match="already reserved"):  # lowering needs one, never below what left
            _change(url, approvers, 4 * CAP - 1, approvers[2:])
    finally:
        rc = mp.stop()
    try:
        assert rc == 0, mp.log()
        led = open_ledger(url, create=False)
        st = reads.status(led, "default")
        assert (st.cap_bytes, st.reserved_bytes, st.outstanding_bytes) == (4 * CAP, 4 * CAP, 0)
        rep = verify_ledger(led)
        assert rep.ok, rep.problems
        led.close()
        # a restarted meter runs under the changed cap (the old --cap is refused, as any other)
        old = MeterProcess(tmp_path, url, up.addr, CAP, block=BLOCK, name="old")
        assert old.proc.wait(60) == 2 and "refusing to start with --cap" in old.log()
        old.stop()
        again = MeterProcess(tmp_path, url, up.addr, 4 * CAP, block=BLOCK, name="again")
        try:
            assert again.wait_ready()["cap_bytes"] == 4 * CAP
        finally:
            again.stop()
    finally:
        up.close()


def test_lowering_reaches_a_running_meter(tmp_path, url):
    up = Upstream("flood")
    mp = MeterProcess(tmp_path, url, up.addr, 100 * CAP, block=BLOCK)
    host = "127.0.0.1"
    try:
        mp.wait_ready()
        approvers = [Ed25519PrivateKey.generate() for _ in range(3)]
        led = open_ledger(url, create=False)
        A.init_approvers(led, "default", 3, [k.public_key() for k in approvers])
        led.close()
        _change(url, approvers, 2 * CAP, approvers[1:2])  # an incident: one approver lowers it
        assert asyncio.run(pull(host, mp.port)) == 2 * CAP
        assert asyncio.run(pull(host, mp.port)) == 0
    finally:
        assert mp.stop() == 0
        up.close()
    led = open_ledger(url, create=False)
    assert reads.status(led, "default").reserved_bytes == 2 * CAP
    assert verify_ledger(led).ok
    led.close()
