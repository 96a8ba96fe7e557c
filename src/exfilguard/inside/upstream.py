"""Strong backend `openai:URL[?model=NAME]`: an upstream OpenAI-compatible server (vLLM) that
returns token ids. Each job is one streaming /completions call with the prompt as token ids and
`return_token_ids: true`; tokens go to the job's sink (encoded there, in this backend's thread).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any
from urllib.parse import parse_qs

from exfilguard.errors import ConfigError
from exfilguard.inside.engine import Job

log = logging.getLogger(__name__)


def parse_openai_spec(spec: str) -> tuple[str, str | None]:
    """'openai:URL[?model=NAME]' -> (base URL ending in /v1, model name or None)."""
    if not spec.startswith("openai:"):
        raise ConfigError(f"not an openai: spec: {spec!r}")
    url, _, query = spec[len("openai:") :].partition("?")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"openai: spec needs an http(s) URL, got {url!r}")
    url = url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    model = parse_qs(query).get("model", [None])[0]
    return url, model


def token_ids_of(chunk: dict[str, Any]) -> list[int]:
    """Token ids of one streamed choice: vLLM's `token_ids`, or `logprobs.tokens` as
    'token_id:N' strings (`return_tokens_as_token_ids`)."""
    choices = chunk.get("choices") or []
    if not choices:
        return []
    c = choices[0]
    ids = c.get("token_ids")
    if isinstance(ids, list):
        return [int(t) for t in ids]
    lp = c.get("logprobs") or {}
    toks = lp.get("tokens") if isinstance(lp, dict) else None
    if isinstance(toks, list):
        return [int(str(t).rpartition(":")[2]) for t in toks]
    return []


class OpenAIUpstream:
    """Runs jobs against an upstream server; many at once, in its own event loop thread."""

    def __init__(self, spec: str, timeout: float = 600.0):
        self.base, self.model = parse_openai_spec(spec)
        self.name = spec
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._client: Any = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_forever, name="exfilguard-upstream", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        asyncio.run_coroutine_threadsafe(self._run(job), self._loop)

    async def _model_name(self, client: Any) -> str:
        if self.model is None:
            r = await client.get(self.base + "/models")
            r.raise_for_status()
            self.model = str(r.json()["data"][0]["id"])
        return self.model

    async def _run(self, job: Job) -> None:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        req = job.request
        reason = "error"
        try:
            body = {
                "model": await self._model_name(self._client),
                "prompt": req.prompt_ids,
                "max_tokens": req.max_tokens,
                "temperature": req.temperature,
                "top_p": req.top_p,
                "seed": req.seed % (1 << 63),
                "stream": True,
                "return_token_ids": True,
                "skip_special_tokens": False,
            }
            n = 0
            async with self._client.stream("POST", self.base + "/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if job.cancelled:
                        reason = "cancelled"
                        break
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    ids = token_ids_of(chunk)
                    if ids:
                        ids = ids[: req.max_tokens - n]
                        n += len(ids)
                        if await asyncio.to_thread(job.sink.tokens, ids):
                            reason = "stop"
                            break
                    fin = (chunk.get("choices") or [{}])[0].get("finish_reason")
                    if fin:
                        reason = "length" if fin == "length" else "stop"
                else:
                    reason = "length" if n >= req.max_tokens else "stop"
                if reason == "error":
                    reason = "length" if n >= req.max_tokens else "stop"
        except Exception as exc:
            log.warning("upstream request failed: %s", exc)
            reason = "error"
        await asyncio.to_thread(job.sink.done, reason)
