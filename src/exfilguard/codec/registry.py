"""The codec registry: every codec by name and 4-bit id. It imports its parts (codecs.py,
coupled.py); they never import it, so there is no import circle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exfilguard.codec.codecs import COUPLED_CODEC_ID, Codec, RawCodec, ZstdCodec, ZstdDictCodec, ZstdIdsCodec, _model_codec
from exfilguard.codec.coupled import _coupled_codec
from exfilguard.errors import ConfigError

# name -> (codec id, factory(weak_model, **options), whether its header carries a fingerprint).
_REGISTRY: dict[str, tuple[int, Callable[..., Codec], bool]] = {}


def register_codec(name: str, codec_id: int, factory: Callable[..., Codec], uses_model: bool) -> None:
    """Make a codec available to get_codec and to the stream parser (4-bit id, unique)."""
    for other, (cid, _, _) in _REGISTRY.items():
        if cid == codec_id and other != name:
            raise ValueError(f"codec id {codec_id} is taken by {other!r}")
    _REGISTRY[name] = (codec_id, factory, uses_model)


register_codec("raw", 0, lambda weak_model=None, **kw: RawCodec(), False)
register_codec("zstd", 1, lambda weak_model=None, **kw: ZstdCodec(), False)
register_codec("zstd-dict", 2, lambda weak_model=None, **kw: ZstdDictCodec(), False)
register_codec("model", 3, lambda weak_model=None, **kw: _model_codec(weak_model, **kw), True)
register_codec("coupled", COUPLED_CODEC_ID, _coupled_codec, True)
register_codec("zstd-ids", 5, lambda weak_model=None, **kw: ZstdIdsCodec(), False)


def codec_names() -> list[str]:
    return sorted(_REGISTRY)


def codec_ids() -> dict[int, bool]:
    """codec id -> whether its header carries a fingerprint prefix."""
    return {cid: uses for cid, _, uses in _REGISTRY.values()}


def codec_name(codec_id: int) -> str:
    for name, (cid, _, _) in _REGISTRY.items():
        if cid == codec_id:
            return name
    return f"#{codec_id}"


def get_codec(name: str, weak_model: Any = None, **options: Any) -> Codec:
    """A codec by name: raw, zstd, zstd-dict, zstd-ids, model and coupled (need weak_model)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown codec {name!r}; expected one of: {', '.join(codec_names())}")
    return _REGISTRY[name][1](weak_model=weak_model, **options)
