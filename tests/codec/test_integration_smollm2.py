"""The model codec with the real SmolLM2 as the weak model, on a few corpus generations."""

import json

import pytest

from exfilguard.codec import Decoder, Encoder, decode_stream, encode_stream, get_codec
from exfilguard.errors import Desync, ModelMismatch

pytestmark = pytest.mark.integration

N_TOKENS = 40  # incremental decoding runs at ~15 tokens/s on CPU


@pytest.fixture(scope="module")
def smollm2():
    from exfilguard.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="module")
def rows(dev_corpus):
    out = {}
    for line in dev_corpus.open():
        r = json.loads(line)
        out.setdefault(r["temperature"], r)
    return list(out.values())  # one generation per temperature


def test_roundtrip_corpus_generations(smollm2, rows):
    for i, r in enumerate(rows):
        toks = r["token_ids"][:N_TOKENS]
        teacher_forced = i % 2 == 0  # both encoder paths; the decoder is always incremental
        enc_codec = get_codec("model", weak_model=smollm2, teacher_forced=teacher_forced)
        enc = Encoder(enc_codec, r["prompt_ids"], stream_id=i, flush_every=16)
        data = enc.push_many(toks) + enc.finish()
        dec = Decoder(get_codec("model", weak_model=smollm2), r["prompt_ids"], stream_id=i)
        try:
            dec.feed(data)
        except Desync as exc:  # allowed (float noise), but must recover exactly
            dec.resend(exc.chunk_index, enc.raw_chunk(exc.chunk_index))
        assert dec.finish() == toks
        raw = encode_stream(get_codec("raw"), toks, r["prompt_ids"], stream_id=i)
        assert len(data) < len(raw)


def test_other_weak_model_is_a_mismatch(smollm2, rows):
    from exfilguard.models import load_model

    r = rows[0]
    data = encode_stream(get_codec("model", weak_model=smollm2), r["token_ids"][:5], r["prompt_ids"])
    with pytest.raises(ModelMismatch):
        decode_stream(get_codec("model", weak_model=load_model("tiny-random")), data, r["prompt_ids"])
