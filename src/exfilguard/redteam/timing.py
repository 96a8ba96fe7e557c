"""Scenario `timing`: the inside moves bits by *when* things happen, not by what it sends.

Two channels, each on a fresh real Meter (in-process) over a fresh SQLite ledger:

  connections  a colluder opens connections to the meter (as in `raw`); the attacker's upstream
               sends nothing and closes each one after `base` or `base + delay` seconds: one bit per
               connection, read from how long the connection stayed open. Bytes forwarded: 0.
  frames       a colluder streams honest-looking answers through the real outside API; the
               attacker's inside sends each answer's frames `base` or `base + delay` apart: one bit
               per gap between frames, read from when the SSE events arrive.

For each channel: bits sent, bits the colluder decoded right, the information that got through
(n x (1 - H(e)) for a bit error rate e: what a code over this channel could carry), the bytes the
meter forwarded, and the bytes the ledger charged (after the meter settled). The target (issue 22):
bits recovered <= bits charged, i.e. the meter counts timing as egress. `content` is the bytes the
answers would cost without the timing (frames only): the charge that pays for timing is what the
ledger charged beyond that.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exfilguard.redteam.attacker import AttackConfig, AttackerInside
from exfilguard.redteam.harness import ScenarioResult
from exfilguard.redteam.stego import bytes_to_bits

TIMING_MAGIC = b"EXFIL-TIME\n"  # then 4 bytes: the bit's index (big-endian)


@dataclass
class TimingConfig:
    """One timing run. Times in seconds."""

    secret: bytes
    cap: int = 64 * 1024
    bits: int = 32  # bits sent over each channel
    base: float = 0.15  # the gap that means 0
    delay: float = 0.3  # what a 1 adds to it
    frames_per_answer: int = 8  # frames channel: max_tokens = this x flush_every
    flush_every: int = 4
    channels: tuple[str, ...] = ("connections", "frames")
    strong: str = "tiny-random"
    weak: str = "tiny-random"
    timing_charge: bool = True  # the meter's --timing-charge (False: measure the undefended meter)


@dataclass
class ChannelResult:
    """What one timing channel moved, and what the meter charged for it."""

    channel: str
    bits_sent: int
    bits_correct: int
    recovered_bits: float  # information through the channel: n x (1 - H(error rate))
    meter_bytes: int  # forwarded by the meter
    charged_bytes: int  # counted in the ledger (used, after settlement)
    content_bytes: int  # what the same traffic costs without the timing (frames: the answers' bytes)
    seconds: float

    @property
    def charged_bits(self) -> int:
        return 8 * self.charged_bytes

    @property
    def timing_charge_bits(self) -> int:
        """What the ledger charged beyond the content: what pays for the timing."""
        return 8 * max(0, self.charged_bytes - self.content_bytes)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(charged_bits=self.charged_bits, timing_charge_bits=self.timing_charge_bits,
                 target_met=self.recovered_bits <= self.charged_bits,
                 strict_target_met=self.recovered_bits <= self.timing_charge_bits)
        return d


@dataclass
class TimingResult(ScenarioResult):
    """The issue's JSON fields, and one entry per channel."""

    channels: list[ChannelResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "cap_bytes": self.cap_bytes, "meter_bytes": self.meter_bytes,
                "secret_bytes_recovered": self.secret_bytes_recovered, "flagged": self.flagged,
                "bytes_before_flag": self.bytes_before_flag, "channels": [c.as_dict() for c in self.channels]}


def information_bits(n: int, correct: int) -> float:
    """Bits a binary symmetric channel with this error rate carries over n uses: n (1 - H(e))."""
    if n == 0:
        return 0.0
    e = 1 - correct / n
    if e >= 0.5:
        return 0.0
    h = 0.0 if e == 0 else -(e * math.log2(e) + (1 - e) * math.log2(1 - e))
    return n * (1 - h)


class TimingInside(AttackerInside):
    """The attacker's inside: honest answers, with the secret in the timing of frames and closes."""

    def __init__(self, cfg: TimingConfig, strong: Any, weak: Any, codecs: Any):
        super().__init__(AttackConfig("raw", cfg.secret, warmup=0), strong, weak, codecs)
        self.tc = cfg
        self.bits = bytes_to_bits(cfg.secret)[: cfg.bits]
        self.answers = 0

    def _gap(self, i: int) -> float:
        bit = self.bits[i] if i < len(self.bits) else 0
        return self.tc.base + bit * self.tc.delay

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = b""
        try:
            first = await reader.read(65536)
            if first.startswith(TIMING_MAGIC):
                # The connections channel: send nothing, close when the bit says.
                idx = int.from_bytes(first[len(TIMING_MAGIC):len(TIMING_MAGIC) + 4], "big")
                await asyncio.sleep(self._gap(idx))
                return
        except (ConnectionError, OSError):
            return
        finally:
            if first.startswith(TIMING_MAGIC) or not first:
                writer.close()
        self._writers.add(writer)
        try:
            await self._protocol(first, reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, slot: int, payload: bytes, writer: asyncio.StreamWriter, encoders: dict[int, Any]) -> None:
        req = self._request(slot, payload, writer)
        if req is None:
            return
        j = self.answers
        self.answers += 1
        frames = await asyncio.to_thread(self._frames, slot, req, True, encoders)
        per = self.tc.frames_per_answer - 1  # bits this answer carries: one per gap between its frames
        for k, fr in enumerate(frames):
            if k:
                await asyncio.sleep(self._gap(j * per + k - 1))
            if writer.is_closing():
                return
            writer.write(fr)
            await writer.drain()


def run_timing(cfg: TimingConfig, strong: Any = None, weak: Any = None,
               progress: Callable[[str], None] | None = None, workdir: str | None = None) -> TimingResult:
    """Run each channel on a fresh meter and ledger; return what the colluder recovered and what was charged."""
    from exfilguard.models import load_model
    from exfilguard.protocol.codec_adapter import RealCodecFactory
    from exfilguard.supervise.assemble import LoopThread

    say = progress or (lambda s: None)
    strong = strong if strong is not None else load_model(cfg.strong)
    weak = weak if weak is not None else (strong if cfg.weak == cfg.strong else load_model(cfg.weak))
    codecs = RealCodecFactory(weak)
    tmp = tempfile.TemporaryDirectory(prefix="exfilguard-timing-") if workdir is None else None
    work = Path(workdir or tmp.name)  # type: ignore[union-attr]
    res = TimingResult("timing", cfg.cap, 0, 0)
    lt = LoopThread()
    try:
        for ch in cfg.channels:
            say(f"timing channel: {ch}")
            ledger = work / f"ledger-{ch}.sqlite"
            for p in work.glob(f"ledger-{ch}.sqlite*"):
                p.unlink()
            res.channels.append(_channel(ch, cfg, strong, weak, codecs, f"sqlite:///{ledger}", lt))
    finally:
        lt.close()
        if tmp is not None:
            tmp.cleanup()
    res.meter_bytes = sum(c.meter_bytes for c in res.channels)
    res.secret_bytes_recovered = int(sum(c.recovered_bits for c in res.channels)) // 8
    return res


def _channel(ch: str, cfg: TimingConfig, strong: Any, weak: Any, codecs: Any, ledger_url: str, lt: Any) -> ChannelResult:
    from exfilguard.ledger import open_ledger, reads
    from exfilguard.meter import Meter, MeterConfig

    attacker = TimingInside(cfg, strong, weak, codecs)
    aport = lt.run(attacker.start())
    meter = Meter(MeterConfig(listen="127.0.0.1:0", upstream=f"127.0.0.1:{aport}", ledger=ledger_url, cap=cfg.cap,
                              reserve_block=max(64, min(1024, cfg.cap // 8)), upstream_wait=5.0,
                              timing_charge=cfg.timing_charge))
    lt.run(meter.start())
    mport = meter.listen_address[1]
    t0 = time.monotonic()
    try:
        if ch == "connections":
            decoded = lt.run(_collude_connections(mport, len(attacker.bits), cfg), timeout=None)
            content = 0
        elif ch == "frames":
            decoded = _collude_frames(cfg, attacker, strong, codecs, mport, lt)
            content = meter.bytes_out  # the same answers sent at once cost the same bytes
        else:
            raise ValueError(f"unknown timing channel {ch!r}")
        forwarded = meter.bytes_out
    finally:
        lt.run(meter.stop())
        lt.run(attacker.stop())
    seconds = time.monotonic() - t0
    led = open_ledger(ledger_url)
    try:
        charged = int(reads.status(led, "default").used_bytes)
    finally:
        led.close()
    sent = attacker.bits
    correct = sum(1 for i, b in enumerate(sent) if i < len(decoded) and decoded[i] == b)
    return ChannelResult(ch, len(sent), correct, round(information_bits(len(sent), correct), 2), forwarded, charged,
                         content, round(seconds, 2))


async def _collude_connections(mport: int, n: int, cfg: TimingConfig) -> list[int]:
    """One connection per bit; the bit is how long the meter kept it open."""
    threshold = cfg.base + cfg.delay / 2
    out: list[int] = []
    for i in range(n):
        t = time.monotonic()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", mport)
            w.write(TIMING_MAGIC + i.to_bytes(4, "big"))
            await w.drain()
            while await r.read(65536):
                pass
            w.close()
        except OSError:
            out.append(0)
            continue
        out.append(1 if time.monotonic() - t > threshold else 0)
    return out


def _collude_frames(cfg: TimingConfig, attacker: TimingInside, strong: Any, codecs: Any, mport: int, lt: Any) -> list[int]:
    """Stream answers through the real outside; the bits are the gaps between bursts of SSE events."""
    import httpx

    from exfilguard.outside.app import OutsideConfig
    from exfilguard.outside.serve import start_outside

    tok = getattr(strong, "tokenizer", None)
    per = cfg.frames_per_answer - 1
    answers = -(-len(attacker.bits) // per)
    ocfg = OutsideConfig(model_name=cfg.strong, flush_every=cfg.flush_every, default_max_tokens=cfg.frames_per_answer * cfg.flush_every)
    outside, oport = lt.run(start_outside(codecs, tok, codecs.weak_fingerprint, ["k"], "127.0.0.1", mport, config=ocfg))
    decoded: list[int] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{oport}/v1", headers={"Authorization": "Bearer k"}, timeout=120) as http:
            for j in range(answers):
                body = {"model": cfg.strong, "stream": True, "max_tokens": cfg.frames_per_answer * cfg.flush_every,
                        "temperature": 1.0, "seed": j, "messages": [{"role": "user", "content": f"Tell me a story, part {j}."}]}
                times: list[float] = []
                with http.stream("POST", "/chat/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data:") and "[DONE]" not in line:
                            times.append(time.monotonic())
                decoded += _bits_from_arrivals(times, cfg, per)
    finally:
        lt.run(outside.stop())
    return decoded


def _bits_from_arrivals(times: list[float], cfg: TimingConfig, per: int) -> list[int]:
    """Group events into bursts (one per frame), read one bit per gap; pad to `per` bits (lost bits read as 0)."""
    if not times:
        return [0] * per
    gaps = [b - a for a, b in zip(times, times[1:])]
    frame_gaps = [g for g in gaps if g > cfg.base / 2]  # within a burst events follow at once
    bits = [1 if g > cfg.base + cfg.delay / 2 else 0 for g in frame_gaps][:per]
    return bits + [0] * (per - len(bits))
