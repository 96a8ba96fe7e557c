"""The outside's append-only request log: one JSON object a line, hash-chained.

Every answer the outside decoded is recorded as (request, seed, output token ids) so that an
auditor can re-run a sample with a trusted copy of the strong model (`exfilguard verify`).
Alerts (verify/alerts.py) go into the same log, so they are chained and ordered with the
answers they refer to.

Each line carries `seq` (0, 1, 2, ...) and `prev`, the SHA-256 of the previous line's bytes
(64 zeros for the first). A line that is cut off, not JSON, missing a field, out of sequence or
not chained to its predecessor makes the reader raise LogCorrupt naming the line: a verifier
never skips what it cannot read, because a skipped record is exactly where an attacker would
hide. (Truncation at a line boundary of the whole tail is only visible against a count kept
elsewhere: `exfilguard verify --ledger` reconciles the logged bytes with the meter's, verify/reconcile.py.)

Keyed: with the outside's Ed25519 key (which the inside cannot read) every line ends with
`"sig":"<hex>"`, a signature over the line's bytes before it (`{...,"sig":"` cut off, `}` put
back) under the domain `exfilguard-request-log-v1`. Each line is a signed head of the chain up to
it: deleting or changing an answer and recomputing the chain needs the key to sign the lines again.
`conn` records say when the outside opened a connection through the meter and how many bytes its
HELLO took (the one metered thing no answer carries), so the log explains every forwarded byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exfilguard.errors import LogCorrupt

SIG_DOMAIN = b"exfilguard-request-log-v1\n"
_SIG_MARK = b',"sig":"'

GENESIS = "0" * 64
LOG_VERSION = 1
_TAIL_READ = 1 << 20  # the last line of a log is never longer than this (a 4096-token answer is ~30 KB)


@dataclass(frozen=True)
class RequestRecord:
    """One answer as the outside saw it."""

    seq: int
    id: str
    ts: float
    prompt_ids: list[int]
    seed: int | None  # None: the inside was not bound to a shared seed (likelihood scoring only)
    temperature: float
    top_p: float
    max_tokens: int
    codec: str
    output_ids: list[int]
    wire_bytes: int  # bytes of this answer's frames that crossed the meter
    finish: str  # "done", or the error type that ended it

    @property
    def tokens(self) -> int:
        return len(self.output_ids)


@dataclass(frozen=True)
class ConnRecord:
    """The outside opened a connection through the meter; its HELLO took `hello_bytes`."""

    seq: int
    ts: float
    hello_bytes: int


@dataclass(frozen=True)
class AlertRecord:
    """One anomaly alert, as logged."""

    seq: int
    ts: float
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class RequestLog:
    """Appends records to PATH, continuing the chain of an existing file. Thread-safe."""

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False, signing_key: Any = None):
        self.path = Path(path)
        self.fsync = fsync
        self.key = signing_key  # an Ed25519PrivateKey: every line signed (see the module docstring)
        self._lock = threading.Lock()
        self._seq, self._prev = self._tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _tail(self) -> tuple[int, str]:
        """(next seq, hash of the last line) of an existing log; LogCorrupt if its tail is broken."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, GENESIS
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_READ))
            tail = f.read()
        if not tail.endswith(b"\n"):
            raise LogCorrupt(f"request log {self.path}: the last line is cut off; repair or move the file before appending to it")
        lines = tail[:-1].split(b"\n")
        last = lines[-1]
        try:
            seq = json.loads(last)["seq"]
        except (ValueError, KeyError, TypeError):
            raise LogCorrupt(f"request log {self.path}: the last line is not a log record; repair or move the file") from None
        if not isinstance(seq, int):
            raise LogCorrupt(f"request log {self.path}: the last line has no integer seq")
        return seq + 1, _line_hash(last)

    def _append(self, body: dict[str, Any]) -> int:
        with self._lock:
            seq = self._seq
            rec = {"seq": seq, "prev": self._prev, **body}
            line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode()
            if self.key is not None:
                sig = self.key.sign(SIG_DOMAIN + line).hex().encode()
                line = line[:-1] + _SIG_MARK + sig + b'"}'

            # One write of a whole line with O_APPEND: a crash leaves at most a cut-off last
            # line, which the reader reports (never a silently merged one).
            os.write(self._fd, line + b"\n")
            if self.fsync:
                os.fsync(self._fd)
            self._seq, self._prev = seq + 1, _line_hash(line)
            return seq

    def append_request(self, rid: str, prompt_ids: Sequence[int], seed: int | None, temperature: float, top_p: float,
                       max_tokens: int, codec: str, output_ids: Sequence[int], wire_bytes: int, finish: str) -> int:
        """Record one answer; return its seq."""
        return self._append({
            "type": "request", "v": LOG_VERSION, "id": rid, "ts": round(time.time(), 3),
            "prompt_ids": [int(t) for t in prompt_ids], "seed": seed, "temperature": float(temperature),
            "top_p": float(top_p), "max_tokens": int(max_tokens), "codec": codec,
            "output_ids": [int(t) for t in output_ids], "wire_bytes": int(wire_bytes), "finish": finish,
        })

    def append_conn(self, hello_bytes: int) -> int:
        """Record a connection through the meter and the bytes of its HELLO; return its seq."""
        return self._append({"type": "conn", "v": LOG_VERSION, "ts": round(time.time(), 3), "hello_bytes": int(hello_bytes)})

    def append_alert(self, kind: str, detail: dict[str, Any]) -> int:
        """Record one alert; return its seq."""
        return self._append({"type": "alert", "v": LOG_VERSION, "ts": round(time.time(), 3), "kind": kind, "detail": detail})

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _int_list(d: dict[str, Any], name: str, where: str, nonempty: bool) -> list[int]:
    v = d.get(name)
    if not isinstance(v, list) or (nonempty and not v) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < (1 << 31) for t in v
    ):
        raise LogCorrupt(f"{where}: '{name}' is not a list of token ids")
    return v


def _field(d: dict[str, Any], name: str, typ: type | tuple[type, ...], where: str) -> Any:
    v = d.get(name)
    if isinstance(v, bool) or not isinstance(v, typ):
        raise LogCorrupt(f"{where}: field '{name}' is missing or has the wrong type")
    return v


def _parse(d: Any, where: str) -> RequestRecord | AlertRecord | ConnRecord:
    if not isinstance(d, dict):
        raise LogCorrupt(f"{where}: not a JSON object")
    kind = d.get("type")
    seq = _field(d, "seq", int, where)
    ts = float(_field(d, "ts", (int, float), where))
    if kind == "conn":
        hb = _field(d, "hello_bytes", int, where)
        if hb < 0:
            raise LogCorrupt(f"{where}: negative hello_bytes")
        return ConnRecord(seq, ts, hb)
    if kind == "alert":
        detail = d.get("detail")
        if not isinstance(detail, dict):
            raise LogCorrupt(f"{where}: alert without a detail object")
        return AlertRecord(seq, ts, str(_field(d, "kind", str, where)), detail)
    if kind != "request":
        raise LogCorrupt(f"{where}: unknown record type {kind!r}")
    seed = d.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 64)):
        raise LogCorrupt(f"{where}: 'seed' is not null or an integer in [0, 2**64)")
    temperature = float(_field(d, "temperature", (int, float), where))
    top_p = float(_field(d, "top_p", (int, float), where))
    if not 0.0 <= temperature <= 2.0 or not 0.0 <= top_p <= 1.0:
        raise LogCorrupt(f"{where}: temperature or top_p out of range")
    return RequestRecord(
        seq=seq, id=str(_field(d, "id", str, where)), ts=ts, prompt_ids=_int_list(d, "prompt_ids", where, True),
        seed=seed, temperature=temperature, top_p=top_p, max_tokens=_field(d, "max_tokens", int, where),
        codec=str(_field(d, "codec", str, where)), output_ids=_int_list(d, "output_ids", where, False),
        wire_bytes=_field(d, "wire_bytes", int, where), finish=str(_field(d, "finish", str, where)),
    )


def signed_part(line: bytes) -> bytes | None:
    """The bytes a keyed line's signature covers, or None when the line carries no signature."""
    i = line.rfind(_SIG_MARK)
    if i < 0 or not line.endswith(b'"}') or len(line) - i - len(_SIG_MARK) - 2 != 128:
        return None
    return line[:i] + b"}"


def read_log(path: str | os.PathLike[str], public_key: Any = None) -> Iterator[RequestRecord | AlertRecord | ConnRecord]:
    """Every record of the log in order; LogCorrupt (with the line number) on the first bad line.

    With `public_key` (the outside's Ed25519 public key) every line must carry a valid signature."""
    from cryptography.exceptions import InvalidSignature

    p = Path(path)
    try:
        f = open(p, "rb")
    except OSError as exc:
        raise LogCorrupt(f"request log {p}: cannot be read ({exc.strerror})") from None
    prev, expect = GENESIS, 0
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"request log {p}, line {lineno}"
            if not raw.endswith(b"\n"):
                raise LogCorrupt(f"{where}: truncated (the line is cut off); the log is incomplete")
            line = raw[:-1]
            try:
                d = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise LogCorrupt(f"{where}: not valid JSON") from None
            rec = _parse(d, where)
            if rec.seq != expect:
                raise LogCorrupt(f"{where}: seq {rec.seq} where {expect} was expected (a record is missing or out of order)")
            if d.get("prev") != prev:
                raise LogCorrupt(f"{where}: hash chain broken (the line before it was changed or removed)")
            if public_key is not None:
                signed = signed_part(line)
                if signed is None:
                    raise LogCorrupt(f"{where}: no signature, but the log is keyed (a line written without the outside's key)")
                try:
                    public_key.verify(bytes.fromhex(d["sig"]), SIG_DOMAIN + signed)
                except (InvalidSignature, ValueError):
                    raise LogCorrupt(f"{where}: the signature does not verify with the outside's key (the line was "
                                     "changed, or the log rewritten without the key)") from None
            prev, expect = _line_hash(line), expect + 1
            yield rec
