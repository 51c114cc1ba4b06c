"""The OpenAI wire format: request bodies validated into GenRequests, errors and response objects.

Validation is strict on the fields the server acts on (a wrong type is a 400, never a 500) and
lenient on the rest: clients send fields (user, logprobs=false, ...) that change nothing here.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgemoe.model.sampling import SamplingParams

MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """An HTTP error answered with OpenAI's body {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code
        self.param, self.headers = param, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenRequest:
    """One validated generation request; prompt_tokens are filled in by the app (it owns a tokenizer)."""

    kind: str  # "chat" or "completion"
    model: str
    max_tokens: int | None  # None: the server's --n-predict
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)  # chat
    prompt: str | list[int] = ""  # completion: text, or token ids
    prompt_tokens: list[int] = field(default_factory=list)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def _text(s: str, where: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which are no UTF-8 and no text to tokenize."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{where} is not valid Unicode (a lone surrogate)", where.split("[")[0].split(".")[0],
                  "invalid_value") from None
    return s


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number, got {json.dumps(v)[:40]}", name, "invalid_type")
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be within [{lo:g}, {hi:g}], got {v}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, got {json.dumps(v)[:40]}", name, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise bad(f"'{name}' must be at least {lo}" + (f" and at most {hi}" if hi is not None else "") + f", got {v}", name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, got {json.dumps(v)[:40]}", name, "invalid_type")
    return v


def _common(body: dict, kind: str, defaults: SamplingParams) -> GenRequest:
    model = body.get("model", "")
    if not isinstance(model, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    max_tokens = _integer(body, "max_tokens", 1)
    if kind == "chat":
        mct = _integer(body, "max_completion_tokens", 1)
        max_tokens = mct if mct is not None else max_tokens
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad("only n=1 is supported (one choice per request)", "n", "unsupported_value")
    temp = _number(body, "temperature", 0.0, 100.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    min_p = _number(body, "min_p", 0.0, 1.0)
    top_k = _integer(body, "top_k", 0)
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    sampling = SamplingParams(
        temp=defaults.temp if temp is None else temp,
        top_k=defaults.top_k if top_k is None else top_k,
        top_p=defaults.top_p if top_p is None else top_p,
        min_p=defaults.min_p if min_p is None else min_p,
        seed=defaults.seed if seed is None or seed < 0 else seed,
    )
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    for s in stops:
        _text(s, "stop")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _bool(opts, "include_usage") if opts else False
    return GenRequest(kind, model, max_tokens, sampling, stops, stream, include_usage)


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None and m.get("role") == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: only text ones can be served
        out = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                          "messages", "invalid_type")
            out.append(part["text"])
        return "".join(out)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages", "invalid_type")


def parse_chat(body: dict[str, Any], defaults: SamplingParams) -> GenRequest:
    """A /v1/chat/completions body."""
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is required", "messages", "missing_field")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages", "invalid_type")
    req = _common(body, "chat", defaults)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages", "invalid_type")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if not isinstance(role, str) or role not in ("system", "user", "assistant", "tool"):
            raise bad(f"messages[{i}].role must be system, user, assistant or tool", "messages", "invalid_value")
        req.messages.append({"role": role, "content": _text(_content(m, i), f"messages[{i}].content")})
    return req


def parse_completion(body: dict[str, Any], defaults: SamplingParams) -> GenRequest:
    """A /v1/completions body: a prompt string (or a list holding one), or a list of token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt", "missing_field")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass
    elif not isinstance(prompt, str):
        raise bad("'prompt' must be a string, a list of one string, or a list of token ids", "prompt", "invalid_type")
    if _bool(body, "echo"):
        raise bad("'echo' is not supported", "echo", "unsupported_value")
    req = _common(body, "completion", defaults)
    req.prompt = _text(prompt, "prompt") if isinstance(prompt, str) else prompt
    return req


# -- responses --------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def response(req: GenRequest, rid: str, created: int, model: str, text: str, finish: str, n_prompt: int,
             n_completion: int, timings: dict[str, float]) -> dict[str, Any]:
    """The whole (non-streamed) answer object."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(n_prompt, n_completion), "timings": timings}


def chunk(req: GenRequest, rid: str, created: int, model: str, text: str | None, finish: str | None,
          first: bool = False) -> dict[str, Any]:
    """One streamed chunk (chat.completion.chunk, or a text_completion piece)."""
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(req: GenRequest, rid: str, created: int, model: str, n_prompt: int, n_completion: int,
                timings: dict[str, float]) -> dict[str, Any]:
    """stream_options.include_usage: the last chunk before [DONE], with no choices."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(n_prompt, n_completion), "timings": timings}


def now() -> int:
    return int(time.time())
