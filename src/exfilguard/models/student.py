"""The student: a small Llama-style decoder over SmolLM2's tokenizer, in plain torch.

nanoGPT in spirit: a config dataclass, four small modules, one file format. It is trained by
`exfilguard distill --kind student` to imitate the strong model and runs on CPU as the weak model
both sides of the cap evaluate token by token (KV-cached incremental path, float32).

File format (`.npz`, uncompressed): `meta` (JSON: format, config) and one float16 array per
parameter. Weights are stored in float16 and run in float32; the fingerprint covers the stored
arrays, the tokenizer and the inference-path version.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exfilguard.errors import ConfigError
from exfilguard.models.base import LanguageModel, ModelInfo, Session
from exfilguard.models.fingerprint import fingerprint
from exfilguard.models.npzfile import read_model_npz

FORMAT = "exfilguard-student-v1"
# Bumped when the incremental inference code changes in a way that can change bits.
INFERENCE_PATH_VERSION = "student-incremental-v1"
DEFAULT_STUDENT = Path(__file__).resolve().parent.parent / "data" / "default_student" / "student.npz"


@dataclass(frozen=True)
class StudentConfig:
    """Shape of a student. `vocab_size` must be the strong model's (SmolLM2: 49152)."""

    vocab_size: int = 49152
    d_model: int = 256
    n_layer: int = 6
    n_head: int = 4
    d_ff: int = 768
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @classmethod
    def preset(cls, size: str) -> StudentConfig:
        """Named sizes: `small` (CPU-trainable, ~7M params), `medium` (the shipped default)."""
        presets = {
            "tiny": cls(d_model=32, n_layer=1, n_head=2, d_ff=64),
            "small": cls(d_model=128, n_layer=2, n_head=2, d_ff=384),
            "medium": cls(d_model=256, n_layer=6, n_head=4, d_ff=768),
        }
        if size not in presets:
            raise ConfigError(f"unknown student size {size!r}; expected one of: {', '.join(presets)}")
        return presets[size]


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half-split layout) of x [b, h, t, hd] at positions pos [t]."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = pos.to(torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.c = c
        self.norm1 = RMSNorm(c.d_model, c.eps)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.norm2 = RMSNorm(c.d_model, c.eps)
        self.gate_up = nn.Linear(c.d_model, 2 * c.d_ff, bias=False)
        self.down = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, cache: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        b, t, d = x.shape
        h = self.c.n_head
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, pos, self.c.rope_theta), _rope(k, pos, self.c.rope_theta)
        if cache is not None:  # incremental: [k, v] of the tokens before, extended in place
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        causal = t > 1
        if causal and k.shape[2] != t:
            raise ValueError("feeding several tokens to a non-empty cache is not supported")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        g, u = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class Student(nn.Module):
    """Token embedding (tied with the output layer), n_layer blocks, a final RMSNorm."""

    def __init__(self, c: StudentConfig):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d_model, c.eps)

    def init_weights(self, generator: torch.Generator) -> None:
        """Deterministic init from `generator` (GPT-2 style scaled residual projections)."""
        with torch.no_grad():
            for name, p in sorted(self.named_parameters()):
                if p.dim() == 1:
                    p.fill_(1.0)
                    continue
                std = 0.02
                if name.endswith(("proj.weight", "down.weight")):
                    std = 0.02 / math.sqrt(2 * self.config.n_layer)
                p.copy_(torch.randn(p.shape, generator=generator) * std)

    def features(
        self, ids: torch.Tensor, start: int = 0, caches: list[list[torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Final hidden states [b, t, d] for ids [b, t] placed at position `start`."""
        x = self.embed(ids)
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, pos, None if caches is None else caches[i])
        return self.norm(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from hidden states (the output layer is the tied embedding)."""
        return h @ self.embed.weight.T

    def forward(
        self,
        ids: torch.Tensor,
        start: int = 0,
        caches: list[list[torch.Tensor]] | None = None,
        positions: slice | None = None,
    ) -> torch.Tensor:
        """Logits [b, t, vocab] (or only at `positions`) for ids [b, t] placed at `start`."""
        x = self.features(ids, start, caches)
        if positions is not None:
            x = x[:, positions]
        return self.head(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def save_student(model: Student, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write float16 weights and the config to one .npz file."""
    meta = {"format": FORMAT, "config": asdict(model.config), **(extra or {})}
    arrays = {k: v.detach().to("cpu", torch.float16).numpy() for k, v in model.state_dict().items()}
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


class StudentSession(Session):
    """Incremental decoding: one float32 forward pass of one token per step, KV-cached."""

    def __init__(self, model: StudentModel, prefix_ids: Sequence[int]):
        if len(prefix_ids) == 0:
            raise ValueError("a session needs at least one prefix token (the prompt or BOS)")
        self._m = model
        self._caches: list[list[torch.Tensor]] = [[] for _ in model.net.blocks]
        self._len = 0
        self._logits: np.ndarray | None = None
        for t in prefix_ids:  # one token at a time: the same path the decoder takes
            self.feed(int(t))

    def feed(self, token_id: int) -> None:
        with torch.inference_mode():
            x = torch.tensor([[int(token_id)]], dtype=torch.long, device=self._m.device)
            out = self._m.net(x, self._len, self._caches)
        self._len += 1
        self._logits = out[0, -1].float().cpu().numpy()

    def logits(self) -> np.ndarray:
        assert self._logits is not None
        return self._logits

    @property
    def length(self) -> int:
        return self._len


class StudentModel(LanguageModel):
    """A trained student loaded for inference (float32, eval mode)."""

    def __init__(self, spec: str, net: Student, digest_arrays: dict[str, np.ndarray], device: str = "cpu"):
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        fp = fingerprint(
            digest_arrays,
            _tokenizer_digest(),
            {"kind": "student", "format": FORMAT, "dtype": "float32", "path": INFERENCE_PATH_VERSION},
        )
        self.info = ModelInfo(spec=spec, fingerprint=fp, vocab_size=net.config.vocab_size, eos_token_ids=(2,))

    def session(self, prefix_ids: Sequence[int]) -> StudentSession:
        return StudentSession(self, prefix_ids)

    def score_fast(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """One teacher-forced pass; close to, not bit-identical with, the incremental path."""
        ids = list(prefix_ids) + list(token_ids)
        p = len(prefix_ids)
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            logits = self.net(x, positions=slice(p - 1, p - 1 + len(token_ids)))[0]
        return logits.float().cpu().numpy()


def load_student(path: str | Path, spec: str | None = None, device: str = "cpu") -> StudentModel:
    """Load a student written by save_student (exfilguard distill --kind student)."""
    meta, arrays = read_model_npz(path, "student", FORMAT)
    net = Student(StudentConfig(**meta["config"]))
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}
    missing = set(net.state_dict()) ^ set(state)
    if missing:
        raise ConfigError(f"{path}: weights do not match the config ({sorted(missing)[:3]} ...)")
    net.load_state_dict(state)
    return StudentModel(spec or f"student:{path}", net, arrays, device)


def _tokenizer_digest() -> bytes:
    from exfilguard.models.hf import TOKENIZER_DIR

    return hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).digest()


def _loader(path: str, options: Any) -> LanguageModel:
    return load_student(path, f"student:{path}", getattr(options, "device", "cpu"))


def _default_float_loader(path: str, options: Any) -> LanguageModel:
    """`default-float`: the shipped float student mixed with the match model (for measurement;
    `default` is its exact version, models/exact_student.py)."""
    if not DEFAULT_STUDENT.is_file():
        raise ConfigError(
            f"the default student is missing ({DEFAULT_STUDENT}); remake it with the command in docs/distill.md"
        )
    from exfilguard.models.match import MatchModel

    inner = load_student(DEFAULT_STUDENT, f"student:{DEFAULT_STUDENT}", getattr(options, "device", "cpu"))
    return MatchModel(inner, spec="default-float")
