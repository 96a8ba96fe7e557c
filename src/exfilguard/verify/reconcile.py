"""Reconcile the outside's request log with the meter's ledger: the logged bytes must explain every
byte the meter forwarded.

The meter counts bytes on the wire and parses nothing; the outside logs, per answer, the wire size
of every frame of its slot (`wire_bytes`), and per connection the size of its HELLO (`conn`
records). Both count the same bytes, so over the life of a budget

    ledger forwarded == sum(wire_bytes of the logged answers) + sum(hello_bytes of the logged connections)

An answer deleted from the log (even with the chain recomputed and the lines signed again) leaves
its bytes in the ledger unexplained; a made-up answer claims bytes the meter never forwarded.
While the stack runs, answers in flight can be on one side and not yet on the other: the ledger's
open reservations (`outstanding`) bound that, and `tolerance` adds room an auditor chooses.
A meter run with `--timing-charge` also counts, per connection and per short read, bytes that no
frame carries (`exfilguard_meter_timing_charged_bytes_total`); the ledger does not tell them apart,
so the auditor gives their total (`timing_charged`) from the meter's metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exfilguard.errors import LogUnreconciled
from exfilguard.verify.requestlog import ConnRecord, RequestRecord, read_log


@dataclass(frozen=True)
class Reconciliation:
    """The two counts side by side (bytes)."""

    answers: int
    answer_bytes: int
    connections: int
    hello_bytes: int
    ledger_forwarded: int  # settled reservations' bytes (ledger status `forwarded_bytes`)
    ledger_outstanding: int  # open reservations: bytes possibly forwarded, not yet settled
    tolerance: int
    timing_charged: int = 0  # the meter's --timing-charge bytes (in the ledger, on no frame): said by the auditor

    @property
    def logged_bytes(self) -> int:
        return self.answer_bytes + self.hello_bytes

    @property
    def unexplained(self) -> int:
        """Bytes the meter forwarded (settled) that no logged answer or connection carries."""
        return self.ledger_forwarded - self.timing_charged - self.logged_bytes

    @property
    def ok(self) -> bool:
        # Forwarded but not logged: only within the tolerance. Logged but not settled: only what
        # open reservations may still settle (answers in flight), plus the tolerance.
        return -(self.ledger_outstanding + self.tolerance) <= self.unexplained <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "logged_bytes": self.logged_bytes, "unexplained": self.unexplained, "ok": self.ok}

    def problem(self) -> str:
        if self.unexplained > self.tolerance:
            return (f"the meter forwarded {self.ledger_forwarded} bytes but the request log explains {self.logged_bytes} "
                    f"({self.answers} answers, {self.answer_bytes} B; {self.connections} connections, {self.hello_bytes} B): "
                    f"{self.unexplained} bytes left with no logged answer (answers deleted from the log, or the log "
                    "does not cover the budget's whole life)")
        return (f"the request log claims {self.logged_bytes} bytes but the meter forwarded {self.ledger_forwarded} "
                f"(+{self.ledger_outstanding} in open reservations): {-self.unexplained} logged bytes never crossed the "
                "meter (made-up or duplicated answers, or another budget's ledger)")


def reconcile(log_path: str | Path, ledger_url: str, budget: str | None = None, public_key: Any = None,
              tolerance: int = 0, timing_charged: int = 0) -> Reconciliation:
    """Count both sides; LogCorrupt for a bad log, LogUnreconciled when they disagree."""
    from exfilguard.ledger import open_ledger, reads

    answers = answer_bytes = conns = hello = 0
    for rec in read_log(log_path, public_key):
        if isinstance(rec, RequestRecord):
            answers += 1
            answer_bytes += rec.wire_bytes
        elif isinstance(rec, ConnRecord):
            conns += 1
            hello += rec.hello_bytes
    led = open_ledger(ledger_url, create=False)
    try:
        st = reads.status(led, budget)
    finally:
        led.close()
    r = Reconciliation(answers, answer_bytes, conns, hello, st.forwarded_bytes, st.outstanding_bytes, tolerance,
                       timing_charged)
    if not r.ok:
        exc = LogUnreconciled(r.problem())
        exc.reconciliation = r  # type: ignore[attr-defined]
        raise exc
    return r
