"""The OpenAI-compatible HTTP app: ``create_app(worker, tokenizer, model_name, ...)`` -> FastAPI.

    GET  /v1/models              the one served model
    POST /v1/completions         prompt: a string or a list of token ids
    POST /v1/chat/completions    messages through the tokenizer's chat template
    GET  /health                 200 with the worker's status
    GET  /metrics                Prometheus text (`hierspec.serve.metrics`)

A request is checked (`hierspec.serve.schemas`, then against the model: context, vocabulary,
method on this backend), submitted to the worker (`hierspec.serve.worker`: 429 at once when its
queue is full), and its events framed: one JSON object, or server-sent events (OpenAI chunks,
``data: [DONE]`` last; with ``stream_options.include_usage`` a usage chunk before it). Text comes
from `hierspec.serve.text` (the stop string is not returned, as OpenAI). Every response carries
``usage`` and hierspec's ``spec_decode`` (vLLM's per-request summary). Errors are OpenAI's error
object ``{"error": {"message", "type", "param", "code"}}``: 400 bad input (FastAPI's 422 too),
401 wrong or missing API key (when one is set), 404 unknown model or route, 429 queue full, 500
a worker error, 503 the server is shutting down. A client that goes away (mid-stream, or while
waiting for a whole response) has its request cancelled in the worker at once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..methods import MethodError, check_runnable, parse_method
from ..sampling import SamplingParams
from .call import Call
from .errors import ApiError, validation_error
from .metrics import CONTENT_TYPE, ServeMetrics, spec_decode_summary
from .schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from .worker import DoneEvent, Event, GenRequest, QueueFull, TokenEvent, Worker

__all__ = ["ApiError", "ServeDefaults", "create_app"]

Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class ServeDefaults:
    """What a request that leaves a field out gets, and the server's timings."""

    method: str = "ngram"
    gamma: int = 0  # 0 = auto
    rule: str = "block"
    temperature: float = 1.0  # OpenAI's default
    max_tokens: int | None = None  # None: all the context leaves after the prompt
    poll_s: float = 0.25  # a waiting non-streaming request checks this often that its client is there
    shutdown_grace_s: float = 10.0  # streams in flight may finish within this after a shutdown signal
    shutdown_timeout_s: float = 30.0  # worker.shutdown's


# ------------------------------------------------------------------------------ one request
# ------------------------------------------------------------------------------ the server
class _Server:
    def __init__(
        self,
        worker: Worker,
        tokenizer: Any,
        model_name: str,
        context_length: int,
        vocab_size: int | None,
        backend: str,
        api_key: str | None,
        defaults: ServeDefaults,
    ) -> None:
        self.worker, self.tokenizer, self.model_name = worker, tokenizer, model_name
        self.context_length, self.vocab_size, self.backend = context_length, vocab_size, backend
        self.api_key, self.defaults = api_key, defaults
        self.metrics = ServeMetrics(model_name, worker.status)
        self.started = int(time.time())

    # ---------------------------------------------------------------- checks
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given, key = token.strip().encode(), self.api_key.encode()
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, key):
            raise ApiError(
                401, "missing or wrong API key (send 'Authorization: Bearer KEY')", None, "invalid_api_key"
            )

    def _prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> tuple[list[int], str]:
        if isinstance(body, ChatCompletionRequest):
            try:
                ids = self.tokenizer.apply_chat_template(
                    [m.for_template() for m in body.messages], add_generation_prompt=True, tokenize=True
                )
            except Exception as err:
                raise ApiError(400, f"messages: the chat template failed: {err}", "messages") from None
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids], "messages"
        if isinstance(body.prompt, str):
            try:
                return [int(i) for i in self.tokenizer(body.prompt)["input_ids"]], "prompt"
            except Exception as err:
                raise ApiError(400, f"prompt: cannot be tokenised: {err}", "prompt") from None
        ids = list(body.prompt)
        bad = [t for t in ids if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
        if bad:
            raise ApiError(
                400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", "prompt"
            )
        return ids, "prompt"

    def _params(self, body: GenerationRequest) -> SamplingParams:
        temperature = self.defaults.temperature if body.temperature is None else body.temperature
        top_k = 0 if body.top_k in (None, -1) else body.top_k
        try:
            return SamplingParams(
                temperature=temperature,
                top_k=top_k,
                top_p=1.0 if body.top_p is None else body.top_p,
                min_p=0.0 if body.min_p is None else body.min_p,
            )
        except ValueError as err:
            field = str(err).split(" ", 1)[0]
            raise ApiError(400, f"{field}: {err}", field) from None

    def check(self, body: CompletionRequest | ChatCompletionRequest, kind: Kind) -> GenRequest:
        """A validated body -> the worker's request (ApiError for what the schema cannot see)."""
        if body.model is not None and body.model != self.model_name:
            raise ApiError(
                404,
                f"model: {body.model!r} is not served here (serving {self.model_name!r})",
                "model",
                "model_not_found",
            )
        if body.method is not None:
            try:
                check_runnable(parse_method(body.method), self.backend)
            except MethodError as err:
                raise ApiError(400, f"method: {err}", "method") from None
        params = self._params(body)
        ids, where = self._prompt_ids(body)
        if not ids:
            raise ApiError(400, f"{where}: the prompt has no tokens", where)
        ctx = self.context_length
        if len(ids) >= ctx:
            raise ApiError(
                400, f"{where}: {len(ids)} prompt tokens leave no room in the model's context of {ctx}", where
            )
        room = ctx - len(ids)
        if isinstance(body, ChatCompletionRequest):
            max_new = body.max_new
            field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        else:
            max_new, field = body.max_tokens, "max_tokens"
        if max_new is None:
            max_new = room if self.defaults.max_tokens is None else min(room, self.defaults.max_tokens)
        elif max_new > room:
            raise ApiError(
                400,
                f"{field}: {len(ids)} prompt tokens + {max_new} new tokens exceed the model's context of "
                f"{ctx} (at most {room} new tokens)",
                field,
            )
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return GenRequest(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            prompt_ids=ids,
            params=params,
            max_tokens=max_new,
            stop=body.stop_list,
            seed=body.seed,
            method=body.method,
            gamma=body.gamma_value,
            rule=body.rule,
        )

    # ---------------------------------------------------------------- serving
    async def serve(
        self, request: Request, body: CompletionRequest | ChatCompletionRequest, kind: Kind
    ) -> Response:
        gen = self.check(body, kind)
        call = Call(self.worker, self.metrics, self.tokenizer, gen, self.defaults.poll_s)
        try:
            self.worker.submit(gen, call.sink)
        except QueueFull as err:
            self.metrics.finished("rejected", len(gen.prompt_ids), 0, None)
            raise ApiError(429, f"server busy: {err}; retry later", None, "queue_full") from None
        except ValueError as err:  # what this worker cannot run (e.g. a method it does not batch)
            self.metrics.finished("rejected", len(gen.prompt_ids), 0, None)
            param = str(err).split(":", 1)[0] if str(err).startswith("method:") else None
            raise ApiError(400, str(err), param) from None
        if body.stream:
            return await self._stream(request, call, body, kind)
        return await self._whole(request, call, kind)

    async def _whole(self, request: Request, call: Call, kind: Kind) -> Response:
        parts: list[str] = []
        try:
            while call.done is None:
                event = await call.next(request)
                if event is None:
                    call.abandon()
                    return Response(status_code=499)  # nobody reads it
                parts.append(call.on_tokens(event) if isinstance(event, TokenEvent) else call.on_done(event))
        finally:
            call.abandon()  # cancelled by the server (shutdown) or an error here: free it
        failure = call.failure()
        if failure is not None:
            raise failure
        text = "".join(parts)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=call.finish_reason())
        return JSONResponse(
            {
                "id": call.gen.request_id,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": call.created,
                "model": self.model_name,
                "choices": [choice],
                "usage": call.usage(),
                "spec_decode": self._spec(call),
            }
        )

    def _spec(self, call: Call) -> dict[str, Any] | None:
        stats = call.done.stats if call.done is not None else None
        if stats is None:
            return None
        gen = call.gen
        return {
            **spec_decode_summary(stats),
            "method": gen.method or self.defaults.method,
            "gamma": _gamma_text(self.defaults.gamma if gen.gamma is None else gen.gamma),
            "rule": "greedy" if gen.params.greedy else gen.rule or self.defaults.rule,
        }

    async def _stream(
        self, request: Request, call: Call, body: CompletionRequest | ChatCompletionRequest, kind: Kind
    ) -> Response:
        # the first event before any header: a request that fails at once gets a proper status
        first = await call.next(request)
        if first is None:
            call.abandon()
            return Response(status_code=499)
        if isinstance(first, DoneEvent) and first.finish_reason in ("error", "cancelled"):
            call.on_done(first)
            raise call.failure() or ApiError(500, "generation failed")
        return EventSourceResponse(
            self._chunks(call, first, body, kind),
            sep="\n",
            shutdown_grace_period=self.defaults.shutdown_grace_s,
        )

    async def _chunks(
        self, call: Call, first: Event, body: CompletionRequest | ChatCompletionRequest, kind: Kind
    ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        usage = body.include_usage

        def chunk(text: str | None, finish: str | None, role: bool = False, **extra: Any) -> str:
            if kind == "chat":
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            choice.update(logprobs=None, finish_reason=finish)
            out = {
                "id": call.gen.request_id,
                "object": obj,
                "created": call.created,
                "model": self.model_name,
                "choices": [choice],
                **extra,
            }
            if usage:
                out.setdefault("usage", None)
            return _json(out)

        try:
            if kind == "chat":
                yield chunk(None, None, role=True)
            event: Event | None = first
            while True:
                if event is None:
                    event = await call.events.get()
                if isinstance(event, TokenEvent):
                    text = call.on_tokens(event)
                    if text:
                        yield chunk(text, None)
                    event = None
                    continue
                rest = call.on_done(event)
                failure = call.failure()
                if failure is not None:
                    yield _json(failure.body())
                else:
                    yield chunk(rest, call.finish_reason(), spec_decode=self._spec(call))
                    if usage:
                        yield _json(
                            {
                                "id": call.gen.request_id,
                                "object": obj,
                                "created": call.created,
                                "model": self.model_name,
                                "choices": [],
                                "usage": call.usage(),
                            }
                        )
                yield "[DONE]"
                return
        finally:
            if call.done is None:  # the client went away, or the server is stopping
                with anyio.CancelScope(shield=True):
                    call.abandon()

    # ---------------------------------------------------------------- info
    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.started,
                    "owned_by": "hierspec",
                    "max_model_len": self.context_length,
                }
            ],
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_name,
            "backend": self.backend,
            "context_length": self.context_length,
            "defaults": {
                "method": self.defaults.method,
                "gamma": _gamma_text(self.defaults.gamma),
                "rule": self.defaults.rule,
            },
            "worker": self.worker.status(),
        }


def _gamma_text(gamma: int) -> int | str:
    return gamma if gamma else "auto"


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------------------------ the app
def create_app(
    worker: Worker,
    tokenizer: Any,
    model_name: str,
    *,
    context_length: int,
    vocab_size: int | None = None,
    backend: str = "torch",
    api_key: str | None = None,
    defaults: ServeDefaults | None = None,
) -> FastAPI:
    """The app over a started ``worker`` (see module docstring); its lifespan's end shuts the
    worker down. ``context_length``: the model's max_length (prompt + new tokens);
    ``vocab_size``: token ids a prompt list may hold; ``backend``: for the method check."""
    server = _Server(
        worker,
        tokenizer,
        model_name,
        context_length,
        vocab_size,
        backend,
        api_key,
        defaults or ServeDefaults(),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.shutdown, server.defaults.shutdown_timeout_s)

    app = FastAPI(
        title="hierspec", summary="Lossless speculative decoding, OpenAI-compatible", lifespan=lifespan
    )
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(list(err.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return ApiError(err.status_code, str(err.detail), None, code).response()

    auth = [Depends(server.authorize)]

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return server.models()

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await server.serve(request, body, "completion")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request, body: ChatCompletionRequest) -> Response:
        return await server.serve(request, body, "chat")

    @app.get("/health")
    async def health() -> JSONResponse:
        body = server.health()
        return JSONResponse(body, status_code=503 if body["worker"].get("alive") is False else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app
