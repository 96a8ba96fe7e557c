"""exfilguard.codec: the stream format, the codecs (raw, zstd, zstd-dict, zstd-ids, model)
and the deterministic quantizer shared with the coupled codec. See docs/format.md."""

from exfilguard.codec.codecs import Codec, CodecState, ModelCodec, load_zstd_dict
from exfilguard.codec.frame import Header, Record, parse_header, parse_record
from exfilguard.codec.quantizer import QuantizedDist, from_frequencies, levels, quantize
from exfilguard.codec.rangecoding import StepDecoder, encode_steps
from exfilguard.codec.registry import codec_ids, codec_name, codec_names, get_codec, register_codec
from exfilguard.codec.stream import Decoder, Encoder, decode_stream, encode_stream

__all__ = [
    "Codec",
    "CodecState",
    "Decoder",
    "Encoder",
    "Header",
    "ModelCodec",
    "QuantizedDist",
    "Record",
    "StepDecoder",
    "codec_ids",
    "codec_name",
    "codec_names",
    "decode_stream",
    "encode_steps",
    "encode_stream",
    "from_frequencies",
    "get_codec",
    "levels",
    "load_zstd_dict",
    "parse_header",
    "parse_record",
    "quantize",
    "register_codec",
]
