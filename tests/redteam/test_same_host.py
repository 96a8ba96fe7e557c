"""Scenario same-host (issue 22): the attacker owns the inside that `up` started. Real supervisor,
meter, SQLite ledger, outside and dashboard processes, the real sandbox; each attempt to get
around the meter fails, the meter survives, the ledger verifies, and what got out is <= the cap."""

from __future__ import annotations

import os
import shutil

import pytest

from exfilguard.redteam.samehost_harness import run_same_host

SECRET = bytes((i * 7919 + 13) % 256 for i in range(4000))
STEPS = {1: "connect to the other components' ports", 2: "read the keys and logs", 3: "write or roll back the ledger",
         4: "kill the meter", 5: "raw sockets and routes out"}


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (make sandbox-deps)")
def test_same_host_attacker_gets_nothing_past_the_cap() -> None:
    cap = 1500
    res = run_same_host(SECRET, cap)
    assert res.isolated
    tried = {a["step"] for a in res.attempts}
    assert tried == set(STEPS), res.attempts  # every step was tried (the attacker program ran to the end)
    assert [a["step"] for a in res.attempts] == sorted(a["step"] for a in res.attempts)  # in the order
    assert res.walls_broken == [], res.walls_broken
    assert res.meter_survived and res.ledger_verifies
    # The only channel is metered: the colluder gets bytes, never more than the cap.
    assert 0 < res.secret_bytes_recovered <= res.meter_bytes <= cap
    if os.geteuid() == 0:  # as root the sandbox also drops to nobody: no raw sockets even inside the namespace
        raw = [a for a in res.attempts if "raw" in a["what"] or "AF_PACKET" in a["what"]]
        assert raw and all("Operation not permitted" in a["detail"] for a in raw), raw
