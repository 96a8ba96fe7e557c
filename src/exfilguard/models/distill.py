"""Distillation: make weak models (n-gram, student) that imitate the strong model.

    corpus rows (prompt_ids, token_ids)  --[--generate N: more strong-model samples]-->
    ngram: integer KN counts (seconds)   |   student: CE on generated tokens + KL to the
                                             strong model's logits when it is at hand

The prompt is always context; loss is taken on generated tokens only (the weak model never codes
a prompt). Training is deterministic given the seed on CPU (batch order and init come from
seeded generators) and resumable: a checkpoint beside the output is picked up by the next run.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exfilguard.errors import ConfigError

TEMPERATURES = (0.0, 0.7, 1.0)


@dataclass(frozen=True)
class Row:
    """One strong-model generation: chat-templated prompt ids and the generated ids."""

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    temperature: float = 1.0


def read_corpus(paths: Sequence[str | Path], limit: int | None = None) -> list[Row]:
    """Rows from JSON-lines files (optionally .gz) with prompt_ids and token_ids fields."""
    rows: list[Row] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"corpus file {p} does not exist")
        opener: Callable[..., Any] = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    rows.append(Row(tuple(d["prompt_ids"]), tuple(d["token_ids"]), float(d.get("temperature", 1.0))))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConfigError(f"{p}:{n}: not a corpus row with prompt_ids and token_ids ({exc})") from exc
                if limit is not None and len(rows) >= limit:
                    return rows
    return rows


def first_per_temperature(rows: Sequence[Row], n: int) -> list[Row]:
    """The first n rows of each temperature, in order (all rows when n is 0)."""
    seen: dict[float, int] = {}
    out = []
    for r in rows:
        seen[r.temperature] = seen.get(r.temperature, 0) + 1
        if not n or seen[r.temperature] <= n:
            out.append(r)
    return out


def write_corpus(rows: Iterable[Row], path: str | Path) -> None:
    opener: Callable[..., Any] = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"prompt_ids": list(r.prompt_ids), "token_ids": list(r.token_ids), "temperature": r.temperature}) + "\n")


# --------------------------------------------------------------------------------------------
# Strong-model generation (--generate N)


def generate_rows(
    strong: Any,
    prompts: Sequence[tuple[int, ...]],
    n: int,
    *,
    seed: int = 0,
    temperatures: Sequence[float] = (0.7, 1.0),
    max_new_tokens: int = 288,
    batch_size: int = 64,
    progress: bool = True,
) -> list[Row]:
    """Sample `n` more generations from the strong model (a TransformersModel), cycling through
    the distinct prompts and temperatures; one seeded generator drives all sampling."""
    import torch
    from tqdm import tqdm

    if not prompts:
        raise ConfigError("--generate needs prompts: the corpus has none")
    model, device = strong.model, strong.device
    eos = strong.info.eos_token_ids[0] if strong.info.eos_token_ids else 2
    rng = np.random.default_rng(seed)
    jobs = [(prompts[int(rng.integers(len(prompts)))], temperatures[i % len(temperatures)]) for i in range(n)]
    rows: list[Row] = []
    torch.manual_seed(seed)
    bar = tqdm(total=n, desc="generate", unit="gen", disable=not progress)
    for temp in sorted(set(t for _, t in jobs)):
        todo = sorted((p for p, t in jobs if t == temp), key=len)
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), eos, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, p in enumerate(batch):  # left padding: generation continues at the right edge
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            kwargs: dict[str, Any] = {"do_sample": False} if temp == 0 else {"do_sample": True, "temperature": temp, "top_k": 0, "top_p": 1.0}
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    pad_token_id=eos, eos_token_id=eos, **kwargs,
                )
            for j, p in enumerate(batch):
                gen = out[j, width:].tolist()
                if eos in gen:
                    gen = gen[: gen.index(eos) + 1]
                rows.append(Row(tuple(p), tuple(gen), temp))
            bar.update(len(batch))
    bar.close()
    return rows


# --------------------------------------------------------------------------------------------
# Student training


@dataclass
class TrainConfig:
    """How to train a student. Everything that changes the result is here (and the corpus)."""

    size: str = "medium"
    steps: int = 2000
    batch_size: int = 32
    max_len: int = 384
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    kl_weight: float = 0.7  # loss = kl_weight * KL(teacher || student) + (1 - kl_weight) * CE
    kl_temperature: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    config_override: dict[str, Any] = field(default_factory=dict)


def _examples(rows: Sequence[Row], max_len: int) -> list[tuple[np.ndarray, int]]:
    out = []
    for r in rows:
        ids = np.asarray(r.prompt_ids + r.token_ids, dtype=np.int64)[:max_len]
        if len(ids) > len(r.prompt_ids) and len(r.prompt_ids) > 0:
            out.append((ids, len(r.prompt_ids)))
    return out


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The examples of a step: a fresh seeded permutation each epoch, so resume is exact."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size : (k + 1) * batch_size]


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _pca_embedding(teacher_embed: Any, d: int, seed: int) -> Any:
    """Initial student embeddings: the teacher's embeddings projected on their top-d principal
    axes, scaled to std 0.02, so rare tokens start with meaningful neighbours."""
    import torch

    e = teacher_embed.detach().float()
    e = e - e.mean(0, keepdim=True)
    torch.manual_seed(seed)
    _, _, v = torch.pca_lowrank(e, q=d, center=False, niter=4)
    proj = e @ v[:, :d]
    return (proj / proj.std() * 0.02).cpu()


def train_student(
    rows: Sequence[Row],
    out: str | Path,
    cfg: TrainConfig,
    *,
    teacher: Any = None,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train a student on `rows` (KL to `teacher`'s logits when given) and save it to `out`.

    A checkpoint `out`.ckpt is written every cfg.checkpoint_every steps and resumed from when
    present and made with the same config; it is removed when training completes. `stop_after`
    ends this run after that many steps, leaving the checkpoint (time-boxed runs)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from exfilguard.models.student import Student, StudentConfig, save_student

    out = Path(out)
    ckpt_path = out.with_name(out.name + ".ckpt")
    mcfg = StudentConfig(**{**asdict(StudentConfig.preset(cfg.size)), **cfg.config_override})
    examples = _examples(rows, cfg.max_len)
    if not examples:
        raise ConfigError("the corpus has no generated tokens to train on")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator().manual_seed(cfg.seed)
    net = Student(mcfg)
    net.init_weights(gen)
    if teacher is not None:
        emb = teacher.model.get_input_embeddings().weight
        if emb.shape[0] == mcfg.vocab_size:
            with torch.no_grad():
                net.embed.weight.copy_(_pca_embedding(emb, mcfg.d_model, cfg.seed))
    net.to(dev)
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    fingerprint = json.dumps({"train": asdict(cfg), "model": asdict(mcfg), "n": len(examples), "teacher": teacher is not None}, sort_keys=True)
    start = 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if state.get("fingerprint") == fingerprint:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start = int(state["step"])
            log(f"resuming from {ckpt_path} at step {start}")
        else:
            log(f"ignoring {ckpt_path}: made with another config or corpus")
    use_amp = dev.type == "cuda"
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="distill", unit="step", disable=not progress)
    for step in bar:
        if stop_after is not None and step - start >= stop_after:
            bar.close()
            _save_checkpoint(ckpt_path, fingerprint, net, opt, step)
            log(f"stopped at step {step}; run again to resume from {ckpt_path}")
            return {"params": net.num_params(), "steps": step, "seconds": time.time() - t0, "losses": losses, "done": False}
        idx = _batch_indices(len(examples), cfg.batch_size, step, cfg.seed)
        batch = [examples[i] for i in idx]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)  # position j predicts j+1
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (x, n_prompt) in enumerate(batch):
            ids[j, : len(x)] = torch.from_numpy(x)
            attn[j, : len(x)] = 1
            mask[j, n_prompt - 1 : len(x) - 1] = True
        ids, mask, attn = ids.to(dev), mask.to(dev), attn.to(dev)
        targets = ids[:, 1:][mask[:, :-1]]
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = net.head(net.features(ids)[mask]).float()
            loss = F.cross_entropy(logits, targets)
            if teacher is not None and cfg.kl_weight > 0:
                with torch.no_grad():
                    t_logits = teacher.model(input_ids=ids, attention_mask=attn).logits[mask].float()
                    t_logp = F.log_softmax(t_logits / cfg.kl_temperature, dim=-1)
                kl = F.kl_div(F.log_softmax(logits, dim=-1), t_logp, log_target=True, reduction="batchmean")
                loss = cfg.kl_weight * kl + (1 - cfg.kl_weight) * loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(ckpt_path, fingerprint, net, opt, step + 1)
    bar.close()
    save_student(net, out, {"train": asdict(cfg), "examples": len(examples), "teacher": teacher is not None})
    if ckpt_path.is_file():
        ckpt_path.unlink()
    return {"params": net.num_params(), "steps": cfg.steps, "seconds": time.time() - t0, "losses": losses, "done": True}


def _save_checkpoint(path: Path, fingerprint: str, net: Any, opt: Any, step: int) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save({"fingerprint": fingerprint, "model": net.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


# --------------------------------------------------------------------------------------------
# Evaluation: ideal bits per generated token, teacher-forced


def ideal_bits(model: Any, rows: Sequence[Row], progress: bool = False) -> tuple[float, int]:
    """Total -log2 q(token) over the generated tokens of `rows`, and the token count.

    Models with exact frequencies (the n-gram, the exact student) are scored on them (what the codec codes);
    the others on a batched teacher-forced pass (score_fast), close to the incremental path."""
    from tqdm import tqdm

    bits, n = 0.0, 0
    for r in tqdm(rows, desc=model.info.spec, unit="gen", disable=not progress):
        if not r.token_ids:
            continue
        f = model.score_frequencies(r.prompt_ids, r.token_ids)
        s = model.session(r.prompt_ids) if f is None and hasattr(model, "order") else None
        if f is not None:  # exact integer tables in one batched pass (the exact student)
            picked = f[np.arange(len(r.token_ids)), np.asarray(r.token_ids)].astype(np.float64)
            bits += float((math.log2(1 << 24) - np.log2(picked)).sum())
        elif s is not None:
            for t in r.token_ids:
                f = s.frequencies()
                bits += math.log2(int(f.sum())) - math.log2(int(f[t]))
                s.feed(t)
        else:
            import torch

            lg = torch.from_numpy(model.score_fast(r.prompt_ids, r.token_ids)).double()
            logp = torch.log_softmax(lg, dim=-1)[torch.arange(len(r.token_ids)), torch.tensor(r.token_ids)]
            bits -= float(logp.sum()) / math.log(2)
        n += len(r.token_ids)
    return bits, n


def evaluate(models: Sequence[Any], rows: Sequence[Row], temperatures: Sequence[float] = TEMPERATURES, progress: bool = False) -> dict[str, dict[float, float]]:
    """Bits per generated token for each model and temperature: {spec: {T: bits/token}}."""
    table: dict[str, dict[float, float]] = {}
    for m in models:
        table[m.info.spec] = {}
        for temp in temperatures:
            sel = [r for r in rows if abs(r.temperature - temp) < 1e-9]
            bits, n = ideal_bits(m, sel, progress)
            table[m.info.spec][temp] = bits / max(n, 1)
    return table


def format_table(table: dict[str, dict[float, float]]) -> str:
    temps = sorted({t for v in table.values() for t in v})
    lines = ["| model | " + " | ".join(f"T={t:g}" for t in temps) + " |", "| --- |" + " --- |" * len(temps)]
    for spec, v in table.items():
        lines.append(f"| {spec} | " + " | ".join(f"{v.get(t, float('nan')):.3f}" for t in temps) + " |")
    return "\n".join(lines)


def iter_chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
