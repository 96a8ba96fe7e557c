"""The settling range coder (stream format v2): exact roundtrips, sound progressive decoding,
and sizes against constriction's coder and the ideal."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exfilguard.codec import quantizer as Q
from exfilguard.codec.rangecoding import (
    SettlingDecoder,
    SettlingEncoder,
    dist_cumulative,
    encode_steps,
    encode_token,
    seal_tail,
)
from exfilguard.errors import FrameCorrupt

fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def symbols(draw, max_size=80):
    """(cum, freq, total) triples, from near-certain to near-impossible symbols."""
    out = []
    for _ in range(draw(st.integers(0, max_size))):
        total = draw(st.sampled_from([1, 2, 3, 255, 1 << 16, (1 << 24) - 1, 1 << 24]))
        freq = draw(st.one_of(st.integers(1, total), st.integers(max(1, total - 3), total), st.just(1)))
        cum = draw(st.integers(0, total - freq))
        out.append((cum, freq, total))
    return out


def _encode(syms, takes):
    enc = SettlingEncoder()
    parts = []
    for i, s in enumerate(syms):
        enc.encode(*s)
        if i in takes:
            parts.append(enc.take())
    parts.append(enc.finish())
    return parts


def _decode(dec, cum, freq, total):
    """Decode one symbol known to be (cum, freq, total); None if not determined yet."""
    table = np.array(sorted({0, cum, cum + freq, total}), dtype=np.int64)
    s = dec.decode_table(table)
    if s is None:
        return None
    return int(table[s]), int(table[s + 1] - table[s])


@fast
@given(symbols(), st.sets(st.integers(0, 80)), st.integers(1, 7))
def test_progressive_roundtrip_is_exact_and_sound(syms, takes, step):
    """Bytes arrive `step` at a time; a symbol is decoded as soon as it is determined and is
    then always the right one; after the end every symbol is there and the tail is canonical."""
    data = b"".join(_encode(syms, takes))
    dec = SettlingDecoder()
    fed = 0
    for cum, freq, total in syms:
        while True:
            got = _decode(dec, cum, freq, total)
            # A symbol determined before the end never settles a byte that has not arrived.
            assert dec.ended or dec.pos <= len(dec.buf)
            if got is not None:
                assert got == (cum, freq)
                break
            if fed < len(data):
                dec.feed(data[fed : fed + step])
                fed += step
            else:
                dec.end()
    if fed < len(data):
        dec.feed(data[fed:])
    dec.end()
    assert dec.tail_matches()


@fast
@given(symbols(max_size=40), st.sets(st.integers(0, 40)))
def test_settled_output_is_a_prefix_of_the_final_stream(syms, takes):
    parts = _encode(syms, takes)
    enc = SettlingEncoder()
    for s in syms:
        enc.encode(*s)
    assert b"".join(parts) == enc.finish()  # taking settled bytes early changes nothing
    assert parts[-1] and parts[-1][-1] != 0  # the stream ends in a nonzero byte


@fast
@given(symbols(max_size=40))
def test_every_strict_prefix_is_truncated_or_undetermined(syms):
    """A cut stream never decodes its last symbols wrongly: with end() the decoder either
    runs out (FrameCorrupt, truncated) or decodes symbols that are right."""
    data = b"".join(_encode(syms, set()))
    for cut in range(len(data)):
        dec = SettlingDecoder()
        dec.feed(data[:cut])
        for cum, freq, total in syms:  # not ended: only determined symbols, all right
            got = _decode(dec, cum, freq, total)
            if got is None:
                break
            assert got == (cum, freq)


def _random_dist(rng, vocab, k):
    order = rng.permutation(vocab)[:k].astype(np.int64)
    raw = rng.pareto(1.0, size=k) + 1e-3
    w = np.floor(raw / raw.sum() * (Q.TOTAL - k - 1) * 0.98).astype(np.int64)
    escape = Q.TOTAL - (k + 1) - int(w.sum())
    return Q.QuantizedDist(order=order, weights=w, escape=escape, vocab_size=vocab)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(2, 3000), st.integers(0, 120))
def test_sizes_match_constriction_and_the_ideal(seed, vocab, n):
    """Same tables, same tokens: the settling coder's bytes are within 2 bytes of constriction's
    (sealed, shortest verified tail) and within 2 bytes + 1 byte of the ideal."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(n):
        d = _random_dist(rng, vocab, int(rng.integers(1, vocab + 1)))
        p = np.append(d.weights + 1, d.escape + 1) / Q.TOTAL
        s = int(rng.choice(p.size, p=p / p.sum()))
        tok = int(d.order[s]) if s < d.order.size else d.tail_token(int(rng.integers(max(d.tail_size, 1))))
        if s == d.order.size and d.tail_size < 1:
            continue
        steps.append((d, tok))
    enc = SettlingEncoder()
    for d, tok in steps:
        encode_token(enc, d, tok)
    ours = enc.finish()
    theirs = encode_steps(steps)
    ideal = sum(d.cost_bits(t) for d, t in steps)
    assert len(ours) <= len(theirs) + 2
    assert 8 * len(ours) <= ideal + 24
    dec = SettlingDecoder()
    dec.feed(ours)
    dec.end()
    for d, tok in steps:
        s = dec.decode_table(dist_cumulative(d))
        assert s is not None
        if s < d.order.size:
            assert int(d.order[s]) == tok
        else:
            i = dec.decode_uniform(d.tail_size) if d.tail_size >= 2 else 0
            assert d.tail_token(i) == tok
    assert dec.tail_matches()


def test_seal_tail_is_shortest_and_nonzero():
    for low, rng, width in [(0, 1 << 56, 7), (5 << 48, 1 << 48, 7), ((1 << 56) - (1 << 48), 1 << 48, 7), (123456789, 1 << 50, 8)]:
        t = seal_tail(low, rng, width)
        v = int.from_bytes(t, "big") << (8 * (width - len(t)))
        assert low <= v < low + rng and t[-1] != 0


def test_padding_cannot_settle_past_the_end():
    """After end(), decoding symbols from zeros beyond the last byte is a truncated stream."""
    dec = SettlingDecoder()
    dec.feed(b"\x00")
    dec.end()
    with pytest.raises(FrameCorrupt, match="truncated"):
        for _ in range(100):
            dec.decode_table(np.array([0, 1, 1 << 24]))


def test_encoder_refuses_bad_intervals():
    enc = SettlingEncoder()
    for bad in [(0, 0, 10), (5, 6, 10), (-1, 1, 10), (0, 1, (1 << 24) + 1)]:
        with pytest.raises(ValueError):
            enc.encode(*bad)


def test_ideal_bound_on_a_long_run():
    """1000 symbols of p = 1/3: within a byte of 1000 * log2(3) bits plus the seal."""
    enc = SettlingEncoder()
    for _ in range(1000):
        enc.encode(1, 1, 3)
    assert 8 * len(enc.finish()) <= 1000 * math.log2(3) + 16
