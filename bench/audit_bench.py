"""Time the audit path on a ledger of N entries: checkpoint, consistency and inclusion proofs
(made from the ledger, checked offline) and a k-of-n cap raise.

    python bench/audit_bench.py --entries 50000 [--ledger sqlite:///tmp/x.db]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tqdm import tqdm

from exfilguard.ledger import approvals as A
from exfilguard.ledger import reads
from exfilguard.ledger import open_ledger
from exfilguard.ledger.checkpoint import make_checkpoint
from exfilguard.ledger.proofs import check_consistency, check_inclusion, proof_to_json, prove_consistency, prove_inclusion
from exfilguard.ledger.checkpoint import canonical_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--ledger", default="")
    args = ap.parse_args()
    url = args.ledger or f"sqlite:///{tempfile.mkdtemp()}/audit-bench.db"
    led = open_ledger(url)
    led.ensure_budget("b", 10**15)
    approvers = [Ed25519PrivateKey.generate() for _ in range(3)]
    A.init_approvers(led, "b", 2, [k.public_key() for k in approvers])
    mkey = Ed25519PrivateKey.generate()
    batch = 500
    with tqdm(total=args.entries, desc="filling ledger", unit="entry") as bar:
        while reads.tree_head(led).tree_size < args.entries:
            led.batch([("reserve", ("b", 1000, "m", i)) for i in range(batch)])
            bar.update(batch)
    t = time.perf_counter()
    cp1 = make_checkpoint(led, mkey)
    t_cp = time.perf_counter() - t
    req = A.make_request(led, "b", reason="bench", expires_in=600, new_cap=2 * 10**15)
    t = time.perf_counter()
    seq = A.apply_request(led, req, [A.approve(req, k) for k in approvers[:2]])
    t_apply = time.perf_counter() - t
    led.batch([("reserve", ("b", 1000, "m", i)) for i in range(batch)])
    cp2 = make_checkpoint(led, mkey)
    t = time.perf_counter()
    cons = prove_consistency(led, cp1.head, cp2.head)
    t_prove = time.perf_counter() - t
    t = time.perf_counter()
    inc = prove_inclusion(led, seq, cp2.head)
    t_inc = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(100):
        check_consistency(cp1, cp2, cons)
        check_inclusion(cp2, inc)
    t_check = (time.perf_counter() - t) / 100
    n = cp2.head.tree_size
    print(f"ledger {url.split('@')[-1]}: {n} entries")
    print(f"checkpoint: {t_cp * 1e3:.1f} ms")
    print(f"budget apply (2 of 3, re-hashes the log up to the request's head): {t_apply * 1e3:.1f} ms")
    print(f"prove consistency {cp1.head.tree_size} -> {n}: {t_prove * 1e3:.1f} ms, "
          f"{len(cons.path)} hashes, {len(canonical_json(proof_to_json(cons)))} bytes")
    print(f"prove inclusion of entry {seq}: {t_inc * 1e3:.1f} ms, {len(inc.path)} hashes, "
          f"{len(canonical_json(proof_to_json(inc)))} bytes")
    print(f"check both offline: {t_check * 1e3:.2f} ms")
    led.close()


if __name__ == "__main__":
    main()
