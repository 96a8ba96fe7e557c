"""The inside <-> outside wire protocol: lean binary frames over one persistent connection.

Free of ML imports on purpose: the outside parses what the (untrusted) inside sends with this
module alone, and a fuzz target covers the parser.
"""

from exfilguard.protocol.wire import (
    FailCode,
    Frame,
    FrameReader,
    GenerationRequest,
    Kind,
    encode_frame,
)

__all__ = ["FailCode", "Frame", "FrameReader", "GenerationRequest", "Kind", "encode_frame"]
