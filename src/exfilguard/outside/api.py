"""Client-facing request parsing and text assembly for the OpenAI-compatible API (no I/O)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from exfilguard.errors import RequestInvalid

# Parameters that would raise egress (more bits per answer than the answer itself).
_EGRESS = "it would raise egress through the meter, which exfilguard refuses"


MAX_JSON_DEPTH = 32  # no field of the API nests deeper than 4; this leaves room and stops a parser bomb early


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object of valid Unicode text; RequestInvalid (400) for anything else.

    Never a 500: nesting deeper than the parser can follow, lone UTF-16 surrogates ("\\ud800", which
    JSON allows and no tokenizer can encode) and invalid UTF-8 are the client's errors."""
    import json

    try:
        body = json.loads(raw)
    except RecursionError:
        raise RequestInvalid(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", "body") from None
    except (ValueError, UnicodeDecodeError):
        raise RequestInvalid("the request body is not valid JSON", "body") from None
    if not isinstance(body, dict):
        raise RequestInvalid("the request body must be a JSON object", "body")
    check_json_text(body)
    return body


def check_json_text(body: dict[str, Any]) -> None:
    """RequestInvalid naming the first string (key or value) that is not valid Unicode, or nesting too deep."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:  # iterative: a deep body must not exhaust the stack here either
        v, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestInvalid(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", path or "body")
        if isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, dict):
            for k, x in v.items():
                _check_text(k, path or "body")
                stack.append((x, f"{path}.{k}" if path else k, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def _check_text(s: str, param: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = s[exc.start]
        raise RequestInvalid(f"'{param}' holds a lone UTF-16 surrogate (U+{ord(bad):04X}), which is not text; "
                             "send valid Unicode", param) from None


@dataclass
class Sampling:
    """What a client asked for, validated."""

    model: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    seed_given: bool
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    max_tokens_given: bool = False


def _num(body: dict[str, Any], name: str, lo: float, hi: float, default: Any, integer: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise RequestInvalid(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if not lo <= v <= hi:
        if hi == float("inf"):
            raise RequestInvalid(f"'{name}' must be at least {lo:g}", name)
        raise RequestInvalid(f"'{name}' must be between {lo} and {hi}", name)
    return v


def refuse_egress_params(body: dict[str, Any]) -> None:
    """400 for every parameter that would make an answer carry more than its text."""
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestInvalid(f"'n' > 1 is not supported: {_EGRESS}", "n")
    lp = body.get("logprobs")
    if lp is not None and lp is not False:
        raise RequestInvalid(f"'logprobs' is not supported: {_EGRESS}", "logprobs")
    if body.get("top_logprobs") is not None:
        raise RequestInvalid(f"'top_logprobs' is not supported: {_EGRESS}", "top_logprobs")
    if body.get("echo"):
        raise RequestInvalid(f"'echo' is not supported: {_EGRESS}", "echo")
    bo = body.get("best_of")
    if bo is not None and bo != 1:
        raise RequestInvalid(f"'best_of' is not supported: {_EGRESS}", "best_of")
    if body.get("suffix"):
        raise RequestInvalid(f"'suffix' is not supported: {_EGRESS}", "suffix")


_UNSUPPORTED = "exfilguard does not support it, and ignoring it would change what the client gets"

# Parameters whose presence (with a value other than its no-op) changes the answer a client
# expects; served without them, the client would silently get something else.
_NOOP: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),  # only meaningful with tools, refused above
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "top_k": (None, 0, -1),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
    "stop_token_ids": (None, []),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,),
    "add_special_tokens": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None, []),
}


def refuse_unsupported_params(body: dict[str, Any]) -> None:
    """400 naming the first parameter that would change the answer and that exfilguard does not honour."""
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text" and len(rf) == 1):
        kind = rf.get("type") if isinstance(rf, dict) else rf
        raise RequestInvalid(f"'response_format' of type {kind!r} is not supported: {_UNSUPPORTED} (only 'text')",
                             "response_format")
    for name, noops in _NOOP.items():
        if name in body and not any(type(body[name]) is type(v) and body[name] == v or body[name] is v for v in noops):
            raise RequestInvalid(f"'{name}' is not supported: {_UNSUPPORTED}", name)


def parse_sampling(body: Any, default_max_tokens: int, max_max_tokens: int) -> Sampling:
    """Validate the fields both endpoints share; RequestInvalid names the bad field."""
    if not isinstance(body, dict):
        raise RequestInvalid("the request body must be a JSON object", "body")
    refuse_egress_params(body)
    refuse_unsupported_params(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestInvalid("'model' must be a string", "model")
    mt = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if mt is None:
        mt, name = body.get("max_tokens"), "max_tokens"
    if mt is None:
        max_tokens = default_max_tokens
    else:
        max_tokens = _num({name: mt}, name, 1, float("inf"), None, integer=True)
        if max_tokens > max_max_tokens:
            # Its own limit, below the context: it bounds what one answer may reserve in a budget.
            raise RequestInvalid(f"'{name}' is too large: {max_tokens}. This server generates at most "
                                 f"{max_max_tokens} tokens per answer.", name)
    temperature = float(_num(body, "temperature", 0.0, 2.0, 1.0))
    top_p = float(_num(body, "top_p", 0.0, 1.0, 1.0))
    if top_p == 0.0:
        temperature = 0.0
    seed_v = body.get("seed")
    if seed_v is None:
        # The outside picks the seed so the coupled codec can use shared randomness.
        seed, seed_given = secrets.randbits(63), False
    else:
        seed, seed_given = int(_num(body, "seed", -(1 << 63), (1 << 64) - 1, 0, integer=True)) % (1 << 64), True
    stop_v = body.get("stop")
    if stop_v is None:
        stop: list[str] = []
    elif isinstance(stop_v, str):
        stop = [stop_v] if stop_v else []
    elif isinstance(stop_v, list) and all(isinstance(s, str) for s in stop_v):
        stop = [s for s in stop_v if s]
    else:
        raise RequestInvalid("'stop' must be a string or a list of strings", "stop")
    if len(stop) > 4 or any(len(s) > 256 for s in stop):
        raise RequestInvalid("'stop' takes at most 4 strings of at most 256 characters", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestInvalid("'stream' must be a boolean", "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise RequestInvalid("'stream_options' must be an object", "stream_options")
        include_usage = bool(so.get("include_usage", False))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestInvalid("'user' must be a string", "user")
    return Sampling(model, int(max_tokens), temperature, top_p, seed, seed_given, stop, bool(stream), include_usage, user,
                    max_tokens_given=mt is not None)


def fit_context(s: Sampling, prompt_tokens: int, max_context: int, param: str) -> None:
    """Refuse up front what cannot fit the context (as vLLM does); clamp a defaulted max_tokens to the room left."""
    if prompt_tokens >= max_context:
        raise RequestInvalid(
            f"This model's maximum context length is {max_context} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input {param}.", param)
    room = max_context - prompt_tokens
    if s.max_tokens > room:
        if not s.max_tokens_given:
            s.max_tokens = room
            return
        raise RequestInvalid(
            f"'max_tokens' or 'max_completion_tokens' is too large: {s.max_tokens}. This model's maximum context "
            f"length is {max_context} tokens and your request has {prompt_tokens} input tokens "
            f"({s.max_tokens} > {max_context} - {prompt_tokens}).", "max_tokens")


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages, as role/content strings (content parts of type text are joined)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestInvalid("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestInvalid(f"'messages[{i}]' must be an object with a 'role'", f"messages[{i}]")
        if m["role"] not in ("system", "user", "assistant", "developer", "tool"):
            raise RequestInvalid(f"'messages[{i}].role' {m['role']!r} is not supported", f"messages[{i}].role")
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for p in c:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise RequestInvalid(f"'messages[{i}].content' supports text parts only", f"messages[{i}].content")
                parts.append(p["text"])
            c = "".join(parts)
        if c is None:
            c = ""
        if not isinstance(c, str):
            raise RequestInvalid(f"'messages[{i}].content' must be a string", f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": c})
    return out


def parse_prompt(body: dict[str, Any]) -> str | list[int]:
    """A completions prompt: a string, or a list of token ids (one prompt only)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return list(p)
    raise RequestInvalid("'prompt' must be a string or a list of token ids (one prompt)", "prompt")


class TextAssembler:
    """Token ids -> text deltas, with stop strings applied and a finish reason."""

    def __init__(self, tokenizer: Any, stop: list[str], eos_ids: set[int]):
        self.tok, self.stop, self.eos = tokenizer, stop, eos_ids
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already handed out
        self.finish_reason: str | None = None
        self.hold = max((len(s) for s in stop), default=1) - 1

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the new text that is safe to send."""
        if self.finish_reason is not None:
            return ""
        for t in ids:
            if t in self.eos:
                self.ids.append(t)
                self.finish_reason = "stop"
                break
            self.ids.append(t)
        text = self._text()
        if self.stop:
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.finish_reason = "stop"
                return self._take(text[:cut])
        if self.finish_reason is not None:
            return self._take(text)
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next token
            safe = min(safe, len(text.rstrip("\ufffd")))
        return self._take(text[: max(safe, self.emitted)])

    def finish(self, reason: str = "length") -> str:
        """The stream ended: hand out what was held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
            return self._take(self._text())
        return ""

    def _text(self) -> str:
        return self.tok.decode([t for t in self.ids if t not in self.eos], skip_special_tokens=True)

    def _take(self, upto: str) -> str:
        out = upto[self.emitted :]
        self.emitted = max(self.emitted, len(upto))
        return out
