"""Hugging Face transformers backend (also loads GGUF files through transformers + gguf)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exfilguard.models.base import LanguageModel, ModelInfo, Session
from exfilguard.models.fingerprint import fingerprint, tokenizer_digest

# Bumped when the incremental inference path changes in a way that can change bits.
INFERENCE_PATH_VERSION = "hf-incremental-v1"

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "data" / "smollm2-tokenizer"


def load_tokenizer(path: str | os.PathLike[str] | None = None, gguf_file: str | None = None) -> Any:
    """The SmolLM2 tokenizer shipped with exfilguard, or one from a model folder / GGUF file."""
    from transformers import AutoTokenizer

    if path is None:
        return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(str(path))


@dataclass
class HFOptions:
    """How to run a transformers model. dtype and device are part of what decides the bits."""

    device: str = "cpu"
    dtype: str = "float32"


class HFSession(Session):
    """Incremental decoding with a KV cache: one forward pass of one token per step."""

    def __init__(self, model: "TransformersModel", prefix_ids: Sequence[int]):
        import torch

        self._m = model
        self._torch = torch
        self._past: Any = None
        self._len = 0
        self._logits: np.ndarray | None = None
        if len(prefix_ids) == 0:
            raise ValueError("a session needs at least one prefix token (the prompt or BOS)")
        self._run(list(prefix_ids))

    def _run(self, ids: list[int]) -> None:
        torch = self._torch
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self._m.device)
            out = self._m.model(input_ids=x, past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        self._len += len(ids)
        self._logits = out.logits[0, -1].float().cpu().numpy()

    def logits(self) -> np.ndarray:
        assert self._logits is not None
        return self._logits

    def feed(self, token_id: int) -> None:
        self._run([int(token_id)])

    @property
    def length(self) -> int:
        return self._len


class TransformersModel(LanguageModel):
    """A causal LM loaded with transformers, run in float32 by default."""

    def __init__(self, spec: str, model: Any, tokenizer: Any, options: HFOptions):
        import torch

        self.spec = spec
        self.model = model.to(options.device).eval()
        self.tokenizer = tokenizer
        self.options = options
        self.device = torch.device(options.device)
        arrays = {k: v.detach().float().cpu().numpy() for k, v in self.model.state_dict().items()}
        tok = tokenizer_digest(tokenizer.get_vocab(), tokenizer.all_special_ids)
        fp = fingerprint(
            arrays,
            tok,
            {"dtype": options.dtype, "path": INFERENCE_PATH_VERSION},
        )
        eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
        vocab = int(model.config.vocab_size)
        self.info = ModelInfo(spec=spec, fingerprint=fp, vocab_size=vocab, eos_token_ids=tuple(sorted(eos)))

    def session(self, prefix_ids: Sequence[int]) -> HFSession:
        return HFSession(self, prefix_ids)

    def score_fast(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """One teacher-forced pass; close to, not bit-identical with, the incremental path."""
        import torch

        ids = list(prefix_ids) + list(token_ids)
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=x).logits[0]
        p = len(prefix_ids)
        return logits[p - 1 : p - 1 + len(token_ids)].float().cpu().numpy()


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_hf(spec: str, path: str, gguf_file: str | None, options: HFOptions) -> TransformersModel:
    """Load a transformers causal LM from a folder (or a GGUF file inside it) on disk."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(options.dtype)}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = load_tokenizer(path, gguf_file)
    return TransformersModel(spec, model, tokenizer, options)


def tiny_random(options: HFOptions, seed: int = 0) -> TransformersModel:
    """A deterministic random-init 2-layer Llama with SmolLM2's tokenizer, for fast tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            # Drawn from our own generator so the weights do not depend on torch's init code.
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.fill_(1.0)
    return TransformersModel("tiny-random", model.to(_torch_dtype(options.dtype)), tokenizer, options)
