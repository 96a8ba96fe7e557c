"""The OpenAI-compatible API. Errors become OpenAI-shaped JSON in one place: `error_response`."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from exfilguard.errors import ExfilguardError, RequestInvalid
from exfilguard.outside.api import (
    Sampling,
    TextAssembler,
    parse_messages,
    parse_prompt,
    parse_sampling,
)
from exfilguard.outside.audit import Audit, AuditConfig
from exfilguard.outside.client import InsideConnection
from exfilguard.protocol.wire import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class OutsideConfig:
    """How the outside API serves."""

    model_name: str = "smollm2"
    codec: str = "auto"  # coupled (shared randomness) when the inside offers it, else model
    flush_every: int = 16
    flush_ms: float = 0.0
    default_max_tokens: int = 256
    max_max_tokens: int = 4096
    max_prompt_tokens: int = 8192
    audit: AuditConfig | None = None  # request log (for `exfilguard verify`) and anomaly alerts


def read_api_keys(path: str | Path) -> list[str]:
    """API keys, one a line; blank lines and # comments ignored."""
    keys = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


def error_body(exc: ExfilguardError) -> dict[str, Any]:
    """The OpenAI error shape for an exfilguard error."""
    return {
        "error": {
            "message": str(exc),
            "type": exc.error_type,
            "code": exc.error_type,
            "param": getattr(exc, "param", None),
        }
    }


class _Unauthorized(ExfilguardError):
    http_status = 401
    error_type = "invalid_api_key"


def create_app(conn: InsideConnection, tokenizer: Any, weak_fingerprint: str, api_keys: list[str],
               config: OutsideConfig | None = None) -> Any:
    """The FastAPI app serving /v1/chat/completions, /v1/completions, /v1/models, /health."""
    import contextlib

    cfg = config or OutsideConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if audit is not None:
            audit.start()
        yield
        await conn.close()
        if audit is not None:
            audit.close()

    app = FastAPI(title="exfilguard outside", docs_url=None, redoc_url=None, lifespan=lifespan)
    keys = [k.encode() for k in api_keys]
    eos = set(int(t) for t in ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    app.state.connection = conn
    audit = app.state.audit = Audit(cfg.audit) if cfg.audit is not None else None

    def error_response(exc: ExfilguardError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=exc.http_status)

    @app.exception_handler(ExfilguardError)
    async def _on_error(request: Request, exc: ExfilguardError) -> JSONResponse:
        return error_response(exc)

    def check_key(request: Request) -> None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        ok = False
        if scheme.lower() == "bearer" and token:
            t = token.strip().encode()
            for k in keys:  # no early exit: compare against every key
                ok |= hmac.compare_digest(t, k)
        if not ok:
            raise _Unauthorized("missing or unknown API key: send 'Authorization: Bearer <key>' with a key from the API-keys file")

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise RequestInvalid("the request body is not valid JSON", "body") from None
        if not isinstance(body, dict):
            raise RequestInvalid("the request body must be a JSON object", "body")
        return body

    def codec_for() -> str:
        if cfg.codec != "auto":
            return cfg.codec
        offered = conn.codecs.names
        return "coupled" if "coupled" in offered else "model"

    def gen_request(prompt_ids: list[int], s: Sampling) -> GenerationRequest:
        if len(prompt_ids) > cfg.max_prompt_tokens:
            raise RequestInvalid(f"the prompt has {len(prompt_ids)} tokens; the limit is {cfg.max_prompt_tokens}", "messages")
        # A non-streaming answer is read whole anyway, so it is sent as one chunk: every flush
        # costs a chunk record and a frame (~6-8 bytes) that only buys time to first token.
        return GenerationRequest(
            prompt_ids=prompt_ids, max_tokens=s.max_tokens, seed=s.seed, temperature=s.temperature,
            top_p=s.top_p, stop=s.stop, codec=codec_for(),
            flush_every=cfg.flush_every if s.stream else 0, flush_ms=cfg.flush_ms if s.stream else 0.0,
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "inside_connected": conn.hello is not None and conn._dead is None}

    @app.get("/metrics")
    async def metrics() -> Response:
        if audit is None:
            return Response(b"no audit configured (start the outside with --request-log or alerts)\n", status_code=404)
        m = audit.monitor.metrics
        return Response(m.render(), media_type=m.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "exfilguard"}]}

    async def run(request: Request, chat: bool) -> Any:
        check_key(request)
        body = await body_of(request)
        s = parse_sampling(body, cfg.default_max_tokens, cfg.max_max_tokens)
        if chat:
            msgs = parse_messages(body)
            prompt_ids = list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
        else:
            p = parse_prompt(body)
            prompt_ids = list(tokenizer.encode(p)) if isinstance(p, str) else p
            if not prompt_ids:
                raise RequestInvalid("'prompt' is empty", "prompt")
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise RequestInvalid("'prompt' holds a token id outside the vocabulary", "prompt")
        req = gen_request(prompt_ids, s)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = s.model or cfg.model_name
        text = TextAssembler(tokenizer, s.stop, eos)
        if audit is not None:
            audit.check_admission()
            stats: dict[str, int] = {}
            tokens = audit.wrap(conn.generate(req, weak_fingerprint, stats), req, rid, stats)
        else:
            tokens = conn.generate(req, weak_fingerprint)

        def usage() -> dict[str, int]:
            n = text.completion_tokens
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        if not s.stream:
            parts = []
            try:
                async for ids in tokens:
                    parts.append(text.push(ids))
                    if text.finish_reason is not None:
                        break
            finally:
                await tokens.aclose()
            parts.append(text.finish())
            content = "".join(parts)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": text.finish_reason, "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": content, "finish_reason": text.finish_reason, "logprobs": None}
                obj = "text_completion"
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage(),
                    "system_fingerprint": weak_fingerprint[:16]}

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {}
                if first:
                    d["role"] = "assistant"
                if delta:
                    d["content"] = delta
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
                obj = "text_completion"
            c: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if s.include_usage:
                c["usage"] = None
            return "data: " + json.dumps(c, ensure_ascii=False) + "\n\n"

        # Wait for the first tokens before committing to 200, so early errors get their status.
        try:
            first_ids = await tokens.__anext__()
        except StopAsyncIteration:
            first_ids = []
        except BaseException:
            await tokens.aclose()
            raise

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk(None, None, first=True) if chat else chunk("", None)
                delta = text.push(first_ids)
                if delta:
                    yield chunk(delta, None)
                try:
                    if text.finish_reason is None:
                        async for ids in tokens:
                            delta = text.push(ids)
                            if delta:
                                yield chunk(delta, None)
                            if text.finish_reason is not None:
                                break
                except ExfilguardError as exc:
                    tail = text.finish("error")
                    if tail:
                        yield chunk(tail, None)
                    yield "data: " + json.dumps(error_body(exc)) + "\n\n"
                    return
                tail = text.finish()
                if tail:
                    yield chunk(tail, None)
                yield chunk(None, text.finish_reason)
                if s.include_usage:
                    u = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                         "model": model, "choices": [], "usage": usage()}
                    yield "data: " + json.dumps(u) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                # Client gone or answer done: either way stop the inside generating for it.
                await tokens.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await run(request, chat=False)

    return app
