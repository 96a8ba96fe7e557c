"""The `openai:URL` strong backend against a real vLLM OpenAI server (vLLM's CPU build, in its
own virtual environment, serving SmolLM2 from the same GGUF weights). The test setup starts the
server; `bash scripts/vllm_setup.sh DIR` prepares DIR and `EXFILGUARD_VLLM=DIR` points here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

VLLM_DIR = os.environ.get("EXFILGUARD_VLLM")
PROMPT = "The three primary colors are"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    if not VLLM_DIR:
        pytest.skip("no vLLM here: run `bash scripts/vllm_setup.sh DIR` and set EXFILGUARD_VLLM=DIR")
    d = Path(VLLM_DIR)
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(d / "venv" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(d / "smollm2-hf"),
             "--served-model-name", "smollm2", "--dtype", "float32", "--max-model-len", "2048",
             # eager: torch.compile on this CPU takes ~5 min per start (its cache did not reload)
             "--enforce-eager",
             "--host", "127.0.0.1", "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert proc.poll() is None, "vLLM exited:\n" + log.read_text()[-3000:]
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            raise AssertionError("vLLM did not come up in 15 minutes:\n" + log.read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def upstream_stack(vllm_url):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "outside"))
    from standin_meter import StandInMeter

    from exfilguard.models.hf import load_tokenizer
    from exfilguard.outside.app import OutsideConfig
    from exfilguard.inside.serve import make_backend, start_inside
    from exfilguard.models.loading import load_models, resolve_weak_spec
    from exfilguard.outside.serve import start_outside
    from exfilguard.supervise.assemble import LoopThread
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    spec = f"openai:{vllm_url}?model=smollm2"
    strong, weak = load_models(spec, resolve_weak_spec(None, spec), progress=False)
    assert strong == spec  # nothing loaded locally: vLLM generates
    codecs = RealCodecFactory(weak)
    tok = load_tokenizer()
    lt = LoopThread()
    inside = lt.run(start_inside(make_backend(strong), codecs, tok, None))
    meter = StandInMeter(inside.port, 10**9)
    mport = lt.run(meter.start())
    cfg = OutsideConfig(model_name="smollm2", flush_every=4, max_context=2048)
    outside, port = lt.run(start_outside(codecs, tok, codecs.weak_fingerprint, ["k"], "127.0.0.1", mport, meter.status, config=cfg))

    class S:
        pass

    s = S()
    s.base_url, s.meter, s.tok = f"http://127.0.0.1:{port}/v1", meter, tok
    yield s
    lt.run(outside.stop())
    lt.run(meter.stop())
    lt.run(inside.stop())
    lt.close()


def _vllm_greedy(url: str, prompt_ids: list[int], n: int) -> list[int]:
    r = httpx.post(url + "/completions", timeout=300, json={
        "model": "smollm2", "prompt": prompt_ids, "max_tokens": n, "temperature": 0, "return_token_ids": True,
        "skip_special_tokens": False})
    r.raise_for_status()
    return [int(t) for t in r.json()["choices"][0]["token_ids"]]


def test_vllm_answers_cross_the_meter_exactly(vllm_url, upstream_stack):
    import openai

    s = upstream_stack
    c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0, timeout=300)
    prompt_ids = list(s.tok.encode(PROMPT))
    ref = _vllm_greedy(vllm_url, prompt_ids, 24)
    assert ref, "vLLM returned no token ids"
    c.completions.create(model="smollm2", prompt="x", max_tokens=1)  # connects: the HELLO is metered once, here
    used = s.meter.used
    r = c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == s.tok.decode(ref, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(ref)
    assert r.choices[0].finish_reason == ("length" if len(ref) == 24 else "stop")
    metered = s.meter.used - used
    assert 0 < metered < len(r.choices[0].text.encode())  # coded tokens cost less than their text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].text


def test_vllm_chat_sampled_and_refusals(upstream_stack):
    import openai

    s = upstream_stack
    c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0, timeout=300)
    r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name a fruit."}],
                                  max_tokens=16, temperature=0.7, seed=7)
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smollm2", prompt=[5] * 2000, max_tokens=100)
    assert e.value.param == "max_tokens"
