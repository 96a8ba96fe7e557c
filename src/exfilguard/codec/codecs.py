"""The codecs: how one chunk of token ids becomes a payload and back.

A codec is stateless configuration; `new_state(prompt_ids)` gives the per-stream state that
knows the true token history (chunks depend only on it, so a raw resend resynchronises).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar

import numpy as np

from exfilguard.codec import quantizer as Q
from exfilguard.codec.frame import parse_varints, varints
from exfilguard.codec.rangecoding import StepDecoder, encode_steps
from exfilguard.errors import ConfigError, FrameCorrupt

MAX_ID = (1 << 32) - 1


class CodecState(ABC):
    """Per-stream state of one codec on one side of the cap."""

    @abstractmethod
    def encode_chunk(self, tokens: Sequence[int]) -> tuple[int, bytes]:
        """(param 0..7, payload) for the next chunk; the tokens become history."""

    @abstractmethod
    def decode_chunk(self, param: int, payload: bytes, count: int) -> list[int] | None:
        """Tentatively decode a chunk (None if the payload cannot stand for `count` tokens)."""

    def commit(self, tokens: Sequence[int], resent: bool = False) -> None:
        """The chunk's true tokens, after they verified (or arrived as a raw resend)."""

    def observe(self, token: int) -> None:
        """Encoder side: a token was pushed (lets a model state do its work as tokens come)."""

    # Progressive coding (stream format v2, codec/stream.py) is offered by states whose
    # `progressive` is True; they also give segment_rows / param_costs / row_dist /
    # commit_tokens (encoder) and next_row / accept (decoder), and `n_params`.
    progressive: bool = False
    n_params: int = 1


def tables_exact(model: Any) -> bool:
    """Whether the weak model's next-token tables are exact integers (`Session.frequencies()`),
    the same on every machine and batch shape. Asked once per model object (one forward on a
    1-token prompt) and remembered on it."""
    known = getattr(model, "_exfilguard_tables_exact", None)
    if known is None:
        known = model.session([0]).frequencies() is not None
        try:
            model._exfilguard_tables_exact = known
        except AttributeError:  # a model that refuses attributes is simply asked again
            pass
    return bool(known)


class Codec(ABC):
    """A way to code chunks of token ids. `codec_id` goes in the stream header (4 bits)."""

    name: ClassVar[str]
    codec_id: ClassVar[int]
    uses_model: ClassVar[bool] = False

    @property
    def fingerprint(self) -> str | None:
        """Hex fingerprint of the weak model the codec depends on, if any."""
        return None

    @property
    def fingerprint_prefix(self) -> int | None:
        fp = self.fingerprint
        return None if fp is None else int(fp[:4], 16)

    @abstractmethod
    def new_state(self, prompt_ids: Sequence[int]) -> CodecState:
        """State for one stream that follows the prompt `prompt_ids`."""


# ---------------------------------------------------------------- raw


class _RawState(CodecState):
    def encode_chunk(self, tokens: Sequence[int]) -> tuple[int, bytes]:
        for t in tokens:
            if not 0 <= int(t) <= MAX_ID:
                raise ValueError(f"token id {t} out of range")
        return 0, varints(tokens)

    def decode_chunk(self, param: int, payload: bytes, count: int) -> list[int] | None:
        if param != 0:
            raise FrameCorrupt("raw chunk with a nonzero parameter")
        ids = parse_varints(payload)
        if len(ids) != count or any(i > MAX_ID for i in ids):
            raise FrameCorrupt("raw chunk does not hold the announced token count")
        return ids


class RawCodec(Codec):
    """Token ids as unsigned LEB128 varints (also the raw-resend format)."""

    name = "raw"
    codec_id = 0

    def new_state(self, prompt_ids: Sequence[int]) -> CodecState:
        return _RawState()


# ---------------------------------------------------------------- zstd


@dataclass
class _ZstdState(CodecState):
    codec: "ZstdCodec"

    def encode_chunk(self, tokens: Sequence[int]) -> tuple[int, bytes]:
        return 0, self.codec._compress(self.codec._to_bytes(tokens))

    def decode_chunk(self, param: int, payload: bytes, count: int) -> list[int] | None:
        import zstandard

        if param != 0:
            raise FrameCorrupt("zstd chunk with a nonzero parameter")
        # A generous bound on what `count` tokens can expand to, against decompression bombs.
        limit = 64 * count + 64
        try:
            data = self.codec._decompressor().decompress(payload, max_output_size=limit)
        except zstandard.ZstdError as exc:
            raise FrameCorrupt(f"zstd chunk does not decompress: {exc}") from None
        return self.codec._to_ids(data)


class ZstdCodec(Codec):
    """zstd -19 (magicless, no checksum, no content size) over the chunk's UTF-8 text.

    Text does not always re-tokenize to the same ids; a chunk that does not is reported as a
    Desync (its check fails), never passed on."""

    name = "zstd"
    codec_id = 1
    level = 19

    def __init__(self, dictionary: bytes | None = None, ids: bool = False):
        self._dict = dictionary
        self._ids = ids
        self._cctx: Any = None
        self._dctx: Any = None

    def _params(self) -> Any:
        import zstandard

        return zstandard.ZstdCompressionParameters.from_level(
            self.level, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_checksum=0, write_content_size=0, write_dict_id=0
        )

    def _dict_data(self) -> Any:
        import zstandard

        return None if self._dict is None else zstandard.ZstdCompressionDict(self._dict)

    def _compress(self, data: bytes) -> bytes:
        import zstandard

        if self._cctx is None:  # building a compressor loads the dictionary: do it once
            self._cctx = zstandard.ZstdCompressor(compression_params=self._params(), dict_data=self._dict_data())
        return self._cctx.compress(data)

    def _decompressor(self) -> Any:
        import zstandard

        if self._dctx is None:
            self._dctx = zstandard.ZstdDecompressor(dict_data=self._dict_data(), format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        return self._dctx

    def _to_bytes(self, tokens: Sequence[int]) -> bytes:
        if self._ids:
            return varints(tokens)
        from exfilguard.codec.text import smollm2_text

        try:
            return smollm2_text().to_bytes(tokens)
        except KeyError as exc:
            raise ValueError(f"token id {exc} is not in the SmolLM2 vocabulary") from None

    def _to_ids(self, data: bytes) -> list[int] | None:
        if self._ids:
            return parse_varints(data)
        from exfilguard.codec.text import smollm2_text

        return smollm2_text().to_ids(data)

    def new_state(self, prompt_ids: Sequence[int]) -> CodecState:
        return _ZstdState(self)


class ZstdDictCodec(ZstdCodec):
    """zstd -19 with a dictionary trained on the training corpus (src/exfilguard/data)."""

    name = "zstd-dict"
    codec_id = 2

    def __init__(self, dictionary: bytes | None = None):
        super().__init__(dictionary if dictionary is not None else load_zstd_dict())


class ZstdIdsCodec(ZstdCodec):
    """zstd -19 over the varint ids: lossless, unlike text (no re-tokenization)."""

    name = "zstd-ids"
    codec_id = 5

    def __init__(self) -> None:
        super().__init__(None, ids=True)


ZSTD_DICT_RESOURCE = "zstd_dict_smollm2.bin"


def load_zstd_dict() -> bytes:
    """The shipped zstd dictionary (remake with `python -m exfilguard.codec.zstd_dict`)."""
    try:
        return resources.files("exfilguard.data").joinpath(ZSTD_DICT_RESOURCE).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError):
        raise ConfigError(
            f"the zstd dictionary {ZSTD_DICT_RESOURCE} is missing from exfilguard/data; "
            "remake it with `python -m exfilguard.codec.zstd_dict`"
        ) from None


# ---------------------------------------------------------------- model


@dataclass
class CodecStats:
    """Time spent, for benchmarks: model forward passes vs everything else."""

    model_s: float = 0.0
    codec_s: float = 0.0
    ideal_bits: float = 0.0  # accumulated only when ModelCodec.measure_ideal
    ideal_s: float = 0.0
    tokens: int = 0


class WeakModelState(CodecState):
    """Per-stream state of a codec that runs the weak model (`model`, `coupled`)."""

    codec: Any  # with a `teacher_forced` flag
    model: Any
    prompt: list[int]
    _teacher_forced: bool | None = None  # decided on first use

    def _use_teacher_forced(self) -> bool:
        """The codec's teacher_forced flag, unless the weak model has an exact integer table that
        only its incremental session gives (the n-gram): the decoder codes with that table. An
        exact model with a batched pass (score_frequencies: the exact student) gives the same
        integers either way, so there the flag holds and batching cannot desync."""
        if self._teacher_forced is None:
            want = bool(self.codec.teacher_forced)
            if want and self.model.session(self.prompt[:1]).frequencies() is not None:
                want = self.exact_batched()
            self._teacher_forced = want
        return self._teacher_forced

    def exact_batched(self) -> bool:
        """Whether the weak model computes its exact tables in one teacher-forced pass."""
        return self.model.score_frequencies(self.prompt[:1], [0]) is not None


class _ModelState(WeakModelState):
    """Range coding under the weak model; history = prompt + every true token so far."""

    def __init__(self, codec: "ModelCodec", prompt_ids: Sequence[int]):
        self.codec = codec
        self.model = codec.model
        self.prompt = [int(t) for t in prompt_ids]
        if not self.prompt:
            raise ValueError("the model codec needs a non-empty prompt (at least BOS)")
        self.history: list[int] = []
        self._session: Any = None
        self._session_len = 0  # tokens of history the session has read
        self._pending: list[int] = []  # tokens fed lazily, right before the next logits
        self._levels: list[Q.Levels | np.ndarray] = []  # encoder: per pushed token, not yet coded

    # -- the weak model, always through the incremental path unless told otherwise
    def _ensure_session(self, upto: list[int]) -> Any:
        if self._session is None:
            t = time.perf_counter()
            self._session = self.model.session(self.prompt + upto)
            self.codec.stats.model_s += time.perf_counter() - t
            self._session_len = len(upto)
            self._pending = []
        return self._session

    def _dist_row(self, sess: Any) -> Q.Levels | np.ndarray:
        t = time.perf_counter()
        if self._pending:
            for tok in self._pending:
                sess.feed(tok)
            self._pending = []
        freqs = sess.frequencies()
        logits = None if freqs is not None else sess.logits()
        t2 = time.perf_counter()
        self.codec.stats.model_s += t2 - t
        out = np.asarray(freqs) if freqs is not None else Q.levels(logits)
        self.codec.stats.codec_s += time.perf_counter() - t2
        return out

    # -- encoder
    def observe(self, token: int) -> None:
        if self._use_teacher_forced():
            return
        sess = self._ensure_session(self.history)
        self._levels.append(self._dist_row(sess))
        self._pending.append(int(token))

    def _chunk_levels(self, tokens: Sequence[int]) -> list[Q.Levels | np.ndarray]:
        if not self._use_teacher_forced():
            if len(self._levels) != len(tokens):  # tokens pushed without observe()
                self._levels = []
                for tok in tokens:
                    self.observe(tok)
            rows, self._levels = self._levels, []
            return rows
        t = time.perf_counter()
        exact = self.model.score_frequencies(self.prompt + self.history, list(tokens))
        if exact is not None:  # the session's integers, bit for bit: code them as they are
            self.codec.stats.model_s += time.perf_counter() - t
            if self.codec.measure_ideal:
                picked = exact[np.arange(len(tokens)), np.asarray(tokens)].astype(np.float64)
                self.codec.stats.ideal_bits += float((Q.PRECISION - np.log2(picked)).sum())
            return list(exact)
        logits = self.model.score_fast(self.prompt + self.history, list(tokens))
        t2 = time.perf_counter()
        self.codec.stats.model_s += t2 - t
        rows = [Q.levels(r) for r in logits]
        self.codec.stats.codec_s += time.perf_counter() - t2
        if self.codec.measure_ideal:
            t3 = time.perf_counter()
            self.codec.stats.ideal_bits += ideal_bits(logits, tokens)
            self.codec.stats.ideal_s += time.perf_counter() - t3
        return rows

    def encode_chunk(self, tokens: Sequence[int]) -> tuple[int, bytes]:
        tokens = [int(t) for t in tokens]
        for tok in tokens:
            if not 0 <= tok < self.model.vocab_size:
                raise ValueError(f"token id {tok} is outside the weak model's vocabulary")
        rows = self._chunk_levels(tokens)
        t = time.perf_counter()
        exact = any(isinstance(r, np.ndarray) for r in rows)
        if exact:
            tau = 0
            dists = [Q.from_frequencies(r) if isinstance(r, np.ndarray) else Q.from_levels(r) for r in rows]
        else:
            tau = self.codec.tau
            if tau is None:
                tau = int(np.argmin(Q.chunk_tau_costs(rows, tokens)))  # type: ignore[arg-type]
            dists = [Q.from_levels(lv, tau) for lv in rows]  # type: ignore[arg-type]
        payload = encode_steps(list(zip(dists, tokens)))
        self.codec.stats.codec_s += time.perf_counter() - t
        self.history += tokens
        self.codec.stats.tokens += len(tokens)
        return tau, payload

    # -- decoder
    def decode_chunk(self, param: int, payload: bytes, count: int) -> list[int] | None:
        sess = self._ensure_session(self.history)
        dec = StepDecoder(payload)
        out: list[int] = []
        for _ in range(count):
            row = self._dist_row(sess)
            t = time.perf_counter()
            dist = Q.from_frequencies(row) if isinstance(row, np.ndarray) else Q.from_levels(row, param)
            tok = dec.decode(dist)
            self.codec.stats.codec_s += time.perf_counter() - t
            out.append(tok)
            self._pending.append(tok)
        return out

    def commit(self, tokens: Sequence[int], resent: bool = False) -> None:
        self.history += [int(t) for t in tokens]
        if resent:
            # The session read the wrong tokens: rebuild it from the true history.
            self._session = None
            self._pending = []

    # -- progressive coding (stream format v2): the same tables, one token at a time
    @property
    def progressive(self) -> bool:
        # Exact tables cannot desync, so v2 needs no per-chunk check or raw resend; float
        # tables keep v1's checked, resendable chunks.
        return tables_exact(self.model)

    @property
    def n_params(self) -> int:
        return 1 if tables_exact(self.model) else len(Q.TAUS)

    def segment_rows(self, tokens: Sequence[int]) -> list[Q.Levels | np.ndarray]:
        """Encoder: the rows (tables or levels) of a segment's tokens; history is unchanged."""
        tokens = [int(t) for t in tokens]
        for tok in tokens:
            if not 0 <= tok < self.model.vocab_size:
                raise ValueError(f"token id {tok} is outside the weak model's vocabulary")
        return self._chunk_levels(tokens)

    def param_costs(self, rows: Sequence[Q.Levels | np.ndarray], tokens: Sequence[int]) -> np.ndarray:
        """Bits of the segment under each param (table temperature; one param for exact tables)."""
        if self.n_params == 1:
            return np.zeros(1)
        costs = Q.chunk_tau_costs(list(rows), list(tokens))  # type: ignore[arg-type]
        if self.codec.tau is not None:
            costs = np.where(np.arange(costs.size) == self.codec.tau, costs, np.inf)
        return costs

    def row_dist(self, row: Q.Levels | np.ndarray, param: int) -> Q.QuantizedDist:
        t = time.perf_counter()
        out = Q.from_frequencies(row) if isinstance(row, np.ndarray) else Q.from_levels(row, param)
        self.codec.stats.codec_s += time.perf_counter() - t
        return out

    def commit_tokens(self, tokens: Sequence[int], rows: Sequence[Any] = ()) -> None:
        """Encoder: the segment was coded; its tokens become history."""
        self.history += [int(t) for t in tokens]
        self.codec.stats.tokens += len(tokens)

    def next_row(self) -> Q.Levels | np.ndarray:
        """Decoder: the row of the next position (runs the weak model)."""
        return self._dist_row(self._ensure_session(self.history))

    def accept(self, token: int) -> None:
        """Decoder: the token at that position."""
        self.history.append(int(token))
        self._pending.append(int(token))


@dataclass
class ModelCodec(Codec):
    """Range coding (constriction) under the weak model's quantized next-token distribution.

    teacher_forced: the encoder computes a chunk's logits in one `score_fast` pass (fast,
    not bit-identical to the decoder's incremental path; the quantizer absorbs the noise and
    the checks catch the rest). tau: force one table temperature index (None: the encoder
    picks the cheapest per chunk)."""

    model: Any
    teacher_forced: bool = False
    tau: int | None = None
    measure_ideal: bool = False  # benchmarks: sum -log2 q(token) of the unquantized logits
    stats: CodecStats = field(default_factory=CodecStats)

    name: ClassVar[str] = "model"
    codec_id: ClassVar[int] = 3
    uses_model: ClassVar[bool] = True

    @property
    def fingerprint(self) -> str:
        return str(self.model.fingerprint)

    def new_state(self, prompt_ids: Sequence[int]) -> CodecState:
        return _ModelState(self, prompt_ids)


def ideal_bits(logits: np.ndarray, tokens: Sequence[int]) -> float:
    """Sum over rows of -log2 softmax(logits)[token], in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    picked = x[np.arange(len(tokens)), np.asarray(tokens)]
    return float((lse - picked).sum() / np.log(2))


# The coupled codec's id (the registry, codec/registry.py, lists every codec and its id).
COUPLED_CODEC_ID = 4


def _model_codec(weak_model: Any, **options: Any) -> ModelCodec:
    if weak_model is None:
        raise ConfigError("the `model` codec needs a weak model (e.g. --weak smollm2)")
    return ModelCodec(weak_model, **options)
