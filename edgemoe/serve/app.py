"""The HTTP face of `edgemoe serve`: a Starlette app shaped as OpenAI's and llama-server's API.

Routes: POST /v1/chat/completions, POST /v1/completions (also without /v1), GET /v1/models,
GET /health, GET /metrics, GET / (the chat page). /v1/* asks for an API key when keys are set
(Authorization: Bearer KEY); the page, /health and /metrics do not (as llama-server).
Every error is OpenAI's body {"error": {"message", "type", "code"}}; nothing a client sends gives a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from importlib import resources
from typing import Any, AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgemoe.errors import UserError
from edgemoe.model.sampling import SamplingParams
from edgemoe.serve import api
from edgemoe.serve.api import ApiError, GenRequest
from edgemoe.serve.metrics import RunnerCollector
from edgemoe.serve.runner import Job, Result, Runner

log = logging.getLogger("edgemoe.serve")
MAX_BODY = 4 << 20  # bytes; a chat far longer than any context still fits


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _CountRequests:
    """ASGI middleware: edgemoe_http_requests_total{path, status} (streamed answers included)."""

    PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
             "/chat/completions", "/completions", "/models"}

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope["path"] if scope["path"] in self.PATHS else "other"  # bounded label values
            self.counter.labels(path=path, status=str(status["code"])).inc()


class Server:
    """The app's state: the runner, API keys, sampling defaults, the model's name."""

    def __init__(self, runner: Runner, *, model_name: str, api_keys: list[str] | None = None,
                 defaults: SamplingParams | None = None) -> None:
        self.runner, self.model_name = runner, model_name
        self.api_keys = [k.encode() for k in (api_keys or [])]
        self.defaults = defaults or SamplingParams()
        self.created = api.now()
        self.registry = CollectorRegistry()
        self.registry.register(RunnerCollector(runner))
        self.http_requests = Counter("edgemoe_http_requests", "HTTP requests answered", ["path", "status"],
                                     registry=self.registry)

    # -- helpers ----------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        given = key.strip().encode() if scheme.lower() == "bearer" else b""
        # compare against every key (no early exit) so timing tells nothing about which one is close
        ok = False
        for k in self.api_keys:
            ok |= hmac.compare_digest(given, k)
        if not ok:
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")

    async def _body(self, request: Request) -> dict[str, Any]:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB", code="body_too_large")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB", code="body_too_large")
        return api.parse_json(raw)

    def _tokenize(self, req: GenRequest) -> None:
        """The prompt's tokens, as `edgemoe chat` (template, special tokens parsed) or `edgemoe run`
        (raw text with BOS as the model asks) make them; 400 when it does not fit the context."""
        tok = self.runner.tokenizer
        assert tok is not None  # the runner is ready
        n_ctx = self.runner.n_ctx
        try:
            if req.kind == "chat":
                if tok.chat_template is None:
                    raise ApiError(400, "the model has no chat template; use /v1/completions", code="no_chat_template")
                text = tok.apply_chat_template(req.messages, add_generation_prompt=True)
                req.prompt_tokens = tok.tokenize(text, add_special=False, parse_special=True)
            elif isinstance(req.prompt, list):
                bad = [t for t in req.prompt if not 0 <= t < tok.n_vocab]
                if bad:
                    raise api.bad(f"token id {bad[0]} is outside the vocabulary [0, {tok.n_vocab})", "prompt")
                req.prompt_tokens = list(req.prompt)
            else:
                req.prompt_tokens = tok.tokenize(req.prompt, add_special=True, parse_special=False)
        except UserError as e:
            raise api.bad(str(e)) from None
        if not req.prompt_tokens:
            raise api.bad("the prompt is empty (no tokens)", "prompt")
        room = n_ctx - 1 if req.kind == "chat" else n_ctx  # chat keeps room for one answer token, as `edgemoe chat`
        if len(req.prompt_tokens) >= room:
            raise ApiError(400, f"the prompt is {len(req.prompt_tokens)} tokens, longer than the context of {n_ctx} "
                           "tokens (--ctx-size)", code="context_length_exceeded")

    # -- routes -----------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        html = resources.files("edgemoe.serve").joinpath("chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", self.model_name))

    async def health(self, request: Request) -> Response:
        r = self.runner
        why = r.unavailable()
        body: dict[str, Any] = {"status": "ok" if why is None else ("loading" if r.state == "loading" else "error")}
        if why is not None:
            body["reason"] = why
        if r.expected_workers:
            up = r.live_workers()
            body["workers"] = {"joined": up, "expected": r.expected_workers}
            if why is None and up < r.expected_workers:
                body["status"] = "degraded"
                body["reason"] = f"{up} of {r.expected_workers} workers are up; the others' experts are served by them"
        body["queue"] = {"waiting": r.queue_depth, "size": r.queue_size, "busy": r.busy, "slots": r.parallel, "active": r.active}
        return JSONResponse(body, status_code=200 if why is None else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        self._auth(request)
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "edgemoe",
                "meta": {"n_ctx": self.runner.n_ctx}}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(self, request: Request) -> Response:
        self._auth(request)
        return await self._generate(request, api.parse_chat(await self._body(request), self.defaults))

    async def completions(self, request: Request) -> Response:
        self._auth(request)
        return await self._generate(request, api.parse_completion(await self._body(request), self.defaults))

    async def _generate(self, request: Request, req: GenRequest) -> Response:
        why = self.runner.unavailable()
        if why is not None:
            raise ApiError(503, why, type="server_error", code="unavailable", headers={"Retry-After": "5"})
        self._tokenize(req)
        job = Job(req, asyncio.get_running_loop())
        self.runner.submit(job)
        rid, created = api.new_id(req.kind), api.now()
        if req.stream:
            return EventSourceResponse(self._stream(job, rid, created), ping=15, sep="\n")
        pieces: list[str] = []
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return Response(status_code=499)
                    continue
                if kind == "text":
                    pieces.append(value)
                elif kind == "error":
                    raise value
                else:
                    res: Result = value
                    return JSONResponse(api.response(req, rid, created, self.model_name, "".join(pieces), res.finish,
                                                     res.n_prompt, res.n_completion, res.timings()))
        finally:
            job.cancelled.set()  # a no-op once done; frees the engine if this handler was cancelled

    async def _stream(self, job: Job, rid: str, created: int) -> AsyncIterator[dict[str, str]]:
        req, model = job.req, self.model_name
        first = True
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield {"data": json.dumps(api.chunk(req, rid, created, model, value, None, first=first))}
                    first = False
                elif kind == "error":
                    yield {"data": json.dumps(value.body())}
                    return
                else:
                    res: Result = value
                    yield {"data": json.dumps(api.chunk(req, rid, created, model, None, res.finish, first=first))}
                    if req.include_usage:
                        yield {"data": json.dumps(api.usage_chunk(req, rid, created, model, res.n_prompt,
                                                                  res.n_completion, res.timings()))}
                    yield {"data": "[DONE]"}
                    return
        finally:
            job.cancelled.set()  # the client went away (sse-starlette cancels this generator): free the engine


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind,
                                    headers=dict(exc.headers or {})))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))


def make_app(server: Server) -> Starlette:
    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/models", server.models, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/completions", server.completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                                       Exception: _internal_error})
    app.add_middleware(_CountRequests, counter=server.http_requests)
    return app

