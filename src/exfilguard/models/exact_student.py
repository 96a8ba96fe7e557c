"""The exact student: the student transformer in integer arithmetic, the same table everywhere.

Its next-token table is a pure function of (file, token ids): every step is integer arithmetic
(numpy int64, with the bound on each product stated beside it) or a float matrix product whose
operands are small integers, where every partial sum is an integer below 2**24 (float32) or
2**53 (float64) and so exact in any summation order, on any BLAS, thread count or batch shape.
No libm call at run time: SiLU, exp and RoPE come from tables stored in the file, RMSNorm uses
an integer square root. The result is integer frequencies summing to exactly 2**24
(`Session.frequencies`), which the codec codes as they are.

Arithmetic (made by `quantize_student` from a float student; docs/distill.md):
- weights: int8, symmetric, one scale per output channel; scales are (mantissa, exponent)
  pairs, mantissa < 2**25, so a scale is applied as a multiply and a shift.
- activations into every matrix product: int8 with one scale per token (absmax / 127); for
  RMSNorm the scale includes 1/rms, with rms from an integer square root.
- residual stream: int64 fixed point with FX fractional bits; q, k, v: FQ bits, clipped to int16;
  gate/up: FH bits; logits: FL bits (1/256 nat), turned into frequencies by the exp table.
- attention: integer scores q.k, integer softmax weights exp(-(max - s)) from the table (2**16
  at the top), output = sum p v / sum p, rounded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exfilguard.errors import ConfigError
from exfilguard.models.base import LanguageModel, ModelInfo, Session
from exfilguard.models.fingerprint import fingerprint
from exfilguard.models.npzfile import read_model_npz

FORMAT = "exfilguard-exact-student-v1"
INFERENCE_PATH_VERSION = "exact-student-v1"
DEFAULT_EXACT_STUDENT = Path(__file__).resolve().parent.parent / "data" / "default_student" / "student_exact.npz"
FREQ_BITS = 24  # frequencies sum to exactly 2**24 (models/base.py Session.frequencies)

F32_EXACT = 1 << 24  # every integer of magnitude <= 2**24 is a float32
F64_EXACT = 1 << 53

FX = 12  # residual stream fractional bits
FQ = 8  # q, k, v fractional bits (clipped to int16)
FH = 10  # gate / up fractional bits
FL = 8  # logit fractional bits: the exp table's index step is 1/256 nat
GQ = 12  # RMSNorm gain fractional bits
ROPE_BITS = 14  # cos / sin tables: round(2**14 * cos)
EXP_BITS = 30  # exp table: round(2**30 * exp(-i / 2**FL))
ATT_SHIFT = EXP_BITS - 16  # attention weights: the exp table >> 14, at most 2**16
SILU_RANGE = 16  # silu table covers [-16, 16] at step 2**-8; beyond: 0 or identity
SILU_STEP_BITS = 8
I16 = (1 << 15) - 1
XCLIP = 1 << (FX + 14)  # residual magnitude clip: |x| < 2**26, so sum x**2 over d <= 2**11 < 2**63
HCLIP = 1 << (FH + 14)
MAX_POSITIONS = 8192
ROW_BLOCK = 64  # head rows per product: bounds the [rows, vocab] int64 temporaries
SCORE_SHIFT = 16 + 2 * FQ - FL  # q.k * inv_sqrt_hd_q (2**16 / sqrt(hd)) at 2*FQ + 16 bits -> FL bits
ATT_ENTRIES = 1 << 21  # attention scores per block of queries (16 MB of float64): memory linear in the context
PREFILL_CHUNK = 256  # tokens a sequence reads per pass: a long prompt does not hold up the others for long
GATHER_S = 0.02  # the longest a pass waits for an active thread that has not asked yet


def usable_cpus(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container limited to 2 CPUs on a 64-core host sees 64 in its affinity)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


# Threads of a stepper that code between passes at once (the others wait for a slot). The coding
# is mostly Python, so more threads than this only trade the GIL and the cores back and forth:
# at 32 streams on 2 cores a third of the CPU went to futex calls (bench/serve_bench.py
# --decode-rate). Half the usable cores, at least 1.
CODING_SLOTS = max(1, usable_cpus() // 2)


@dataclass(frozen=True)
class Features:
    """Final hidden states as int8 codes a [rows, d] with per-row scales am * 2**ae."""

    a: np.ndarray
    am: np.ndarray
    ae: np.ndarray

    def __getitem__(self, rows: slice) -> Features:
        return Features(self.a[rows], self.am[rows], self.ae[rows])


@dataclass(frozen=True)
class ExactConfig:
    """Shape of an exact student (the float student's config plus the tables' sizes)."""

    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    max_positions: int = MAX_POSITIONS


# ------------------------------------------------------------------ integer helpers


def _rshift_round(v: np.ndarray, sh: np.ndarray | int) -> np.ndarray:
    """round(v / 2**sh) (half up) for sh >= 1, v * 2**-sh for sh <= 0; int64, elementwise."""
    out = np.array(v, dtype=np.int64)
    _rshift_round_into(out, sh)
    return out


def _rshift_round_into(v: np.ndarray, sh: np.ndarray | int) -> None:
    """v[...] = _rshift_round(v, sh) for an int64 array v, in place: the usual case makes no
    temporary of v's size (for the head, 49,152 entries a row, each one cost a fresh allocation
    and its page faults)."""
    sh = np.asarray(sh, dtype=np.int64)
    if sh.size and int(sh.min()) >= 1:  # the usual case: a plain rounding right shift
        right = np.minimum(sh, 62)
        v += np.int64(1) << (right - 1)
        v >>= right
        return
    right = np.clip(sh, 1, 62)
    down = (v + (np.int64(1) << (right - 1))) >> right
    up = np.left_shift(v, np.clip(-sh, 0, 62))
    v[...] = np.where(sh >= 1, down, up)


def _round_scores(sc: np.ndarray) -> np.ndarray:
    """q.k * inv products (float64 integers) -> round(. / 2**SCORE_SHIFT) half up, in place: the
    scores at FL bits (exact in float64: the products are integers below 2**53)."""
    sc += 1 << (SCORE_SHIFT - 1)
    sc *= 1.0 / (1 << SCORE_SHIFT)
    np.floor(sc, out=sc)
    return sc


def _clamp(v: np.ndarray, lim: int) -> np.ndarray:
    """v clipped to [-lim, lim] in place (np.clip's own overhead was ~10 us a call, ~100 calls a pass)."""
    np.minimum(v, lim, out=v)
    np.maximum(v, -lim, out=v)
    return v


STEP_KEYS = 1 << 20  # float64 entries of one group's padded keys in a decoding step (8 MB, as many for values)


def _step_groups(starts: Sequence[int], row: int) -> list[list[int]]:
    """Sequences (by index) in groups for one decoding step's attention, shortest first: a group's
    count times its longest context, times `row` entries a key, stays within STEP_KEYS (a
    sequence longer than that is a group alone), so the padding costs little memory and work."""
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * (starts[i] + 1) * row <= STEP_KEYS:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _bitlen(v: np.ndarray) -> np.ndarray:
    """Bit length of non-negative int64 values < 2**53 (frexp of an exactly representable float is exact)."""
    if v.size and int(v.max()) >= F64_EXACT:
        raise ValueError("bit length of a value >= 2**53")
    return np.frexp(v.astype(np.float64))[1].astype(np.int64)


def isqrt(n: np.ndarray) -> np.ndarray:
    """floor(sqrt(n)) of non-negative int64 values < 2**62, exactly (a float guess, fixed in integers)."""
    n = np.asarray(n, dtype=np.int64)
    if n.size <= 64:  # a row's norm each: Python's exact isqrt beats eight numpy passes over a few values
        return np.array([math.isqrt(v) for v in n.ravel().tolist()], dtype=np.int64).reshape(n.shape)
    r = np.sqrt(n.astype(np.float64)).astype(np.int64)
    for _ in range(4):  # the guess is within 1 of the answer; each pass moves it by at most 1
        r = np.where(r * r > n, r - 1, r)
        r = np.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


def _quant8(z: np.ndarray, frac: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of z (int64 at `frac` bits, |z| < 2**53) as int8 codes a and a per-row scale (m, e):
    z ~ a * m * 2**e. m < 2**25."""
    amax = np.maximum(np.abs(z).max(axis=-1), 1)
    a = (2 * 127 * z + amax[:, None]) // (2 * amax[:, None])  # round(127 z / amax): |2*127*z| < 2**61
    k = 31 - _bitlen(amax)  # amax << k has 31 bits, so (amax << k) // 127 < 2**25
    m = np.where(k >= 0, np.left_shift(amax, np.maximum(k, 0)), np.right_shift(amax, np.maximum(-k, 0))) // 127
    return a, m, -k - frac


def _norm_quant8(x: np.ndarray, gain: np.ndarray, eps_q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RMSNorm(x) * gain as int8 codes and per-row scale (m, e), from the residual x (FX bits)."""
    d = x.shape[-1]
    ms = (x * x).sum(axis=-1) // d + eps_q  # |x| < 2**26: x*x < 2**52, sum over d <= 2048 < 2**63
    # Normalise ms to 60 or 61 bits by an even shift so the root keeps ~30 bits.
    k2 = ((60 - _bitlen(ms)) // 2) * 2
    msn = np.where(k2 >= 0, np.left_shift(ms, np.maximum(k2, 0)), np.right_shift(ms, np.maximum(-k2, 0)))
    r = isqrt(msn)  # rms * 2**(FX + k2/2), < 2**31
    z = x * gain  # < 2**26 * 2**17 = 2**43 (gain < 2**17, checked at load)
    amax = np.maximum(np.abs(z).max(axis=-1), 1)
    a = (2 * 127 * z + amax[:, None]) // (2 * amax[:, None])
    # scale = amax * 2**-(FX+GQ) / (127 * r * 2**-(FX + k2/2)) = amax / (127 r) * 2**(k2/2 - GQ)
    den = 127 * r  # < 2**38
    k = 24 + _bitlen(den) - _bitlen(amax)  # (amax << k) has <= 24 + 38 = 62 bits
    num = np.where(k >= 0, np.left_shift(amax, np.maximum(k, 0)), np.right_shift(amax, np.maximum(-k, 0)))
    m = num // den  # < 2**25
    return a, m, -k + k2 // 2 - GQ


def _torch_int_mm() -> Any:
    """torch._int_mm (int8 x int8 -> int32: integer products, exact by construction) if this
    torch has it on the CPU, else None. Probed once per model with a product checked in int64."""
    try:
        import torch

        a = torch.tensor([[127, -127] * 4], dtype=torch.int8)
        got = torch._int_mm(a, a.t().contiguous())
        if int(got[0, 0]) != 8 * 127 * 127:
            return None
        return torch._int_mm
    except Exception:  # no torch, or a build without the CPU kernel: the float32 BLAS path
        return None


def _one_thread_here() -> None:
    """Run this thread's torch kernels on one thread. A pass is a few small products: on a busy
    machine, splitting each over threads that wait for a core costs more than it gains (measured:
    the head's product at one row, 0.17 ms on one thread, 2-4 ms on two beside other load). With
    OpenMP (torch's CPU backend here) the setting is the calling thread's own, so the strong
    model's threads keep theirs; with another backend it would be global, so it is left alone."""
    try:
        import torch

        if "parallel backend: OpenMP" in torch.__config__.parallel_info():
            torch.set_num_threads(1)
    except Exception:
        pass


MATMUL_BACKENDS = ("auto", "torch", "numpy")


@dataclass
class _Linear:
    """int8 weights [out, in], per-output-channel scales (m < 2**25, e).

    Products a @ q.T of int8 codes are exact integers on both backends: torch._int_mm accumulates
    in int32 (|sum| <= 127 * 127 * in < 2**31), and float32 BLAS on integer-valued operands is
    exact while every partial sum stays below 2**24 (`check`), in any order, thread count or
    batch shape. So the backend changes the speed, never a bit.

    At run time the channel scales share the largest exponent E: m'_j = m_j >> (E - e_j), so a
    row needs one shift, not one per entry (a channel 2**-k below the largest keeps 24 - k bits)."""

    q: np.ndarray  # int8 [out, in], |q| <= 127
    m: np.ndarray  # int64 [out]
    e: np.ndarray  # int64 [out]
    name: str
    int_mm: Any = None  # torch._int_mm, or None for float32 BLAS

    def __post_init__(self) -> None:
        self.q = np.ascontiguousarray(self.q, dtype=np.int8)
        self.top_e = int(self.e.max())
        self.m_common = self.m >> np.minimum(self.top_e - self.e, 62)
        if self.int_mm is not None:
            import torch

            self._qt = torch.from_numpy(self.q).t()  # [in, out] view: what _int_mm wants, no copy
        else:
            self._w32 = self.q.astype(np.float32)
        # Row blocks bound the [rows, out] int64 temporaries (~8 MB); the head (out = vocab) gets 64-row blocks.
        self.row_block = max(ROW_BLOCK, (1 << 20) // self.q.shape[0])

    def check(self, act_max: int = 127) -> None:
        """The product bound: |sum_i w_ji a_i| <= max|w| * 127 * d_in < 2**24 (float32 exact)."""
        bound = int(np.abs(self.q.astype(np.int64)).max()) * act_max * self.q.shape[1]
        if bound >= F32_EXACT:
            raise ConfigError(
                f"exact student: {self.name} has a float32 product bound {bound} >= 2**24 "
                f"(in dimension {self.q.shape[1]}); it would not be exact: refusing the model"
            )
        if int(self.m.max(initial=0)) >= 1 << 25 or int(self.m.min(initial=0)) < 0:
            raise ConfigError(f"exact student: {self.name} has a scale mantissa outside [0, 2**25)")

    def _raw_products(self, a: np.ndarray) -> np.ndarray:
        """a @ q.T for int8 codes a [t, in], as the backend gives it: int32, or integer-valued float32."""
        if self.int_mm is not None:
            import torch

            at = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int8))
            return self.int_mm(at, self._qt).numpy()
        return a.astype(np.float32) @ self._w32.T  # exact: bound checked at load

    def products(self, a: np.ndarray) -> np.ndarray:
        """a @ q.T for int8 codes a [t, in]: exact int64 [t, out]."""
        return self._raw_products(a).astype(np.int64)

    def __call__(self, a: np.ndarray, am: np.ndarray, ae: np.ndarray, frac: int) -> np.ndarray:
        """Rows a [t, in] (int8 codes, scale am * 2**ae) -> int64 [t, out] at `frac` bits:
        round(((acc * m') >> 20) * am / 2**sh), computed in place in the output."""
        out = np.empty((a.shape[0], self.q.shape[0]), dtype=np.int64)
        for lo in range(0, a.shape[0], self.row_block):
            hi = lo + self.row_block
            p = out[lo:hi]
            np.copyto(p, self._raw_products(a[lo:hi]), casting="unsafe")  # integers below 2**24: exact
            p *= self.m_common  # |acc| < 2**24, m' < 2**25: < 2**49
            p >>= 20  # < 2**29
            p *= am[lo:hi, None]  # < 2**29 * 2**25 = 2**54
            _rshift_round_into(p, -(ae[lo:hi, None] + (self.top_e + 20 + frac)))  # one shift per row
        return out


class KVCache:
    """One sequence's keys and values for every layer, int16 (k and v are clipped to int16):
    [layers, heads, capacity, head dim], grown by doubling, so a token costs O(1) copying."""

    def __init__(self, n_layer: int, n_head: int, hd: int):
        self.k = np.zeros((n_layer, n_head, 0, hd), dtype=np.int16)
        self.v = np.zeros_like(self.k)
        self.length = 0  # rows filled; rows beyond it are scratch until a pass completes

    def reserve(self, n: int) -> None:
        need = self.length + n
        cap = self.k.shape[2]
        if need <= cap:
            return
        cap = max(need, 2 * cap, 16)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = np.zeros(old.shape[:2] + (cap, old.shape[3]), dtype=np.int16)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)


# ------------------------------------------------------------------ the model


class ExactStudentModel(LanguageModel):
    """An exact student loaded for inference (numpy; torch._int_mm for the products when present)."""

    def __init__(self, spec: str, meta: dict[str, Any], arrays: dict[str, np.ndarray], matmul: str = "auto"):
        if matmul not in MATMUL_BACKENDS:
            raise ConfigError(f"exact student: matmul backend {matmul!r} is not one of {MATMUL_BACKENDS}")
        self.config = ExactConfig(**meta["config"])
        c = self.config
        self.eps_q = int(meta["eps_q"])
        self.inv_sqrt_hd_q = int(meta["inv_sqrt_hd_q"])  # round(2**16 / sqrt(head dim))
        self.hd = c.d_model // c.n_head
        int_mm = None if matmul == "numpy" else _torch_int_mm()
        if matmul == "torch" and int_mm is None:
            raise ConfigError("exact student: matmul='torch' but this torch has no CPU torch._int_mm")
        self.matmul = "torch" if int_mm is not None else "numpy"
        a = arrays

        def lin(name: str) -> _Linear:
            return _Linear(a[name + ".q"], a[name + ".m"].astype(np.int64), a[name + ".e"].astype(np.int64), name, int_mm)

        self.embed_q = a["embed.q"]  # int8 [V, d]
        self.embed_m = a["embed.m"].astype(np.int64)
        self.embed_e = a["embed.e"].astype(np.int64)
        self.head = _Linear(self.embed_q, self.embed_m, self.embed_e, "head (tied embedding)", int_mm)
        self.blocks = []
        for i in range(c.n_layer):
            p = f"blocks.{i}."
            self.blocks.append(
                {
                    "norm1": a[p + "norm1.g"].astype(np.int64),
                    "qkv": lin(p + "qkv"),
                    "proj": lin(p + "proj"),
                    "norm2": a[p + "norm2.g"].astype(np.int64),
                    "gate_up": lin(p + "gate_up"),
                    "down": lin(p + "down"),
                }
            )
        self.norm = a["norm.g"].astype(np.int64)
        self.rope_cos = a["rope.cos"].astype(np.int64)
        self.rope_sin = a["rope.sin"].astype(np.int64)
        self.exp_table = a["exp"].astype(np.int64)
        self.silu_table = a["silu"].astype(np.int64)
        self._check()
        # Attention weights exp(-dist) >> ATT_SHIFT by distance, as exact float64 integers; the
        # last entry is 0: a key that far below the top (or masked) gets no weight.
        att = self.exp_table >> ATT_SHIFT
        att[-1] = 0
        self.att_table = att.astype(np.float64)
        fp = fingerprint(
            a, _tokenizer_digest(), {"kind": "exact-student", "format": FORMAT, "path": INFERENCE_PATH_VERSION, "meta": json.dumps(meta, sort_keys=True)}
        )
        self.info = ModelInfo(spec=spec, fingerprint=fp, vocab_size=c.vocab_size, eos_token_ids=(2,))
        self.stepper = Stepper(self)

    def _check(self) -> None:
        """Every bound the exactness rests on, checked once; ConfigError names the one that fails.
        Each bound is per row (per token, per query), so it holds for any batch of rows."""
        c = self.config
        for b in self.blocks:
            for name in ("qkv", "proj", "gate_up", "down"):
                b[name].check()
        self.head.check()
        # scores (q * inv) . k in float64: |q|, |k| <= 2**15 - 1 (clipped), hd terms.
        if I16 * self.inv_sqrt_hd_q * I16 * self.hd + (1 << SCORE_SHIFT) >= F64_EXACT:
            raise ConfigError(f"exact student: head dimension {self.hd} breaks the float64 bound of q.k")
        # p @ v: p <= 2**16, |v| <= 2**15 - 1, at most max_positions terms, float64.
        if (1 << 16) * I16 * c.max_positions >= F64_EXACT:
            raise ConfigError(f"exact student: {c.max_positions} positions break the float64 bound of p @ v")
        for g in [b["norm1"] for b in self.blocks] + [b["norm2"] for b in self.blocks] + [self.norm]:
            if int(np.abs(g).max()) >= 1 << 17:
                raise ConfigError("exact student: an RMSNorm gain is >= 32 (the product x * gain would overflow)")
        if self.rope_cos.shape != (c.max_positions, self.hd // 2) or self.rope_sin.shape != self.rope_cos.shape:
            raise ConfigError("exact student: RoPE tables do not match the config")
        if int(self.exp_table[0]) != 1 << EXP_BITS or self.silu_table.size != 2 * SILU_RANGE * (1 << SILU_STEP_BITS) + 1:
            raise ConfigError("exact student: exp / silu tables are malformed")
        if self.embed_q.shape != (c.vocab_size, c.d_model):
            raise ConfigError("exact student: embedding does not match the config")

    def new_cache(self) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, c.n_head, self.hd)

    def check_ids(self, ids: Sequence[int], start: int) -> None:
        """ValueError / ConfigError for ids that `forward` would refuse after `start` tokens."""
        if len(ids) and (min(ids) < 0 or max(ids) >= self.config.vocab_size):
            raise ValueError("token id outside the student's vocabulary")
        if start + len(ids) > self.config.max_positions:
            raise ConfigError(f"exact student: context of {start + len(ids)} tokens exceeds its {self.config.max_positions} positions")

    # -- the forward pass, row-wise: the same integers for any batch or split into steps
    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x [t, h, hd] at positions pos [t]: the half-split rotation from the stored tables."""
        h2 = self.hd // 2
        cos = self.rope_cos[pos][:, None, :]
        sin = self.rope_sin[pos][:, None, :]
        x1, x2 = x[..., :h2], x[..., h2:]
        out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # < 2**15 * 2**14 * 2
        return _clamp(_rshift_round(out, ROPE_BITS), I16)

    def _silu(self, g: np.ndarray) -> np.ndarray:
        """silu at FH bits: the table at step 2**-8 inside [-16, 16]; 0 below, identity above."""
        step = FH - SILU_STEP_BITS
        idx = _rshift_round(g, step)
        lim = SILU_RANGE << SILU_STEP_BITS
        val = self.silu_table[np.clip(idx, -lim, lim) + lim]
        return np.where(idx > lim, g, np.where(idx < -lim, 0, val))

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
        """One sequence: queries q [t, h, hd] (int64, FQ bits) at positions start.. over the int16
        keys and values k, v [h, s, hd] (key j at position j; s >= start + t); causal. Returns
        [t, h, hd] at FQ bits. Queries go in blocks of ATT_ENTRIES scores, each over the keys it
        can see, so memory grows with the context, not with its square.

        Every float64 value here is an integer below 2**53, so exact in any order (bounds checked
        at load): (q * inv) . k < 2**15 * 2**13 * 2**15 * 64 = 2**49; the rounding shift of a
        score, floor((x + 2**(S-1)) * 2**-S), is exact in float64; p <= 2**16; p @ v < 2**16 *
        2**15 * max_positions; sum p < 2**16 * max_positions."""
        t, h, hd = q.shape
        qs = (q * self.inv_sqrt_hd_q).transpose(1, 0, 2).astype(np.float64)  # [h, t, hd], |.| < 2**28
        block = max(1, ATT_ENTRIES // (h * (start + t)))
        y = np.empty((t, h, hd), dtype=np.int64)
        for lo in range(0, t, block):
            hi = min(t, lo + block)
            s = start + hi  # keys the block's last query sees
            kf = k[:, :s].astype(np.float64)  # [h, s, hd]
            sc = _round_scores(self._matmul64(qs[:, lo:hi], kf.transpose(0, 2, 1)))  # [h, b, s]
            if hi - lo > 1 or s != start + lo + 1:  # causal mask, where a key follows a query
                qpos = start + np.arange(lo, hi)
                sc[:, np.arange(s)[None, :] > qpos[:, None]] = -np.inf
            y[lo:hi] = self._weighted_mean(sc, v[:, :s].astype(np.float64)).transpose(1, 0, 2)  # [h, b, hd] -> [b, h, hd]
        return y

    def _weighted_mean(self, sc: np.ndarray, vf: np.ndarray) -> np.ndarray:
        """Rounded scores sc [..., b, s] (masked keys -inf; overwritten) and values vf [..., s, hd]
        -> round(sum p v / sum p) [..., b, hd], p = att_table[top - score] (masked: the last, 0)."""
        top = sc.max(axis=-1, keepdims=True)
        np.subtract(top, sc, out=sc)  # distance below the top; masked: +inf
        np.minimum(sc, self.att_table.size - 1, out=sc)
        p = self.att_table[sc.astype(np.intp)]  # <= 2**16
        num = self._matmul64(p, vf).astype(np.int64)
        den = p.sum(axis=-1, keepdims=True).astype(np.int64)  # >= 2**16
        return (2 * num + den) // (2 * den)

    def _attend_steps(self, q: np.ndarray, caches: Sequence[KVCache], li: int, starts: Sequence[int]) -> np.ndarray:
        """`_attend` for one new row per sequence (a decoding step), all sequences in one product:
        queries q [n, h, hd], sequence i's query at position starts[i] over its keys 0..starts[i].
        The keys and values are padded to the longest; a padded key is masked like a causal one
        (weight att_table[-1] = 0), so every score, weight and sum is `_attend`'s, bit for bit."""
        n, h, hd = q.shape
        lens = np.asarray(starts, dtype=np.int64) + 1
        s = int(lens.max())
        kf = np.zeros((n, h, s, hd), dtype=np.float64)
        vf = np.zeros((n, h, s, hd), dtype=np.float64)
        for i, (cache, ln) in enumerate(zip(caches, lens.tolist())):
            kf[i, :, :ln] = cache.k[li, :, :ln]
            vf[i, :, :ln] = cache.v[li, :, :ln]
        qs = (q * self.inv_sqrt_hd_q).astype(np.float64)[:, :, None, :]  # [n, h, 1, hd]
        sc = _round_scores(self._matmul64(qs, kf.transpose(0, 1, 3, 2)))  # [n, h, 1, s]
        if int(lens.min()) < s:
            sc += np.where(np.arange(s)[None, :] >= lens[:, None], -np.inf, 0.0)[:, None, None, :]  # every head
        return self._weighted_mean(sc, vf)[:, :, 0]  # [n, h, hd]

    def _matmul64(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Batched float64 product of integer-valued operands (exact: the callers' bounds); on the
        torch backend through torch, so it runs on the pass's one thread (numpy's BLAS has its own pool)."""
        if self.matmul == "torch":
            import torch

            return torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        return np.matmul(a, b)

    def forward(self, seqs: Sequence[tuple[Sequence[int], KVCache]]) -> list[Features]:
        """Final features (int8 codes and scales; `logits` turns them into logits) for several
        sequences at once: each is (new ids, its KV cache); the new rows follow the cache's rows,
        and the cache is extended. The matrix products run over every row of every sequence
        together; the result for each row does not depend on that."""
        c = self.config
        lens = [len(ids) for ids, _ in seqs]
        for (ids, cache) in seqs:
            self.check_ids([int(t) for t in ids], cache.length)
        ids = np.array([int(t) for s in seqs for t in s[0]], dtype=np.int64)
        if ids.size == 0:
            return [Features(np.zeros((0, c.d_model), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in seqs]
        starts = [cache.length for _, cache in seqs]
        pos = np.concatenate([np.arange(st, st + n) for st, n in zip(starts, lens)])
        bounds = np.cumsum([0] + lens)
        for (_, cache), n in zip(seqs, lens):
            cache.reserve(n)
        x = _rshift_round(self.embed_q[ids].astype(np.int64) * self.embed_m[ids, None], -(self.embed_e[ids, None] + FX))
        x = _clamp(x, XCLIP)
        h, hd, d = c.n_head, self.hd, c.d_model
        # A decoding step (one new row per sequence, the common pass) attends for several sequences
        # at once: groups of similar length whose padded keys fit STEP_KEYS float64 entries.
        steps = _step_groups(starts, h * hd) if len(seqs) > 1 and all(n == 1 for n in lens) else None
        for li, b in enumerate(self.blocks):
            a, am, ae = _norm_quant8(x, b["norm1"], self.eps_q)
            qkv = _clamp(b["qkv"](a, am, ae, FQ), I16).reshape(-1, 3, h, hd)
            q = self._rope(qkv[:, 0], pos)
            k = self._rope(qkv[:, 1], pos)
            v = qkv[:, 2]
            y = np.empty((ids.size, h, hd), dtype=np.int64)
            for si, ((_, cache), st) in enumerate(zip(seqs, starts)):
                lo, hi = bounds[si], bounds[si + 1]
                if lo == hi:
                    continue
                cache.k[li, :, st : st + hi - lo] = k[lo:hi].transpose(1, 0, 2)  # |k|, |v| <= 2**15 - 1
                cache.v[li, :, st : st + hi - lo] = v[lo:hi].transpose(1, 0, 2)
                if steps is None:
                    y[lo:hi] = self._attend(q[lo:hi], cache.k[li], cache.v[li], st)
            for grp in steps or ():  # a step: row i is sequence i's
                y[grp] = self._attend_steps(q[grp], [seqs[i][1] for i in grp], li, [starts[i] for i in grp])
            a, am, ae = _quant8(y.reshape(-1, d), FQ)
            x = _clamp(x + b["proj"](a, am, ae, FX), XCLIP)
            a, am, ae = _norm_quant8(x, b["norm2"], self.eps_q)
            gu = _clamp(b["gate_up"](a, am, ae, FH), HCLIP)
            g, u = gu[:, : c.d_ff], gu[:, c.d_ff :]
            hm = _rshift_round(self._silu(g) * u, FH)  # < 2**24 * 2**24: at FH bits
            a, am, ae = _quant8(hm, FH)
            x = _clamp(x + b["down"](a, am, ae, FX), XCLIP)
        for (_, cache), n in zip(seqs, lens):
            cache.length += n  # only now: a pass that raised left the caches as they were
        a, am, ae = _norm_quant8(x, self.norm, self.eps_q)
        return [Features(a[lo:hi], am[lo:hi], ae[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def logits(self, f: Features) -> np.ndarray:
        """Integer logits (int64 at FL bits) of features: the tied-embedding head."""
        return self.head(f.a, f.am, f.ae, FL)

    def tables(self, f: Features) -> np.ndarray:
        """uint32 tables [rows, vocab] of features, computed in blocks of rows."""
        out = np.empty((f.a.shape[0], self.config.vocab_size), dtype=np.uint32)
        for lo in range(0, f.a.shape[0], ROW_BLOCK):
            out[lo : lo + ROW_BLOCK] = self.table(self.logits(f[lo : lo + ROW_BLOCK]))
        return out

    def table(self, logits: np.ndarray) -> np.ndarray:
        """Rows of integer logits -> uint32 frequencies, each row summing to exactly 2**24, every entry >= 1."""
        lg = np.atleast_2d(logits)
        n = lg.shape[-1]
        dist = np.minimum(lg.max(axis=-1, keepdims=True) - lg, self.exp_table.size - 1)
        e = self.exp_table[dist]  # <= 2**30; the top entry is 2**30, so the row sum S >= 2**30
        free = (1 << FREQ_BITS) - n
        # f = 1 + e * free / S, the division as one reciprocal per row: R = floor(free * 2**34 / S)
        # <= 2**24 * 2**34 / 2**30 = 2**28, e * R < 2**58; rounding down keeps sum(f) <= 2**24.
        recip = (free << 34) // e.sum(axis=-1, keepdims=True)
        e *= recip
        e >>= 34
        e += 1
        top = np.argmax(lg, axis=-1)  # first maximum: ties go to the lowest id
        e[np.arange(e.shape[0]), top] += (1 << FREQ_BITS) - e.sum(axis=-1)
        return e.astype(np.uint32)

    def _pass(self, sessions: Sequence[ExactStudentSession]) -> list[tuple[ExactStudentSession, np.ndarray, np.ndarray]]:
        """One batched step over distinct sessions: each reads up to PREFILL_CHUNK of its waiting
        tokens (one forward pass for all); those that have read them all get their logits and
        table (one head product and one table computation for all of them), returned as
        (session, logits, table) for the caller to hand out."""
        parts = [(s, s._todo[:PREFILL_CHUNK]) for s in sessions]
        feats = self.forward([(ids, s.cache) for s, ids in parts])
        done: list[tuple[ExactStudentSession, Features]] = []
        for (s, ids), f in zip(parts, feats):
            del s._todo[: len(ids)]
            if not s._todo:
                done.append((s, f[len(ids) - 1 :]))
        out: list[tuple[ExactStudentSession, np.ndarray, np.ndarray]] = []
        if not done:
            return out
        last = Features(*(np.concatenate([getattr(f, n) for _, f in done]) for n in ("a", "am", "ae")))
        for lo in range(0, len(done), ROW_BLOCK):
            lg = self.logits(last[lo : lo + ROW_BLOCK])
            tab = self.table(lg)
            out += [(s, lg[i], tab[i]) for i, (s, _) in enumerate(done[lo : lo + ROW_BLOCK])]
        return out

    def _advance(self, sessions: Sequence[ExactStudentSession]) -> None:
        """`_pass` for a caller that owns every session (one thread): the tables go to them now."""
        for s, lg, tab in self._pass(list(dict.fromkeys(sessions))):
            s._logits, s._freqs = lg, tab

    # -- the LanguageModel interface
    def session(self, prefix_ids: Sequence[int]) -> ExactStudentSession:
        return ExactStudentSession(self, prefix_ids)

    def _teacher_forced(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], rows: Any, width: int, dtype: Any) -> list[np.ndarray]:
        """`rows(features)` before each token of every (prefix, tokens) pair: the sequences are
        read PREFILL_CHUNK tokens at a time, all pairs in one pass per chunk (memory linear in
        the length); row i of a pair's result is the one after prefix + tokens[:i]."""
        seqs = [[int(t) for t in p] + [int(t) for t in tok][:-1] for p, tok in pairs]
        for (p, _), seq in zip(pairs, seqs):
            if not len(p):
                raise ValueError("teacher-forced scoring needs at least one prefix token (the prompt or BOS)")
            self.check_ids(seq, 0)
        out = [np.empty((len(tok), width), dtype=dtype) for _, tok in pairs]
        caches = [self.new_cache() for _ in pairs]
        while True:
            live = [i for i, c in enumerate(caches) if c.length < len(seqs[i]) and len(pairs[i][1])]
            if not live:
                return out
            chunk = [(seqs[i][caches[i].length : caches[i].length + PREFILL_CHUNK], caches[i]) for i in live]
            starts = [caches[i].length for i in live]
            for i, st, f in zip(live, starts, self.forward(chunk)):
                first = max(0, len(pairs[i][0]) - 1 - st)  # rows before the prefix's last token give nothing
                if first < f.a.shape[0]:
                    got = rows(f[first:])
                    at = st + first - (len(pairs[i][0]) - 1)
                    out[i][at : at + got.shape[0]] = got

    def score_frequencies(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """Tables before each of token_ids in one teacher-forced pass; bit-identical to the session's."""
        return self.score_frequencies_many([(prefix_ids, token_ids)])[0]

    def score_frequencies_many(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[np.ndarray]:
        """score_frequencies for several (prefix, tokens) pairs in one batch."""
        return self._teacher_forced(pairs, self.tables, self.config.vocab_size, np.uint32)

    def score_logits(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """Integer logits (as exact float32 values at FL bits) before each of token_ids."""
        lg = self._teacher_forced([(prefix_ids, token_ids)], self.logits, self.config.vocab_size, np.int64)[0]
        return (lg / (1 << FL)).astype(np.float32)

    def score(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """Logits in one pass: bit-identical to the incremental path (the arithmetic is exact)."""
        return self.score_logits(prefix_ids, token_ids)

    def score_fast(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        return self.score_logits(prefix_ids, token_ids)


class Stepper:
    """Batches the table requests of many threads: one forward pass for every session waiting.

    A thread that needs a session's table waits in `run`; whichever waiting thread finds no pass
    running leads the next one, over every session waiting at that moment ("group commit"), and
    the others wake with their tables. Threads that code for a stream declare it with `active()`:
    a pass then waits until every active thread is waiting (or has left), so one pass serves
    them all; a thread outside `active()` counts only while it waits. A stalled active thread
    delays a pass by at most GATHER_S. A long prompt is read PREFILL_CHUNK tokens per pass, so
    the streams decoding beside it keep getting tables between its chunks (chunked prefill).
    A pass wakes only the threads it served (and one to lead the next pass, if it is ready);
    of those, CODING_SLOTS code at once until their next request, the others wait for a slot.

    Batching never changes a table: every product is exact row by row (ExactStudentModel._check)."""

    def __init__(self, model: ExactStudentModel):
        self._model = model
        self._lock = threading.Lock()
        self._waiting: list[ExactStudentSession] = []
        self._wake: dict[ExactStudentSession, threading.Condition] = {}  # each waiting session's thread
        self._active = 0
        self._leading = False
        self._local = threading.local()
        self._slots = threading.BoundedSemaphore(CODING_SLOTS)
        self.passes = 0  # forward passes run, and the rows they computed (for benchmarks)
        self.rows = 0

    @contextmanager
    def active(self) -> Iterator[None]:
        """The calling thread is coding a stream: a pass waits for its request (or its exit)."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        if depth == 0:  # a thread counts once, however deep its regions nest
            with self._lock:
                self._active += 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                self._free_slot()
                with self._lock:
                    self._active -= 1
                    self._wake_leader()

    def _free_slot(self) -> None:
        if getattr(self._local, "slot", False):
            self._local.slot = False
            self._slots.release()

    def _wake_leader(self) -> None:
        """(Lock held.) If the next pass is ready and none runs, wake one waiting thread to lead it."""
        if not self._leading and self._waiting and len(self._waiting) >= self._active:
            for s in self._waiting:  # the first whose thread still waits (all do, barring an exception)
                w = self._wake.get(s)
                if w is not None:
                    w.notify()
                    return

    def run(self, sess: ExactStudentSession) -> None:
        """Return once `sess` has its logits and table for every token fed to it."""
        implicit = getattr(self._local, "depth", 0) == 0
        self._free_slot()
        cond = getattr(self._local, "cond", None)
        if cond is None:
            cond = self._local.cond = threading.Condition(self._lock)
        with self._lock:
            if implicit:
                self._active += 1
            self._waiting.append(sess)
            self._wake[sess] = cond
            # No wake-up here: if this request makes the pass ready, this thread leads it below.
            # A pass wakes only the threads it served, and one thread to lead the next pass.
            since = time.monotonic()
            try:
                while sess._freqs is None and sess._error is None:
                    ready = len(self._waiting) >= self._active or time.monotonic() - since >= GATHER_S
                    if self._leading or not ready:
                        cond.wait(GATHER_S)
                        continue
                    self._lead()
            finally:
                self._wake.pop(sess, None)
                if implicit:  # one fewer to wait for: a waiting thread may now lead
                    self._active -= 1
                    self._wake_leader()
            err, sess._error = sess._error, None
        if not implicit:
            self._slots.acquire()
            self._local.slot = True
        if err is not None:
            raise err

    def _lead(self) -> None:
        """Run one pass over the waiting sessions (called and returning with the lock held)."""
        self._leading = True
        # Each session once (a session is waited for by one thread, at most once at a time: run()
        # returns only after the tables are handed out below, under the lock).
        batch = list(dict.fromkeys(self._waiting))
        err: BaseException | None = None
        results: list[tuple[ExactStudentSession, np.ndarray, np.ndarray]] = []
        self._lock.release()
        try:
            if self._model.matmul == "torch" and not getattr(self._local, "one_thread", False):
                _one_thread_here()
                self._local.one_thread = True
            results = self._model._pass(batch)
        except BaseException as exc:  # every session of the pass hears of it, not just the leader
            err = exc
        finally:
            self._lock.acquire()
            # Handed out only now, under the lock: a waiting thread cannot see its table (and
            # feed its session again) while the pass still works on that session.
            for s, lg, tab in results:
                s._logits, s._freqs = lg, tab
            self._leading = False
            self.passes += 1
            self.rows += len(batch)
            for s in batch:
                if err is not None:
                    s._error = err
                w = self._wake.get(s)
                if w is not None:
                    w.notify()
            self._waiting = [s for s in self._waiting if s._freqs is None and s._error is None]
            self._wake_leader()


class ExactStudentSession(Session):
    """Incremental decoding over an integer KV cache. Lazy: `feed` records tokens; the model
    reads them when a table or logits are asked for, in a pass shared with every other session
    asking at that moment (ExactStudentModel.stepper)."""

    def __init__(self, model: ExactStudentModel, prefix_ids: Sequence[int]):
        if len(prefix_ids) == 0:
            raise ValueError("a session needs at least one prefix token (the prompt or BOS)")
        self._m = model
        self.cache = model.new_cache()
        self._todo: list[int] = []  # fed, not yet read
        self._logits: np.ndarray | None = None
        self._freqs: np.ndarray | None = None
        self._error: BaseException | None = None
        self.feed_many(prefix_ids)

    def feed_many(self, token_ids: Sequence[int]) -> None:
        """Record tokens (checked now, read with the next table)."""
        ids = [int(t) for t in token_ids]
        if not ids:
            return
        self._m.check_ids(ids, self.length)
        self._todo += ids
        self._logits = self._freqs = None

    def feed(self, token_id: int) -> None:
        self.feed_many([token_id])

    def _ready(self) -> None:
        if self._freqs is None:
            self._m.stepper.run(self)

    def int_logits(self) -> np.ndarray:
        self._ready()
        assert self._logits is not None
        return self._logits

    def logits(self) -> np.ndarray:
        """The integer logits as float32 (exact: |logit| * 2**FL < 2**24 in practice; a power-of-two division)."""
        # One rounding either way: int64 -> float32 (via an exact float64), then an exact scaling.
        return self.int_logits().astype(np.float32) * np.float32(2.0**-FL)

    def frequencies(self) -> np.ndarray:
        self._ready()
        assert self._freqs is not None
        return self._freqs

    @property
    def length(self) -> int:
        return self.cache.length + len(self._todo)


def stepper_of(model: Any) -> Stepper | None:
    """The stepper that batches `model`'s tables: its own, or that of the exact student a
    wrapper (the match model's `inner`) runs on; None for other models."""
    seen = 0
    while model is not None and seen < 8:
        st = getattr(model, "stepper", None)
        if isinstance(st, Stepper):
            return st
        model, seen = getattr(model, "inner", None), seen + 1
    return None


# ------------------------------------------------------------------ quantisation (float student -> exact)


def _scale_pairs(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive float64 scales as (mantissa in [2**23, 2**24), exponent): s ~ m * 2**e."""
    mant, ex = np.frexp(np.asarray(s, dtype=np.float64))  # s = mant * 2**ex, mant in [0.5, 1)
    m = np.round(mant * (1 << 24)).astype(np.int64)
    return m, (ex - 24).astype(np.int64)


def _quant_weight(w: np.ndarray) -> dict[str, np.ndarray]:
    s = np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0
    q = np.clip(np.round(w / s[:, None]), -127, 127).astype(np.int8)
    m, e = _scale_pairs(s)
    return {"q": q, "m": m.astype(np.int32), "e": e.astype(np.int16)}


def quantize_student(float_path: str | Path, out: str | Path, max_positions: int = MAX_POSITIONS) -> dict[str, Any]:
    """Post-training quantisation of a float student .npz into an exact student .npz; its meta."""
    from exfilguard.models.student import FORMAT as FLOAT_FORMAT

    meta, arrays = read_model_npz(float_path, "student", FLOAT_FORMAT)
    cfg = meta["config"]
    d, nh = int(cfg["d_model"]), int(cfg["n_head"])
    hd = d // nh
    w = {k: v.astype(np.float64) for k, v in arrays.items()}
    outa: dict[str, np.ndarray] = {}
    for k, v in _quant_weight(w["embed.weight"]).items():
        outa[f"embed.{k}"] = v

    def gain(g: np.ndarray) -> np.ndarray:
        return np.round(g * (1 << GQ)).astype(np.int32)

    for i in range(int(cfg["n_layer"])):
        p = f"blocks.{i}."
        for name in ("qkv", "proj", "gate_up", "down"):
            for k, v in _quant_weight(w[p + name + ".weight"]).items():
                outa[f"{p}{name}.{k}"] = v
        outa[p + "norm1.g"] = gain(w[p + "norm1.weight"])
        outa[p + "norm2.g"] = gain(w[p + "norm2.weight"])
    outa["norm.g"] = gain(w["norm.weight"])
    # Tables, computed here once in float64 and stored: never recomputed from libm at run time.
    theta = float(cfg["rope_theta"])
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.arange(max_positions, dtype=np.float64)[:, None] * inv[None, :]
    outa["rope.cos"] = np.round(np.cos(ang) * (1 << ROPE_BITS)).astype(np.int16)
    outa["rope.sin"] = np.round(np.sin(ang) * (1 << ROPE_BITS)).astype(np.int16)
    n_exp = 24 << FL  # exp(-24) * 2**30 < 0.05: beyond it the weight is 0
    outa["exp"] = np.round(np.exp(-np.arange(n_exp, dtype=np.float64) / (1 << FL)) * (1 << EXP_BITS)).astype(np.int64)
    lim = SILU_RANGE << SILU_STEP_BITS
    g = np.arange(-lim, lim + 1, dtype=np.float64) / (1 << SILU_STEP_BITS)
    outa["silu"] = np.round(g / (1.0 + np.exp(-g)) * (1 << FH)).astype(np.int32)
    new_meta = {
        "format": FORMAT,
        "config": asdict(ExactConfig(int(cfg["vocab_size"]), d, int(cfg["n_layer"]), nh, int(cfg["d_ff"]), max_positions)),
        "eps_q": int(round(float(cfg["eps"]) * (1 << (2 * FX)))),
        "inv_sqrt_hd_q": int(round((1 << 16) / math.sqrt(hd))),
        "source": {"path": Path(float_path).name, "sha256": hashlib.sha256(Path(float_path).read_bytes()).hexdigest()},
    }
    outa["meta"] = np.frombuffer(json.dumps(new_meta, sort_keys=True).encode(), dtype=np.uint8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:
        np.savez(fh, **outa)
    return new_meta


def load_exact_student(path: str | Path, spec: str | None = None, matmul: str = "auto") -> ExactStudentModel:
    """Load an exact student written by quantize_student; ConfigError if a bound is violated.
    matmul: "torch" (torch._int_mm), "numpy" (float32 BLAS) or "auto" (torch when it has the
    kernel); the tables are the same integers either way."""
    meta, arrays = read_model_npz(path, "exact student", FORMAT)
    try:
        return ExactStudentModel(spec or f"exact:{path}", meta, arrays, matmul)
    except KeyError as exc:
        raise ConfigError(f"{path}: exact student file lacks the array {exc}") from exc


def _tokenizer_digest() -> bytes:
    from exfilguard.models.hf import TOKENIZER_DIR

    return hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).digest()


def _loader(path: str, options: Any) -> LanguageModel:
    return load_exact_student(path, f"exact:{path}")


def _default_loader(path: str, options: Any) -> LanguageModel:
    """`default`: the exact version of the shipped student, mixed with the match model."""
    if not DEFAULT_EXACT_STUDENT.is_file():
        raise ConfigError(
            f"the default exact student is missing ({DEFAULT_EXACT_STUDENT}); remake it with the command in docs/distill.md"
        )
    from exfilguard.models.match import MatchModel

    return MatchModel(load_exact_student(DEFAULT_EXACT_STUDENT, f"exact:{DEFAULT_EXACT_STUDENT}"), spec="default")
