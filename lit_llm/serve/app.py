"""The HTTP side of ``lit-llm serve``: an OpenAI-compatible API and the chat page, on FastAPI.

Routes: ``GET /`` (the chat page, ``lit_llm/serve/static/``), ``GET /health``, ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as server-sent events when ``stream`` is true).
Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:

====  =====================================================================================================
400   a value out of range or unsupported, malformed JSON, a prompt over ``--max-prompt-tokens``,
      ``max_tokens`` over ``--max-tokens``
401   ``/v1/*`` without the server's API key (only when it has one)
404   an unknown route or model
413   a request body over ``--max-body-bytes``
422   a body that does not have the request's fields and types
429   every decoding slot busy and the queue full (``Retry-After`` says when to try again)
500   the server failed on this request (it keeps serving the others)
503   the server is shutting down
====  =====================================================================================================

A client that disconnects, mid-stream or while waiting, frees its slot before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lit_llm.data.chat_template import ChatTemplate
from lit_llm.data.prompts import PromptTemplate
from lit_llm.data.tokenizer import Tokenizer
from lit_llm.serve.chat import ChatMessage, chat_stops, render_chat
from lit_llm.serve.engine import Engine, EngineClosed, Event, GenerationRequest, QueueFull

log = logging.getLogger("lit_llm.serve")

#: Parameters of OpenAI's API this server does not implement, with the value that means "not used".
_UNSUPPORTED: dict[str, Any] = {
    "n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "logit_bias": None,
    "presence_penalty": 0, "frequency_penalty": 0, "tools": None, "functions": None, "tool_choice": None,
    "response_format": None, "suffix": None,
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Attributes:
        max_tokens: Largest ``max_tokens`` a request may ask for; also the default when it asks for none.
        max_prompt_tokens: Longest prompt, in tokens (a longer chat drops its oldest messages first).
        max_body_bytes: Largest request body.
    """

    max_tokens: int = 256
    max_prompt_tokens: int = 768
    max_body_bytes: int = 1 << 20


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --- request bodies ------------------------------------------------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Params):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int]


class _Part(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None


class ChatBody(_Params):
    """``POST /v1/chat/completions``."""

    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


# --- the application -----------------------------------------------------------------------------------------------


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    *,
    model_name: str,
    template: ChatTemplate | str | PromptTemplate | None,
    limits: Limits = Limits(),
    api_key: str | None = None,
    close_engine: bool = True,
) -> FastAPI:
    """The server's FastAPI application around a started :class:`~lit_llm.serve.engine.Engine`.

    Args:
        engine: Decodes the requests.
        tokenizer: The model's tokenizer.
        model_name: The id ``/v1/models`` lists and requests must name.
        template: The checkpoint's chat template, or its instruction prompt template, for chat requests (None: plain
            text, see :func:`lit_llm.serve.chat.render_chat`).
        limits: Per-request limits.
        api_key: When set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        close_engine: Close the engine when the application shuts down.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="lit_llm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    created = int(time.time())
    static = resources.files("lit_llm.serve") / "static"
    index_html = (static / "index.html").read_text(encoding="utf-8")
    app.mount("/static", StaticFiles(packages=[("lit_llm.serve", "static")]), name="static")
    api = _Api(engine, tokenizer, model_name, template, limits)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _validation(err.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        message = f"no route {request.method} {request.url.path}" if err.status_code == 404 else str(err.detail)
        return APIError(err.status_code, message, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return APIError(500, f"the server failed on this request: {type(err).__name__}", type="server_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                                "the key the server was started with", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        api.check_model(name)
        return _model_card(model_name, created)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = _parse(CompletionBody, await _json(request))
        return await api.complete(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = _parse(ChatBody, await _json(request))
        return await api.chat(request, body)

    return BodyLimit(app, limits.max_body_bytes)


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lit_llm"}


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from err


def _parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _validation(err.errors()) from err


def _validation(errors: list[Any]) -> APIError:
    """One 422 naming every field that is missing or has the wrong type or range."""
    problems = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        problems.append(f"{where or 'body'}: {e.get('msg')}")
    first = next((".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in errors), None)
    return APIError(422, "invalid request: " + "; ".join(problems), param=first or None, code="invalid_value")


class _Api:
    """The completion endpoints' logic: limits, prompts, submitting to the engine, answering."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str,
                 template: ChatTemplate | str | PromptTemplate | None, limits: Limits) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.template = template
        self.limits = limits
        # A prompt and its completion share the model's context: at least one token must be left for the answer.
        self.max_prompt_tokens = min(limits.max_prompt_tokens, engine.max_len - 1)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _request(self, body: _Params, prompt_ids: list[int], max_tokens: int | None, emit: Callable[[Event], None],
                 extra_stop: Sequence[str] = ()) -> GenerationRequest:
        self.check_model(body.model)
        for name, unused in _UNSUPPORTED.items():
            value = (body.model_extra or {}).get(name, unused)
            if value not in (unused, None) and value != []:
                raise APIError(400, f"{name}={value!r} is not supported by this server (leave it out)", param=name,
                               code="unsupported_parameter")
        if max_tokens is not None and max_tokens > self.limits.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {self.limits.max_tokens} "
                           "(--max-tokens)", param="max_tokens", code="max_tokens_too_large")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens, over this server's limit of "
                           f"{self.max_prompt_tokens} (--max-prompt-tokens and the model's context): shorten it",
                           param="prompt", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop", code="invalid_value")
        return GenerationRequest(
            prompt_ids=prompt_ids, max_tokens=max_tokens or self.limits.max_tokens, emit=emit,
            temperature=body.temperature, top_p=body.top_p if body.top_p < 1.0 else None, seed=body.seed,
            stop=stop + list(extra_stop),
        )

    def _encode(self, text: str) -> list[int]:
        # An empty prompt starts a new document, GPT-2 style.
        return list(self.tokenizer.encode(text)) or [self.tokenizer.eos_id]

    async def complete(self, http: Request, body: CompletionBody) -> Response:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            ids = [int(p) for p in prompt]
            if any(not 0 <= p < self.tokenizer.vocab_size for p in ids):
                raise APIError(400, f"prompt token ids must be in [0, {self.tokenizer.vocab_size})", param="prompt")
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise APIError(400, "this server completes one prompt per request; send a string",
                                   param="prompt", code="unsupported_parameter")
                prompt = prompt[0]
            ids = self._encode(str(prompt))
        return await self._run(http, body, ids, body.max_tokens, chat=False, notice=None)

    async def chat(self, http: Request, body: ChatBody) -> Response:
        messages = [ChatMessage(m.role, _text(m.content)) for m in body.messages]
        ids = self._encode(render_chat(messages, self.template, self.tokenizer.eos_token))
        dropped = 0
        # A long conversation keeps its system messages and its newest turns: drop the oldest others until it fits.
        while len(ids) > self.max_prompt_tokens:
            rest = [i for i, m in enumerate(messages) if m.role not in ("system", "developer")]
            if len(rest) <= 1:
                break
            messages = messages[: rest[0]] + messages[rest[0] + 1 :]
            dropped += 1
            ids = self._encode(render_chat(messages, self.template, self.tokenizer.eos_token))
        notice = None
        if dropped and len(ids) <= self.max_prompt_tokens:
            notice = f"dropped the {dropped} oldest message(s) to fit the prompt limit of {self.max_prompt_tokens}"
            log.info("chat request: %s", notice)
        return await self._run(http, body, ids, body.max_completion_tokens or body.max_tokens, chat=True,
                               notice=notice, stop=chat_stops(self.template, self.tokenizer))

    async def _run(self, http: Request, body: _Params, ids: list[int], max_tokens: int | None, *, chat: bool,
                   notice: str | None, stop: Sequence[str] = ()) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # called from the engine thread
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        request = self._request(body, ids, max_tokens, emit, stop)
        try:
            self.engine.submit(request)
        except QueueFull as err:
            raise APIError(429, str(err), type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"}) from err
        except EngineClosed as err:
            raise APIError(503, str(err), type="server_error", code="unavailable") from err
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        headers = {"X-Lit-LLM-Notice": notice} if notice else None
        shape = _Shape(ident, self.model_name, chat)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(shape, events, request, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **(headers or {})})
        text, done = await _collect(http, events, request)
        return JSONResponse(shape.whole(text, done), headers=headers)


def _text(content: str | list[_Part] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


@dataclass(frozen=True)
class _Shape:
    """OpenAI's response objects for one request."""

    id: str
    model: str
    chat: bool

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model}

    def whole(self, text: str, done: Event) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._base(kind), "choices": [choice], "usage": _usage(done)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, done: Event) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(kind), "choices": [], "usage": _usage(done)}


def _usage(done: Event) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _collect(http: Request, events: asyncio.Queue[Event], request: GenerationRequest) -> tuple[str, Event]:
    """The whole completion; a client that goes away meanwhile cancels it."""
    parts = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                    raise APIError(499, "the client disconnected") from None
                continue
            if event.kind == "text":
                parts.append(event.text)
            elif event.kind == "done":
                return "".join(parts), event
            else:
                raise APIError(500, event.text, type="server_error", code="server_error")
    finally:
        request.cancel()  # no-op once finished; frees the slot when this handler is cancelled


async def _sse(shape: _Shape, events: asyncio.Queue[Event], request: GenerationRequest,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's streaming format, ending with ``data: [DONE]``. Starlette cancels this generator
    when the client disconnects; ``finally`` then frees the request's slot."""
    try:
        if shape.chat:
            yield _data(shape.chunk(None, first=True))
        while True:
            event = await events.get()
            if event.kind == "text":
                yield _data(shape.chunk(event.text))
            elif event.kind == "done":
                yield _data(shape.chunk(None, event.finish_reason))
                if include_usage:
                    yield _data(shape.usage_chunk(event))
                break
            else:
                yield _data(APIError(500, event.text, type="server_error", code="server_error").body())
                break
        yield "data: [DONE]\n\n"
    finally:
        request.cancel()


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class BodyLimit:
    """ASGI middleware answering 413 once a request body passes ``max_bytes`` (by its Content-Length, or while it
    arrives), before the application reads it all into memory."""

    def __init__(self, app: FastAPI, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _too_large(self.max_bytes)
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        # Inside the application the error reaches the APIError handler (a 413 answer); this catches it raised
        # before the application had a chance to.
        try:
            await self.app(scope, limited_receive, tracked_send)
        except APIError as err:
            if started or err.status != 413:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        body = json.dumps(_too_large(self.max_bytes).body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                    code="request_too_large")
