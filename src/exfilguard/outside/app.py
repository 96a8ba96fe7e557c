"""The OpenAI-compatible API. Errors become OpenAI-shaped JSON in one place: `error_response`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from exfilguard.errors import (
    BudgetExhausted,
    ExfilguardError,
    KeyBudgetExhausted,
    ModelNotFound,
    RequestInvalid,
    RequestTooLarge,
)
from exfilguard.outside.api import (
    Sampling,
    TextAssembler,
    fit_context,
    parse_messages,
    parse_body,
    parse_prompt,
    parse_sampling,
)
from exfilguard.outside.audit import Audit, AuditConfig
from exfilguard.outside.budget import Admission, AnswerCost, MeterView
from exfilguard.outside.client import InsideConnection
from exfilguard.outside.keys import KeyAccount
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
    max_context: int = 8192  # the strong model's context (prompt + answer); SmolLM2's by default
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    keys_ledger: str | None = None  # ledger URL holding API keys and their budgets (exfilguard keys add)
    meter_status_url: str | None = None  # the meter's JSON /status: /health (meter, ledger, budget) and the budget header
    answer_cost: AnswerCost = field(default_factory=AnswerCost)  # the bound admission holds per answer (outside/budget.py)
    window_retry_after: int = 60  # Retry-After (s) when the meter's window, not its cap, is spent
    access_log: bool = True  # one JSON line per request on the exfilguard.access logger (stderr unless a file is given)
    access_log_file: str | None = None  # append the lines to this file instead of stderr (`outside --access-log FILE`)
    access_log_skip: tuple[str, ...] = ("/metrics",)  # GET paths not logged: scrapes (the dashboard's every 3 s)
    # Answers reach the client only on the ticks of a clock started when the request arrived: when
    # frames crossed the meter is visible to a client only to this resolution (0: as they come).
    release_every_s: float = 0.1
    audit: AuditConfig | None = None  # request log (for `exfilguard verify`) and anomaly alerts


ACCESS_LOG = "exfilguard.access"


@dataclass
class ReleaseClock:
    """Ticks every `period` seconds from `start`: the only moments an answer's bytes go to the client.

    The inside controls when frames cross the meter; if the client saw each as it came, the gaps
    would be a channel the cap does not count. Released on this clock, a client can tell only in
    which tick text appeared: at most one bit per tick of an answer's life, whatever the inside does."""

    period: float
    start: float = field(default_factory=time.monotonic)
    clock: Any = time.monotonic

    def next_tick(self) -> float:
        """The first tick strictly after now."""
        k = int((self.clock() - self.start) // self.period) + 1
        return self.start + k * self.period

    async def wait(self) -> None:
        """Sleep until the next tick."""
        await asyncio.sleep(max(0.0, self.next_tick() - self.clock()))


async def on_clock(source: AsyncIterator[str], clock: ReleaseClock) -> AsyncIterator[str]:
    """Pass `source`'s strings on, joined, only at the clock's ticks (a release scheduler).

    A task pulls from `source` as fast as it yields; what arrived by a tick goes out at that tick.
    Ending, an error and a client that leaves are handled as `source` does: its finally runs."""
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it at its tick
            queue.put_nowait(exc)
        else:
            queue.put_nowait(None)

    task = asyncio.ensure_future(pump())
    try:
        while True:
            await clock.wait()
            out, end = [], False
            while not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    end = True
                elif isinstance(item, BaseException):
                    if out:
                        yield "".join(out)
                    raise item
                else:
                    out.append(item)
            if out:
                yield "".join(out)
            if end or (task.done() and queue.empty()):  # done, or stopped (its client left)
                return
    finally:
        if not task.done():
            task.cancel()  # the client left: source's own finally stops the answer
        with contextlib.suppress(BaseException):
            await task


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
            "code": getattr(exc, "error_code", exc.error_type),
            "param": getattr(exc, "param", None),
        }
    }


def openai_error(status: int, message: str, type_: str, code: str | None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response in OpenAI's shape for errors that are not exfilguard's (404, 405, 422, 500)."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class _Unauthorized(ExfilguardError):
    http_status = 401
    error_type = "invalid_api_key"


def create_app(conn: InsideConnection, tokenizer: Any, weak_fingerprint: str, api_keys: list[str],
               config: OutsideConfig | None = None) -> Any:
    """The FastAPI app serving /v1/chat/completions, /v1/completions, /v1/models, /health."""

    cfg = config or OutsideConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if audit is not None:
            audit.start()
        yield
        await conn.close()
        if audit is not None:
            audit.close()
        if access_file is not None:
            access_file.close()

    app = FastAPI(title="exfilguard outside", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    keys = [k.encode() for k in api_keys]
    store = None
    if cfg.keys_ledger:
        from exfilguard.ledger.apikeys import KeyStore
        from exfilguard.ledger import open_ledger

        store = KeyStore(open_ledger(cfg.keys_ledger))
    access = logging.getLogger(ACCESS_LOG)
    access.setLevel(logging.INFO)
    access_file = None
    if cfg.access_log and cfg.access_log_file:
        import os

        try:
            fd = os.open(cfg.access_log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as exc:
            from exfilguard.errors import ConfigError

            raise ConfigError(f"cannot open the access log {cfg.access_log_file}: {exc.strerror}") from None
        access_file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")  # a line each, whole lines only
    elif cfg.access_log and not access.handlers:
        import sys

        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(h)
    async def fetch_meter_status() -> dict[str, Any] | None:
        import httpx

        assert cfg.meter_status_url is not None
        try:
            async with httpx.AsyncClient(timeout=2.0) as c:
                d = (await c.get(cfg.meter_status_url)).json()
        except (httpx.HTTPError, ValueError, OSError):  # meter down or not JSON: no figure, no failure
            return None
        return d if isinstance(d, dict) else None

    # The meter's figures, at most half a second old (none without a meter URL or while it is down).
    meter = MeterView(fetch_meter_status if cfg.meter_status_url else None, lambda: conn.bytes_in)
    admission = app.state.admission = Admission(meter, cfg.answer_cost, lambda: conn.hello is not None and conn._dead is None)

    async def meter_status() -> dict[str, Any] | None:
        await meter.read()
        return meter.raw

    eos = set(int(t) for t in ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    app.state.connection = conn
    audit = app.state.audit = Audit(cfg.audit) if cfg.audit is not None else None
    if audit is not None:
        conn.on_connect.append(audit.log_conn)

    async def error_headers(exc: ExfilguardError) -> dict[str, str]:
        """429s say when to retry: Retry-After when a window frees bytes, x-should-retry: false when a cap is spent."""
        if isinstance(exc, KeyBudgetExhausted):
            if exc.retry_after is not None:
                return {"Retry-After": str(exc.retry_after)}
            return {"x-should-retry": "false"}
        if isinstance(exc, BudgetExhausted):
            spent = getattr(exc, "cap_spent", None)
            if spent is None:  # from the connection: ask the meter whether its cap (not a window) is spent
                f = await meter.read()
                spent = f is None or f.cap_left < cfg.answer_cost.bound(1)
            if not spent:  # a window, or answers in flight, will free bytes
                return {"Retry-After": str(cfg.window_retry_after)}
            return {"x-should-retry": "false"}
        return {}

    async def error_response(exc: ExfilguardError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=exc.http_status, headers=await error_headers(exc))

    @app.exception_handler(ExfilguardError)
    async def _on_error(request: Request, exc: ExfilguardError) -> JSONResponse:
        return await error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        msg = {404: f"no route {request.method} {request.url.path}; this server serves /v1/chat/completions, "
                    "/v1/completions, /v1/models and /health",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return openai_error(exc.status_code, msg, "invalid_request_error", codes.get(exc.status_code),
                            headers=dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return openai_error(422, f"invalid request: {first.get('msg', 'validation failed')}", "invalid_request_error",
                            "invalid_value", param)

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s %s", request.method, request.url.path)
        return openai_error(500, "internal error in the outside API; see its log", "server_error", "internal_error")

    def log_access(scope: dict[str, Any], status: int, t0: float, info: dict[str, Any]) -> None:
        a: dict[str, Any] = {"ts": round(time.time(), 3), "method": scope.get("method"), "path": scope.get("path"),
                             "status": status, "key": None, "model": None, "prompt_tokens": None,
                             "completion_tokens": None, "meter_bytes": None, "bits_per_token": None}
        a.update((k, v) for k, v in info.items() if not k.startswith("_"))
        a["latency_ms"] = round((time.monotonic() - t0) * 1000, 1)
        n, b = a.get("completion_tokens"), a.get("meter_bytes")
        if isinstance(n, int) and n > 0 and isinstance(b, int):
            a["bits_per_token"] = round(8 * b / n, 3)
        line = json.dumps(a, separators=(",", ":"), ensure_ascii=False)
        if access_file is not None:
            try:
                access_file.write(line + "\n")
            except (OSError, ValueError) as exc:  # a full disk must not stop serving; say so where it shows
                log.error("cannot write the access log %s: %s", cfg.access_log_file, exc)
        access.info(line)

    class AccessLog:
        """ASGI middleware: one JSON line per request, written when its last body byte is sent
        (for a streamed answer, when the stream ends; a client that left logs status 499)."""

        def __init__(self, inner: Any):
            self.inner = inner

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if (scope["type"] != "http" or not cfg.access_log
                    or (scope.get("method") == "GET" and scope.get("path") in cfg.access_log_skip)):
                await self.inner(scope, receive, send)
                return
            t0, info = time.monotonic(), {}
            scope.setdefault("state", {})["access"] = info
            status, done = [500], [False]

            async def send_logged(msg: dict[str, Any]) -> None:
                if msg["type"] == "http.response.start":
                    status[0] = msg["status"]
                if msg["type"] == "http.response.body" and not msg.get("more_body") and not done[0]:
                    done[0] = True  # logged before the last bytes go, so a client that saw the end can read it
                    info.pop("complete", None)
                    log_access(scope, status[0], t0, info)
                await send(msg)

            try:
                await self.inner(scope, receive, send_logged)
            finally:
                if not done[0]:
                    gone = status[0] == 200 and not info.pop("complete", False)
                    settle = info.get("_settle")
                    if settle is not None:  # a client that left: log once its answer's bytes are all counted
                        with contextlib.suppress(BaseException):
                            await asyncio.wait_for(asyncio.shield(settle), 30)
                    log_access(scope, 499 if gone else status[0], t0, info)

    app.add_middleware(AccessLog)

    async def check_key(request: Request) -> Any:
        """The caller's key: an ApiKey from the keys ledger (own budget), or None for a key from the API-keys file."""
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        ok = False
        if scheme.lower() == "bearer" and token:
            t = token.strip().encode()
            for k in keys:  # no early exit: compare against every key
                ok |= hmac.compare_digest(t, k)
            if ok:
                note(request, key="api-keys-file")
                return None
            if store is not None:
                found = await asyncio.to_thread(store.lookup, token.strip())
                if found is not None:
                    note(request, key=found.name)
                    return found
                revoked = await asyncio.to_thread(revoked_name, token.strip())
                if revoked is not None:
                    note(request, key=revoked)
                    raise _Unauthorized(f"API key {revoked!r} was revoked; ask the operators for a new key "
                                        "(`exfilguard keys add`)")
        raise _Unauthorized("missing or unknown API key: send 'Authorization: Bearer <key>' with a key from "
                            "`exfilguard keys add` or the API-keys file")

    def revoked_name(secret: str) -> str | None:
        """The name of the revoked key this secret belongs to, if any (so its caller is told why)."""
        from exfilguard.ledger.apikeys import hash_key

        assert store is not None
        h = hash_key(secret)[:16]  # an ApiKey's key_id is the first 16 hex digits of its hash
        return next((k.name for k in store.keys() if not k.active and k.key_id == h), None)

    async def body_of(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise RequestTooLarge(f"the request body has {declared} bytes; the limit is {cfg.max_body_bytes}")
        # Counted while it streams in (a chunked body declares no length): never more than the
        # limit in memory, whatever the client sends.
        parts, n = [], 0
        async for part in request.stream():
            n += len(part)
            if n > cfg.max_body_bytes:
                raise RequestTooLarge(f"the request body has more than {cfg.max_body_bytes} bytes, the limit")
            parts.append(part)
        return parse_body(b"".join(parts))

    def codec_for() -> str:
        if cfg.codec != "auto":
            return cfg.codec
        offered = conn.codecs.names
        return "coupled" if "coupled" in offered else "model"

    def gen_request(prompt_ids: list[int], s: Sampling, param: str) -> GenerationRequest:
        # The context check first: its message is vLLM's, which clients know how to read.
        fit_context(s, len(prompt_ids), cfg.max_context, param)
        if len(prompt_ids) > cfg.max_prompt_tokens:
            raise RequestInvalid(
                f"This server accepts prompts of at most {cfg.max_prompt_tokens} tokens. However, your request has "
                f"{len(prompt_ids)} input tokens. Please reduce the length of the input {param}.", param)
        # A non-streaming answer is read whole anyway, so it is sent as one chunk: every flush
        # costs a chunk record and a frame (~6-8 bytes) that only buys time to first token.
        return GenerationRequest(
            prompt_ids=prompt_ids, max_tokens=s.max_tokens, seed=s.seed, temperature=s.temperature,
            top_p=s.top_p, stop=s.stop, codec=codec_for(),
            flush_every=cfg.flush_every if s.stream else 0, flush_ms=cfg.flush_ms if s.stream else 0.0,
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 when meter, ledger, budget and inside are all up; else 503 with the reason (outside/health.py)."""
        from exfilguard.outside.health import health_report

        code, body = await health_report(conn, cfg.meter_status_url, admission)
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics() -> Any:
        """Prometheus: what crossed the meter as the outside decoded it (the dashboard's bits per token),
        and, with an audit configured, the anomaly alerts' metrics."""
        text = (
            "# HELP exfilguard_outside_tokens Tokens decoded from the inside's streams\n"
            "# TYPE exfilguard_outside_tokens counter\n"
            f"exfilguard_outside_tokens_total {conn.tokens_in}\n"
            "# HELP exfilguard_outside_bytes_in Bytes received from the meter\n"
            "# TYPE exfilguard_outside_bytes_in counter\n"
            f"exfilguard_outside_bytes_in_total {conn.bytes_in}\n"
        ).encode()
        if audit is not None:
            text += audit.monitor.metrics.render()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        await check_key(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "exfilguard"}]}

    def note(request: Request, **kw: Any) -> None:
        """Add fields to this request's access-log line."""
        request.scope.setdefault("state", {}).setdefault("access", {}).update(kw)

    async def budget_headers(key: Any) -> dict[str, str]:
        """What this caller's budgets can still forward, in bytes: each budget's cap (and windows) minus
        the bytes that left through the meter, not minus reservations, so it falls as bytes leave and
        never rises (but when a window frees bytes or a cap is raised). docs/serving-api.md."""
        out: dict[str, str] = {}
        parts = []
        f = await meter.read()
        if f is not None:
            g = max(0, f.left - meter.received_since())
            out["x-exfilguard-global-budget-remaining"] = str(g)
            parts.append(g)
        if key is not None and store is not None:
            from exfilguard.ledger.apikeys import remaining_of

            try:
                st = await asyncio.to_thread(store.status, key)
                kr: int | None = remaining_of(st) + st.outstanding_bytes  # reservations are not bytes that left
            except ExfilguardError:
                kr = None
            if kr is not None:
                out["x-exfilguard-key-budget-remaining"] = str(kr)
                parts.append(kr)
        if parts:
            out["x-exfilguard-budget-remaining"] = str(max(0, min(parts)))
        return out

    async def client_gone(request: Request) -> None:
        """Return when the client hangs up (the body is read by then: the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def check_model(s: Sampling) -> str:
        served = [cfg.model_name]
        if s.model is not None and s.model not in served:
            raise ModelNotFound(s.model, served)
        return s.model or cfg.model_name

    async def run(request: Request, chat: bool) -> Any:
        release = ReleaseClock(cfg.release_every_s) if cfg.release_every_s > 0 else None
        key = await check_key(request)
        body = await body_of(request)
        s = parse_sampling(body, cfg.default_max_tokens, cfg.max_max_tokens)
        model = check_model(s)
        note(request, model=model, stream=s.stream)
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
        note(request, prompt_tokens=len(prompt_ids))
        req = gen_request(prompt_ids, s, "messages" if chat else "prompt")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        text = TextAssembler(tokenizer, s.stop, eos)
        if audit is not None:
            audit.check_admission()  # throttled: refused before anything is reserved
        # Admission: an allowance both budgets can pay in full, or a 429 before anything runs.
        cost = cfg.answer_cost
        want = cost.bound(req.max_tokens)
        aid, allowance, _ = await admission.admit(want)
        account = KeyAccount(store, key) if key is not None and store is not None else None
        try:
            allow = want if allowance is None else allowance
            if account is not None:
                allow = min(allow, await account.open(allow, cost.bound(1)))
                admission.shrink(aid, allow)
        except BaseException:
            admission.done(aid)
            raise
        if allow < want:
            # The budgets pay for fewer tokens than asked: the answer ends at that many, "length".
            req.max_tokens = cost.tokens_within(allow)
            note(request, budget_max_tokens=req.max_tokens)
        meter_bytes = [0]
        stats: dict[str, int] = {"wire_bytes": 0}

        def counted(n: int) -> None:
            # Every frame of this answer's slot, drained ones included: the access log, the key,
            # admission and the request log all count the same bytes the meter forwarded.
            meter_bytes[0] += n
            stats["wire_bytes"] += n
            admission.received(aid, n)
            if account is not None:
                account.add(n)

        if audit is not None:
            tokens = audit.wrap(conn.generate(req, weak_fingerprint, counted), req, rid, stats)
        else:
            tokens = conn.generate(req, weak_fingerprint, counted)

        def usage() -> dict[str, int]:
            n = text.completion_tokens
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def noted() -> None:
            note(request, completion_tokens=text.completion_tokens, meter_bytes=meter_bytes[0],
                 finish_reason=text.finish_reason)

        async def cover() -> None:
            if account is not None:
                await account.cover(cost.per_token * 64)

        closing: list[asyncio.Future[None]] = []

        async def closed() -> None:
            try:
                await tokens.aclose()  # CANCEL, then the frames already on their way (client.py)
                if account is not None:
                    await account.settle()
            finally:
                admission.done(aid)
                noted()  # now with every byte of the answer, drained frames included

        def close() -> asyncio.Future[None]:
            """Stop the inside generating for this answer, wait for its last frames, settle its key.

            One task, awaited shielded by callers: a client that hangs up cancels the response
            task, and the bytes must still be counted. The access log waits for it too."""
            if not closing:
                closing.append(asyncio.ensure_future(closed()))
                request.scope.setdefault("state", {}).setdefault("access", {})["_settle"] = closing[0]
            return closing[0]

        if not s.stream:
            parts = []

            async def collect() -> None:
                try:
                    async for ids in tokens:
                        parts.append(text.push(ids))
                        await cover()
                        if text.finish_reason is not None:
                            break
                except BudgetExhausted as exc:
                    # The bytes of what was decoded left already: hand that text out, cut at "length".
                    if not text.completion_tokens:
                        raise
                    note(request, budget_cut=exc.error_type)
                finally:
                    noted()
                    await asyncio.shield(close())

            # Nothing is sent until the answer is whole, so nothing else notices a client that hangs
            # up: watch for it, and stop the answer at once (the inside at its next step, on CANCEL).
            work = asyncio.ensure_future(collect())
            gone = asyncio.ensure_future(client_gone(request))
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not work.done():
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
            if work.cancelled():
                return Response(status_code=499)  # logged as 499, with the bytes it spent; nobody reads it
            if release is not None:
                await release.wait()  # the answer (or its error), at a tick: its latency shows only to the clock's resolution
            work.result()  # the answer's own error, if any, becomes its response
            parts.append(text.finish())
            noted()
            content = "".join(parts)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": text.finish_reason, "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": content, "finish_reason": text.finish_reason, "logprobs": None}
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                                 "usage": usage(), "system_fingerprint": weak_fingerprint[:16]},
                                headers=await budget_headers(key))

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
        first_ids: list[int] = []
        cut = False
        try:
            first_ids = await tokens.__anext__()
            await cover()
        except StopAsyncIteration:
            pass
        except BudgetExhausted as exc:
            if not first_ids:
                noted()
                await asyncio.shield(close())
                raise
            cut = True  # the first tokens crossed: they are the answer
            note(request, budget_cut=exc.error_type)
        except BaseException as exc:
            noted()
            await asyncio.shield(close())
            if release is not None and isinstance(exc, ExfilguardError):
                await release.wait()  # an error the inside caused comes on the clock too
            raise
        headers = {"Cache-Control": "no-cache", **await budget_headers(key)}

        async def events() -> AsyncIterator[str]:
            # The server notices a client that left only when a write fails (the next flush, maybe
            # many steps away): watch the connection and stop the answer at once.
            me = asyncio.current_task()
            gone = asyncio.ensure_future(client_gone(request))
            gone.add_done_callback(lambda g: None if g.cancelled() or me is None else me.cancel())
            try:
                yield chunk(None, None, first=True) if chat else chunk("", None)
                delta = text.push(first_ids)
                if delta:
                    yield chunk(delta, None)
                try:
                    if text.finish_reason is None and not cut:
                        async for ids in tokens:
                            delta = text.push(ids)
                            if delta:
                                yield chunk(delta, None)
                            await cover()
                            if text.finish_reason is not None:
                                break
                except BudgetExhausted as exc:
                    # A budget ran dry mid-answer: what crossed is the answer, cut at "length".
                    note(request, budget_cut=exc.error_type)
                except ExfilguardError as exc:
                    tail = text.finish("error")
                    if tail:
                        yield chunk(tail, None)
                    note(request, error=exc.error_type, complete=True)
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
                # The client may hang up as soon as it reads [DONE]: the answer was whole all the same.
                note(request, complete=True)
                yield "data: [DONE]\n\n"
            finally:
                # Client gone or answer done: either way stop the inside generating for it.
                gone.cancel()
                noted()
                await asyncio.shield(close())

        return StreamingResponse(events() if release is None else on_clock(events(), release),
                                 media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await run(request, chat=False)

    return app
