"""The OpenAI-compatible HTTP API of ``peerd api``: a Starlette app over one swarm client.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as
server-sent events ending in ``data: [DONE]``, or whole), ``GET /metrics``, ``GET /healthz``, and
the web chat at ``/``. Every request opens its own inference session on the one shared
``SwarmClient``; its route, failover and spot checks are the SDK's. A streamed request waits for
its first token before answering, so an error that stops it from starting (no route, peers
overloaded) still gets a proper HTTP status; an error after that ends the stream with an error
event, as vLLM does.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from peerd.api.metrics import ApiMetrics
from peerd.api.schema import ApiError, CompletionRequest, parse_request
from peerd.client.generation import GenerationResult
from peerd.client.sampling import SamplingParams
from peerd.model.chat import ChatTemplateError, NoChatTemplateError, PromptTextError
from peerd.rpc.errors import NoRouteError, PeerdClientError, PeerError, RequestTooLargeError, SwarmBusyError
from protocols import ErrorCode

__all__ = ["ApiSettings", "Backend", "build_app"]

logger = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUSY = frozenset({ErrorCode.CACHE_FULL, ErrorCode.TOO_MANY_SESSIONS, ErrorCode.OVERLOADED})
# the page loads only its own files and talks only to this server
_CSP = "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


class Backend(Protocol):
    """What the API needs from a swarm client (``SwarmClient`` has it)."""

    model_id: str

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]: ...
    def encode(self, text: str) -> list[int]: ...
    def events(
        self, prompt: Sequence[int], *, max_new_tokens: int, sampling: SamplingParams
    ) -> AsyncIterator[str | GenerationResult]: ...


@dataclass
class ApiSettings:
    """Limits and names of one API server."""

    model_names: frozenset[str]  # names a request may use for the model (the first listed is the id)
    max_context_tokens: int  # prompt + reply, per request (the session length peers grant)
    default_max_tokens: int = 512  # reply length when a request gives none
    max_concurrent_requests: int = 64  # beyond this, 429 with Retry-After
    api_keys: frozenset[str] = frozenset()  # empty: no key needed (the default bind is 127.0.0.1)
    retry_after_s: int = 5  # what 429/503 answers suggest
    created: int = field(default_factory=lambda: int(time.time()))


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _client_error(exc: PeerdClientError, retry_after_s: int) -> ApiError:
    """A swarm failure as the HTTP answer an OpenAI client understands (and retries when it should)."""
    if isinstance(exc, RequestTooLargeError):
        return ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, SwarmBusyError):
        return ApiError(429, str(exc), type="rate_limit_error", code="swarm_overloaded", retry_after_s=retry_after_s)
    if isinstance(exc, NoRouteError):
        message = f"the swarm cannot serve the whole model right now: {exc}"
        return ApiError(503, message, type="server_error", code="no_route", retry_after_s=retry_after_s)
    if isinstance(exc, PeerError) and exc.code in _BUSY:
        message = f"the swarm is overloaded: {exc}"
        return ApiError(429, message, type="rate_limit_error", code="swarm_overloaded", retry_after_s=retry_after_s)
    if isinstance(exc, PeerError) and exc.code == ErrorCode.SESSION_TOO_LONG:
        return ApiError(400, f"the request is longer than peers accept: {exc}", code="context_length_exceeded")
    message = f"the swarm failed this request: {exc}"
    return ApiError(503, message, type="server_error", code="swarm_error", retry_after_s=retry_after_s)


class _Api:
    def __init__(self, backend: Backend, settings: ApiSettings, metrics: ApiMetrics) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.model_id = backend.model_id
        self.active = 0

    def check_key(self, request: Request) -> None:
        if not self.settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        # compare against every key in constant time, so timing does not tell how much of a key matched
        if not any(hmac.compare_digest(given.encode(), key.encode()) for key in self.settings.api_keys):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")

    async def models(self, request: Request) -> Response:
        try:
            self.check_key(request)
        except ApiError as error:
            return _error_response(error)
        card = {"id": self.model_id, "object": "model", "created": self.settings.created, "owned_by": "peerd"}
        return JSONResponse({"object": "list", "data": [card]})

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        if req.model not in self.settings.model_names:
            raise ApiError(404, f"the model {req.model!r} does not exist here; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip
        try:
            if req.messages is not None:
                return self.backend.chat_ids(req.messages)
            return self.backend.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt or [])
        except NoChatTemplateError as exc:
            raise ApiError(400, f"{exc}; use /v1/completions", param="messages") from exc
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        except PromptTextError as exc:
            raise ApiError(400, str(exc), param="messages" if req.messages is not None else "prompt") from exc

    def reply_budget(self, req: CompletionRequest, prompt_tokens: int) -> int:
        room = self.settings.max_context_tokens - prompt_tokens
        wanted = req.max_tokens if req.max_tokens is not None else min(self.settings.default_max_tokens, room)
        if wanted > room or room < 1:
            raise ApiError(
                400,
                f"this model's maximum context length is {self.settings.max_context_tokens} tokens; the request has "
                f"{prompt_tokens} prompt tokens and asks for {wanted} more: shorten the prompt or lower max_tokens",
                param="max_tokens" if req.max_tokens is not None else "messages",
                code="context_length_exceeded",
            )
        return wanted

    async def completions(self, request: Request, *, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            self.check_key(request)
            req = parse_request(await request.body(), chat=chat)
            ids = self.prompt_ids(req)
            budget = self.reply_budget(req, len(ids))
            if self.active >= self.settings.max_concurrent_requests:
                raise ApiError(429, f"more than {self.settings.max_concurrent_requests} requests at once: retry later",
                               type="rate_limit_error", code="too_many_requests",
                               retry_after_s=1)  # fmt: skip
        except ApiError as error:
            self.metrics.requests.labels(self.model_id, endpoint, str(error.status)).inc()
            return _error_response(error)
        run = _Run(self, req, ids, chat=chat, endpoint=endpoint)
        try:
            first = await run.start(budget)
        except ApiError as error:
            return _error_response(error)
        if req.stream:
            headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # proxies: pass each event on
            return StreamingResponse(run.sse(first), media_type="text/event-stream", headers=headers)
        return await run.whole(first)

    async def metrics_page(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=METRICS_CONTENT_TYPE)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "model": self.model_id})

    async def static(self, request: Request) -> Response:
        name = request.path_params.get("name", "chat.html")
        kinds = {"chat.html": "text/html", "chat.js": "text/javascript", "chat.css": "text/css",
                 "favicon.svg": "image/svg+xml"}  # fmt: skip
        if name not in kinds:
            return Response("not found\n", status_code=404)
        body = resources.files("peerd.web").joinpath("static", name).read_bytes()
        headers = {"Content-Security-Policy": _CSP, "Cache-Control": "no-store"}
        return Response(body, media_type=kinds[name], headers=headers)


class _Run:
    """One request's generation: timings for the metrics, and its answer in either shape."""

    def __init__(self, api: _Api, req: CompletionRequest, ids: list[int], *, chat: bool, endpoint: str) -> None:
        self.api, self.req, self.ids, self.chat, self.endpoint = api, req, ids, chat, endpoint
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.last_token_at = 0.0
        self.events: AsyncIterator[str | GenerationResult] | None = None
        self.model = api.model_id

    async def start(self, budget: int) -> str | GenerationResult:
        """Open the session and wait for the first event; swarm errors become ApiError."""
        m = self.api.metrics
        self.api.active += 1
        m.waiting.labels(self.model).inc()
        self.events = self.api.backend.events(self.ids, max_new_tokens=budget, sampling=self.req.sampling)
        try:
            first = await anext(self.events)
        except PeerdClientError as exc:
            self.finish(str(_client_error(exc, self.api.settings.retry_after_s).status), waiting=True)
            raise _client_error(exc, self.api.settings.retry_after_s) from exc
        except BaseException:
            self.finish("500", waiting=True)
            raise
        m.waiting.labels(self.model).dec()
        m.running.labels(self.model).inc()
        self.last_token_at = time.perf_counter()
        m.time_to_first_token.labels(self.model).observe(self.last_token_at - self.started)
        return first

    def finish(self, status: str, *, waiting: bool = False, result: GenerationResult | None = None) -> None:
        m = self.api.metrics
        self.api.active -= 1
        (m.waiting if waiting else m.running).labels(self.model).dec()
        m.requests.labels(self.model, self.endpoint, status).inc()
        if result is not None:
            m.prompt_tokens.labels(self.model).inc(result.prompt_tokens)
            m.generation_tokens.labels(self.model).inc(len(result.token_ids))
            m.e2e_latency.labels(self.model).observe(time.perf_counter() - self.started)

    async def _rest(self, first: str | GenerationResult) -> AsyncIterator[str | GenerationResult]:
        yield first
        assert self.events is not None
        async for event in self.events:
            now = time.perf_counter()
            if isinstance(event, str):
                self.api.metrics.inter_token_latency.labels(self.model).observe(now - self.last_token_at)
                self.last_token_at = now
            yield event

    def usage(self, result: GenerationResult) -> dict[str, int]:
        done = len(result.token_ids)
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": done,
                "total_tokens": result.prompt_tokens + done}  # fmt: skip

    def extras(self, result: GenerationResult) -> dict[str, Any]:
        """peerd's own fields (OpenAI clients ignore unknown keys): the route and speed, for the web chat,
        and the steps through the swarm with the speculative guesses they confirmed."""
        return {"route": [str(span) for span in result.route], "tokens_per_s": round(result.tokens_per_s, 2),
                "time_to_first_token_s": round(result.time_to_first_token_s, 4), "steps": result.steps,
                "accepted_guesses": result.accepted_tokens}  # fmt: skip

    def chunk(self, text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    async def sse(self, first: str | GenerationResult) -> AsyncIterator[str]:
        def event(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        status, result = "500", None
        try:
            if self.chat:
                yield event(self.chunk(None, None, role=True))
            async for item in self._rest(first):
                if isinstance(item, str):
                    yield event(self.chunk(item, None))
                else:
                    result = item
            assert result is not None
            last = self.chunk(None, result.finish_reason)
            last["peerd"] = self.extras(result)
            yield event(last)
            if self.req.include_usage:
                yield event({**self.chunk(None, None), "choices": [], "usage": self.usage(result)})
            status = "200"
        except PeerdClientError as exc:
            error = _client_error(exc, self.api.settings.retry_after_s)
            status = str(error.status)
            yield event(error.body())
        finally:
            self.finish(status, result=result)
        yield "data: [DONE]\n\n"

    async def whole(self, first: str | GenerationResult) -> Response:
        status, result = "500", None
        try:
            async for item in self._rest(first):
                if isinstance(item, GenerationResult):
                    result = item
            assert result is not None
            status = "200"
        except PeerdClientError as exc:
            error = _client_error(exc, self.api.settings.retry_after_s)
            status = str(error.status)
            return _error_response(error)
        finally:
            self.finish(status, result=result)
        if self.chat:
            message = {"role": "assistant", "content": result.text}
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None}
            obj = "chat.completion"
        else:
            choice, obj = {"index": 0, "text": result.text, "logprobs": None}, "text_completion"
        choice["finish_reason"] = result.finish_reason
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(result), "peerd": self.extras(result)}  # fmt: skip
        return JSONResponse(body)


def build_app(backend: Backend, settings: ApiSettings, metrics: ApiMetrics | None = None) -> Starlette:
    """The Starlette app serving ``backend`` (a connected ``SwarmClient``) under ``settings``."""
    api = _Api(backend, settings, metrics or ApiMetrics())

    async def chat(request: Request) -> Response:
        return await api.completions(request, chat=True)

    async def completions(request: Request) -> Response:
        return await api.completions(request, chat=False)

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error_response(ApiError(404, f"no route {request.url.path}", code="not_found"))

    async def wrong_method(request: Request, exc: Exception) -> Response:
        return _error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    app = Starlette(
        routes=[
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/metrics", api.metrics_page, methods=["GET"]),
            Route("/healthz", api.healthz, methods=["GET"]),
            Route("/", api.static, methods=["GET"]),
            Route("/static/{name}", api.static, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: wrong_method},
    )
    app.state.api = api
    return app
