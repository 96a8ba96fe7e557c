"""The exact student on the dev file: ideal bits vs its float version, table identity across
paths (SHA-256 of every table), CPU cost per token alone and with concurrent streams. Usage:

    python bench/exact_student.py --dev ../shared/data/smollm2_corpus_dev.jsonl --limit 20 --streams 1,8,32

Figures (bits/token) are the exact tables' own coding cost (-log2 f / 2**24) and, for the float
student, the teacher-forced softmax. Identity: per generation, the SHA-256 of all its tables by
  tf1   teacher-forced, one generation per pass
  tf64  teacher-forced, --batch generations per pass
  inc   incremental session, one token per step, one stream (what a decoder does alone)
  sN    incremental, N streams at once on N threads, their tables from shared passes (the
        stepper: what the outside and the inside do with N concurrent answers); a stream
        starts on the next generation as soon as one ends (continuous batching)
  thr2  tf1 in a child process with 2 BLAS / OpenMP threads
and a generation whose hashes differ is a desync. CPU ms per token per stream = the process's
CPU seconds (every thread) / tokens. --old REV also times the incremental path of
models/exact_student.py as it was at git revision REV, in this process (same load).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from exfilguard.models import load_model
from exfilguard.models.distill import Row, first_per_temperature, read_corpus
from exfilguard.models import exact_student as exact_student_module
from exfilguard.models.exact_student import DEFAULT_EXACT_STUDENT, ExactStudentModel, load_exact_student


def _digest(tables: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tables).tobytes()).hexdigest()


def tf_hashes(m: ExactStudentModel, rows: list[Row], batch: int) -> tuple[list[str], float]:
    """Teacher-forced tables' hashes, `batch` generations per pass; and the seconds."""
    out: list[str] = []
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        for tabs in m.score_frequencies_many([(r.prompt_ids, r.token_ids) for r in part]):
            out.append(_digest(tabs))
    return out, time.perf_counter() - t0


def inc_hashes(m: Any, rows: list[Row]) -> tuple[list[str], float, float]:
    """One stream at a time, token by token: hashes, wall seconds, CPU seconds."""
    out: list[str] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for r in rows:
        s = m.session(r.prompt_ids)
        h = hashlib.sha256()
        for t in r.token_ids:
            h.update(np.ascontiguousarray(s.frequencies()).tobytes())
            s.feed(t)
        out.append(h.hexdigest())
    return out, time.perf_counter() - t0, time.process_time() - c0


def stream_hashes(m: ExactStudentModel, rows: list[Row], streams: int) -> tuple[list[str], float, float, float]:
    """`streams` threads decode generations token by token, their tables from shared passes;
    hashes, wall seconds, CPU seconds, rows per pass."""
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(rows)):
        todo.put(i)
    out = [""] * len(rows)
    p0, r0 = m.stepper.passes, m.stepper.rows

    def worker() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            r = rows[i]
            h = hashlib.sha256()
            with m.stepper.active():
                s = m.session(r.prompt_ids)
                for t in r.token_ids:
                    h.update(np.ascontiguousarray(s.frequencies()).tobytes())
                    s.feed(t)
            out[i] = h.hexdigest()

    t0, c0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=worker) for _ in range(streams)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rows_per_pass = (m.stepper.rows - r0) / max(1, m.stepper.passes - p0)
    return out, time.perf_counter() - t0, time.process_time() - c0, rows_per_pass


def old_model(rev: str, path: str) -> Any:
    """models/exact_student.py as of git revision `rev`, loaded as a module of its own."""
    src = subprocess.run(["git", "show", f"{rev}:src/exfilguard/models/exact_student.py"], capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("exact_student_old", loader=None)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    mod.__file__ = str(Path(exact_student_module.__file__))  # it finds its data beside itself
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    exec(compile(src, f"exact_student@{rev}", "exec"), mod.__dict__)
    return mod.load_exact_student(path)


def bits(model, rows: list[Row]) -> tuple[float, int, float]:
    """Ideal bits, tokens, seconds: exact tables when the model has them, else the float softmax."""
    import torch

    total, n = 0.0, 0
    t0 = time.perf_counter()
    for r in rows:
        f = model.score_frequencies(r.prompt_ids, r.token_ids)
        if f is not None:
            picked = f[np.arange(len(r.token_ids)), np.asarray(r.token_ids)].astype(np.float64)
            total += float((24 - np.log2(picked)).sum())
        else:
            lg = torch.from_numpy(model.score_fast(r.prompt_ids, r.token_ids)).double()
            total -= float(torch.log_softmax(lg, -1)[torch.arange(len(r.token_ids)), torch.tensor(r.token_ids)].sum()) / math.log(2)
        n += len(r.token_ids)
    return total, n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", required=True)
    ap.add_argument("--limit", type=int, default=20, help="first N generations per temperature (0: all 900)")
    ap.add_argument("--exact", default=str(DEFAULT_EXACT_STUDENT))
    ap.add_argument("--float", dest="float_spec", default="student:src/exfilguard/data/default_student/student.npz")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--streams", default="1,8,32", help="concurrent stream counts to time (comma-separated; empty: none)")
    ap.add_argument("--old", default="", help="git revision whose incremental path to time beside this one (e.g. 8ba0b11)")
    ap.add_argument("--matmul", default="auto", choices=["auto", "torch", "numpy"])
    ap.add_argument("--skip", action="append", default=[], help="skip a part: bits, identity, inc, thr2")
    ap.add_argument("--hashes-only", action="store_true", help=argparse.SUPPRESS)  # the thr2 child
    args = ap.parse_args()
    rows = [r for r in first_per_temperature(read_corpus([args.dev]), args.limit) if r.token_ids]
    m = load_exact_student(args.exact, matmul=args.matmul)
    if args.hashes_only:
        print(json.dumps(tf_hashes(m, rows, 1)[0]))
        return
    report: dict = {"generations": len(rows), "tokens": sum(len(r.token_ids) for r in rows), "limit_per_temperature": args.limit}
    if "bits" not in args.skip:
        specs = {"exact": m, "float": load_model(args.float_spec), "default": load_model("default"), "default-float": load_model("default-float")}
        for temp in sorted({r.temperature for r in rows}):
            sel = [r for r in rows if r.temperature == temp]
            for name, model in specs.items():
                b, n, sec = bits(model, sel)
                report[f"bits/token {name} T={temp:g}"] = round(b / n, 4)
                report[f"ms/token teacher-forced {name} T={temp:g}"] = round(1000 * sec / n, 2)
            print(json.dumps(report), flush=True)
    if "identity" not in args.skip:
        h1, s1 = tf_hashes(m, rows, 1)
        hb, sb = tf_hashes(m, rows, args.batch)
        report[f"tf1 vs tf{args.batch} desyncs"] = sum(a != b for a, b in zip(h1, hb))
        report["ms/token tf1"] = round(1000 * s1 / report["tokens"], 2)
        report[f"ms/token tf{args.batch}"] = round(1000 * sb / report["tokens"], 2)
        if "inc" not in args.skip:
            hi, si, ci = inc_hashes(m, rows)
            report["tf1 vs inc desyncs"] = sum(a != b for a, b in zip(h1, hi))
            report["ms/token incremental exact (wall, cpu)"] = [round(1000 * si / report["tokens"], 2), round(1000 * ci / report["tokens"], 2)]
            if args.old:
                ho, so, co = inc_hashes(old_model(args.old, args.exact), rows)
                report[f"tf1 vs inc@{args.old} desyncs"] = sum(a != b for a, b in zip(h1, ho))
                report[f"ms/token incremental exact@{args.old} (wall, cpu)"] = [round(1000 * so / report["tokens"], 2), round(1000 * co / report["tokens"], 2)]
            fm = load_model(args.float_spec)
            t0 = time.perf_counter()
            for r in rows:
                s = fm.session(r.prompt_ids)
                for t in r.token_ids:
                    s.logits()
                    s.feed(t)
            report["ms/token incremental float"] = round(1000 * (time.perf_counter() - t0) / report["tokens"], 2)
        for n in [int(x) for x in args.streams.split(",") if x]:
            hs, ws, cs, rpp = stream_hashes(m, rows, n)
            report[f"s{n}: tf1 vs {n} streams desyncs"] = sum(a != b for a, b in zip(h1, hs))
            report[f"s{n}: cpu ms/token/stream"] = round(1000 * cs / report["tokens"], 2)
            report[f"s{n}: wall ms/token (all streams)"] = round(1000 * ws / report["tokens"], 2)
            report[f"s{n}: rows per pass"] = round(rpp, 1)
            print(json.dumps(report), flush=True)
        if "thr2" not in args.skip:
            env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
            cmd = [sys.executable, __file__, "--dev", args.dev, "--limit", str(args.limit), "--exact", args.exact, "--hashes-only"]
            h2 = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
            report["1 vs 2 threads desyncs"] = sum(a != b for a, b in zip(h1, h2))
        report["blas"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        report["matmul"] = m.matmul
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
