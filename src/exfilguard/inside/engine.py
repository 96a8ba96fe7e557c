"""Strong-model backends: generation jobs in, token ids out.

`LocalEngine` runs a transformers model with continuous batching: one thread steps every active
request together (left-padded KV cache, attention mask, per-row position ids); a new request is
prefilled alone and merged into the running batch, a finished one is cut out of it. Requests do
not wait for each other one by one.

The tokens of a step go to their sinks (the encoders, which run the weak model) on a pool of
threads, all rows at once, while the engine thread computes the next step: the weak model's work
overlaps the strong model's instead of following it, and the rows of a step reach the weak model
together, so an exact student computes their tables in one batched pass (its stepper). A sink's
answer (a stop string, an error) is read one step later; the token the row sampled meanwhile is
dropped, never delivered.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ContextManager, Protocol

import numpy as np

from exfilguard.inside.sampling import sample_token
from exfilguard.protocol.wire import GenerationRequest

log = logging.getLogger(__name__)


class TokenSink(Protocol):
    """Where a backend delivers one job's tokens (called from the backend's thread)."""

    def tokens(self, ids: Sequence[int]) -> bool:
        """Take newly generated ids; return True to stop the job (a stop string was hit)."""

    def done(self, reason: str) -> None:
        """The job ended: "stop", "length", "cancelled" or "error"."""


@dataclass
class Job:
    """One generation request and where its tokens go."""

    request: GenerationRequest
    sink: TokenSink
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Backend(Protocol):
    """A strong model that runs jobs."""

    name: str

    def submit(self, job: Job) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class _Row:
    job: Job
    last: int  # sampled, not yet fed to the model
    generated: int
    length: int  # real tokens in the KV cache (prompt + fed)
    eos: frozenset[int] = field(default_factory=frozenset)
    emitting: Future[str | None] | None = None  # the sink's work on the last token: why to stop, or None


PREFILL_GROUP_TOKENS = 2048  # most (padded) prompt tokens read in one shared prefill pass
BARRIER_S = 5.0  # the longest a step's sink call waits for the step's others to start


def _region_of(sink: Any) -> Callable[[], ContextManager[Any]]:
    """The weak model's batching region of a sink's encoder (codec_adapter's `region`), if any:
    inside it, the rows of a step ask for their tables together."""
    region = getattr(getattr(sink, "encoder", None), "region", None)
    return region if callable(region) else contextlib.nullcontext


class LocalEngine:
    """Continuous batching over a TransformersModel (CPU or GPU)."""

    def __init__(self, model: Any, max_batch: int = 64, max_context: int | None = None):
        self.model = model  # exfilguard.models.hf.TransformersModel
        self.name = model.info.spec
        self.max_batch = max_batch
        cfg = model.model.config
        self.max_context = max_context or int(getattr(cfg, "max_position_embeddings", 8192))
        self._eos = frozenset(model.info.eos_token_ids)
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._rows: list[_Row] = []
        self._kv: list[tuple[Any, Any]] = []
        self._mask: Any = None
        self._cache: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self.steps = 0
        # Seconds of the engine's work (benchmarks): admitting jobs (prefill, first tokens), and
        # per step the strong model's forward, waiting for the sinks' work on the previous step's
        # tokens, sampling and handing out this step's.
        self.step_seconds = {"prefill": 0.0, "forward": 0.0, "wait for sinks": 0.0, "sample": 0.0}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        # One thread per row: a step's sink calls run at once (they wait on each other's tables).
        self._pool = ThreadPoolExecutor(max_workers=self.max_batch, thread_name_prefix="exfilguard-emit")
        self._thread = threading.Thread(target=self._loop, name="exfilguard-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def submit(self, job: Job) -> None:
        with self._cv:
            self._pending.append(job)
            self._cv.notify_all()

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cv:
                    while self._running and not self._pending and not self._rows:
                        self._cv.wait(timeout=0.5)
                    if not self._running:
                        break
                    room = self.max_batch - len(self._rows)
                    new = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                t = time.perf_counter()
                for group in self._prefill_groups(new):
                    try:
                        self._admit(group)
                    except Exception:
                        log.exception("prefill failed")
                        for job in group:
                            self._finish(job, "error")
                self.step_seconds["prefill"] += time.perf_counter() - t
                self._drop([r for r in self._rows if r.job.cancelled], "cancelled")
                if self._rows:
                    try:
                        self._step()
                    except Exception:
                        log.exception("generation step failed")
                        self._drop(list(self._rows), "error")
        for r in self._rows:
            self._settle(r)
            self._finish(r.job, "cancelled")
        self._rows = []
        while self._pending:
            self._finish(self._pending.popleft(), "cancelled")

    def _finish(self, job: Job, reason: str) -> None:
        try:
            job.sink.done(reason)
        except Exception:
            log.exception("sink.done failed")

    @staticmethod
    def _settle(row: _Row) -> str | None:
        """Wait for the sink's work on the row's last token; why the row must stop, or None."""
        fut, row.emitting = row.emitting, None
        return None if fut is None else fut.result()

    def _ends(self, row: _Row, tok: int) -> str | None:
        """Why the row ends with `tok` (counted in row.generated) regardless of its sink (EOS,
        length), or None."""
        if tok in self._eos:
            return "stop"
        if row.generated >= row.job.request.max_tokens or row.length + 1 >= self.max_context:
            return "length"
        return None

    def _emit(self, rows: list[tuple[_Row, int, str | None]]) -> None:
        """Hand one step's (row, token, why the token ends the row or None) to the sinks, all at
        once on the pool. A row that ends is finished by its own task; the others' tasks say
        whether the sink wants to stop (read at the next step)."""
        if not rows:
            return
        assert self._pool is not None
        barrier = threading.Barrier(len(rows))
        for row, tok, ending in rows:
            row.emitting = self._pool.submit(self._deliver, row.job, tok, ending, barrier)

    def _deliver(self, job: Job, tok: int, ending: str | None, barrier: threading.Barrier) -> str | None:
        """One sink call (on the pool): the reason to stop, or None; `ending`: finish the job too."""
        with _region_of(job.sink)():
            try:
                # Every row of the step is in its batching region before any asks for a table,
                # so the weak model's stepper serves them in one pass.
                barrier.wait(BARRIER_S)
            except threading.BrokenBarrierError:
                pass
            try:
                hit = job.sink.tokens([tok])
            except Exception:
                log.exception("sink.tokens failed")
                reason: str | None = "error"
            else:
                reason = "cancelled" if job.cancelled else ("stop" if hit else None)
            if ending is not None:
                self._finish(job, reason or ending)
        return reason

    def _sample(self, logits: np.ndarray, row: _Row) -> int:
        req = row.job.request
        return sample_token(logits, req.seed, row.generated, req.temperature, req.top_p)

    def _prefill_groups(self, jobs: list[Job]) -> list[list[Job]]:
        """The jobs to admit, in groups that share one prefill pass: prompts of similar length
        (left padding at most a quarter of the group's real tokens, or 64; at most
        PREFILL_GROUP_TOKENS in all, so a long prompt is read alone), shortest first.
        Cancelled and over-long jobs are finished here."""
        ok: list[Job] = []
        for job in jobs:
            if job.cancelled:
                self._finish(job, "cancelled")
            elif len(job.request.prompt_ids) >= self.max_context:
                self._finish(job, "length")
            else:
                ok.append(job)
        groups: list[list[Job]] = []
        real = 0
        for job in sorted(ok, key=lambda j: len(j.request.prompt_ids)):
            n = len(job.request.prompt_ids)  # the longest so far: the group pads to it
            padded = (len(groups[-1]) + 1) * n if groups else 0
            if groups and padded <= PREFILL_GROUP_TOKENS and padded - (real + n) <= max(64, (real + n) // 4):
                groups[-1].append(job)
                real += n
            else:
                groups.append([job])
                real = n
        return groups

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the jobs' prompts in one pass (left-padded, as the batch is), sample each one's
        first token, and add the rows that go on to the batch."""
        import torch

        m = self.model
        dev = m.device
        lens = [len(j.request.prompt_ids) for j in jobs]
        width = max(lens)
        x = torch.tensor([[0] * (width - n) + list(j.request.prompt_ids) for j, n in zip(jobs, lens)], dtype=torch.long, device=dev)
        new_mask = torch.tensor([[0] * (width - n) + [1] * n for n in lens], dtype=torch.long, device=dev)
        if len(jobs) == 1:
            out = m.model(input_ids=x, use_cache=True)
        else:
            pos = (new_mask.cumsum(dim=1) - 1).clamp(min=0)
            out = m.model(input_ids=x, attention_mask=new_mask, position_ids=pos, use_cache=True)
        logits = out.logits[:, -1].float().cpu().numpy()
        emit: list[tuple[_Row, int, str | None]] = []
        keep: list[int] = []
        rows: list[_Row] = []
        for i, (job, n) in enumerate(zip(jobs, lens)):
            row = _Row(job=job, last=-1, generated=0, length=n)
            tok = self._sample(logits[i], row)
            row.last = tok
            row.generated += 1
            ending = self._ends(row, tok)
            emit.append((row, tok, ending))
            if ending is None:  # else its task finishes the job
                keep.append(i)
                rows.append(row)
        self._emit(emit)
        if not rows:
            return
        new_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        if len(keep) < len(jobs):
            idx = torch.tensor(keep, dtype=torch.long, device=dev)
            new_mask = new_mask.index_select(0, idx)
            start = int(new_mask.any(dim=0).nonzero()[0])  # padding every kept row has: trim it
            new_mask = new_mask[:, start:]
            new_kv = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]) for k, v in new_kv]
        if not self._rows:
            self._kv, self._mask = new_kv, new_mask
        else:
            self._kv = self._current_kv()
            width = max(self._mask.shape[1], new_mask.shape[1])
            self._kv = [
                (torch.cat([_lpad(k, width), _lpad(nk, width)]), torch.cat([_lpad(v, width), _lpad(nv, width)]))
                for (k, v), (nk, nv) in zip(self._kv, new_kv, strict=True)
            ]
            self._mask = torch.cat([_lpad_mask(self._mask, width), _lpad_mask(new_mask, width)])
        self._cache = None
        self._rows += rows

    def _current_kv(self) -> list[tuple[Any, Any]]:
        if self._cache is not None:
            return [(layer.keys, layer.values) for layer in self._cache.layers]
        return self._kv

    def _drop(self, rows: list[_Row], reason: str | None) -> None:
        """Cut finished rows out of the batch and tell their sinks `reason` (after the sink's
        work on their last token); None: their own tasks tell them."""
        if not rows:
            return
        import torch

        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in gone]
        for r in rows:
            if reason is not None:
                why = self._settle(r)
                self._finish(r.job, why or reason)
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._kv, self._mask, self._cache = [], None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask.index_select(0, idx)
        # Columns that are padding in every remaining row are dead weight: trim them.
        live = mask.any(dim=0).nonzero()
        start = int(live[0]) if live.numel() else 0
        self._kv = [
            (k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
            for k, v in self._current_kv()
        ]
        self._mask = mask[:, start:]
        self._cache = None

    def _step(self) -> None:
        import torch
        from transformers import DynamicCache

        dev = self._mask.device
        if self._cache is None:
            self._cache = DynamicCache(ddp_cache_data=self._kv)
            self._kv = []
        rows = self._rows
        t0 = time.perf_counter()
        x = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=dev)
        pos = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=dev)
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=dev)], dim=1)
        out = self.model.model(
            input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=self._cache, use_cache=True
        )
        self._cache = out.past_key_values
        self._mask = mask
        self.steps += 1
        logits = out.logits[:, -1].float().cpu().numpy()
        t1 = time.perf_counter()
        # The sinks worked on the previous step's tokens while the model computed this one.
        stopped: dict[str, list[_Row]] = {}
        for r in rows:
            why = self._settle(r)
            if why is not None:
                stopped.setdefault(why, []).append(r)
        t2 = time.perf_counter()
        gone = {id(r) for rs in stopped.values() for r in rs}
        emit: list[tuple[_Row, int, str | None]] = []
        ended: list[_Row] = []
        for i, r in enumerate(rows):
            r.length += 1
            if id(r) in gone:  # its sink stopped it: this step's token is never delivered
                continue
            tok = self._sample(logits[i], r)
            r.last = tok
            r.generated += 1
            ending = self._ends(r, tok)
            emit.append((r, tok, ending))
            if ending is not None:
                ended.append(r)
        self._emit(emit)
        t3 = time.perf_counter()
        sec = self.step_seconds
        sec["forward"] += t1 - t0
        sec["wait for sinks"] += t2 - t1
        sec["sample"] += t3 - t2
        for reason, rs in stopped.items():
            self._drop(rs, reason)
        self._drop(ended, None)


def _lpad(t: Any, width: int) -> Any:
    """Left-pad a [B, H, L, D] tensor with zeros to length `width` along L."""
    import torch

    extra = width - t.shape[2]
    if extra == 0:
        return t
    z = torch.zeros((t.shape[0], t.shape[1], extra, t.shape[3]), dtype=t.dtype, device=t.device)
    return torch.cat([z, t], dim=2)


def _lpad_mask(m: Any, width: int) -> Any:
    import torch

    extra = width - m.shape[1]
    if extra == 0:
        return m
    return torch.cat([torch.zeros((m.shape[0], extra), dtype=m.dtype, device=m.device), m], dim=1)


class _Collect:
    """A Job sink that keeps every token id and signals when its answer is done."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.ev = threading.Event()

    def tokens(self, ids: Sequence[int]) -> bool:
        self.ids.extend(int(t) for t in ids)
        return False

    def done(self, reason: str) -> None:
        self.ev.set()


def engine_answers(model: Any, reqs: Sequence[tuple[list[int], int, float]], tokens: int, *, max_batch: int = 16,
                   timeout: float | None = None, on_done: Any = None) -> list[list[int]]:
    """Answer every (prompt ids, seed, temperature) with the inside's own engine, in one continuous batch.

    Raises TimeoutError when an answer takes longer than `timeout` seconds; `on_done(i)` is called
    as answer i (in request order) is complete.
    """
    eng = LocalEngine(model, max_batch=max_batch)
    eng.start()
    sinks: list[_Collect] = []
    try:
        for p, seed, t in reqs:
            sink = _Collect()
            eng.submit(Job(GenerationRequest(prompt_ids=p, max_tokens=tokens, seed=seed, temperature=t), sink))
            sinks.append(sink)
        for i, sink in enumerate(sinks):
            if not sink.ev.wait(timeout):
                raise TimeoutError(f"answer {i} was not done after {timeout} s")
            if on_done is not None:
                on_done(i)
    finally:
        eng.stop()
    return [s.ids for s in sinks]
