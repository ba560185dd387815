"""The FastAPI app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

A request is read (at most ``--max-body-mb``: 413 beyond), parsed (``schema``), its images opened (``images``) and
its prompt built exactly as ``model.chat`` builds it (``vlm.inference.chat.prompt_item`` with the model's processor
and image placement), then queued (``scheduler``). ``max_tokens`` (or ``max_completion_tokens``; default
``default_max_tokens``) is clamped to the room left in the context window: a reply that fills it ends with
``finish_reason: "length"``. A prompt with no room left is a 400 (``context_length_exceeded``).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from vlm.serve.errors import APIError, bad_request, install
from vlm.serve.images import ImagePolicy
from vlm.serve.messages import convert
from vlm.serve.scheduler import Job, Overloaded, Scheduler
from vlm.serve.schema import ChatRequest, parse_request


@dataclass
class ServeConfig:
    """Server settings (``python -m vlm.serve --help``)."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 20 * 2**20
    default_max_tokens: int = 128
    images: ImagePolicy = None  # type: ignore[assignment]
    retry_after_s: int = 1


def context_limit(model: Any) -> int | None:
    """The LLM's context window in tokens (``max_position_embeddings``), ``None`` when its config has none."""
    return getattr(getattr(model.llm.model, "config", None), "max_position_embeddings", None)


def create_app(model: Any, processor: Any, scheduler: Scheduler, cfg: ServeConfig) -> FastAPI:
    """The app around an opened model (eval mode), its chat ``processor`` and a started ``scheduler``."""
    from vlm.data.errors import DataError
    from vlm.inference.chat import image_placement, prompt_item

    app = FastAPI(title="vlm.serve", docs_url=None, redoc_url=None, openapi_url=None)
    install(app)
    cfg.images = cfg.images or ImagePolicy()
    placement = image_placement(model, processor)
    limit = context_limit(model)
    prepare_lock = threading.Lock()   # one tokenizer: prompts are built one at a time
    created = int(time.time())

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>' (the server was "
                           "started with --api-key)", type="invalid_request_error", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "incorrect API key provided", type="invalid_request_error", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"request body larger than --max-body-mb ({cfg.max_body_bytes / 2**20:g} MB)",
                           code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            async for _ in request.stream():   # drained, not kept: the client gets the 413, not a reset
                pass
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= cfg.max_body_bytes:
                chunks.append(chunk)
        if size > cfg.max_body_bytes:
            raise too_big
        return b"".join(chunks)

    def prepare(req: ChatRequest) -> tuple[dict[str, Any], int]:
        """``(processed prompt, max new tokens)``; raises ``APIError`` 400 for bad input."""
        history, images, text = convert(req.messages, cfg.images)
        try:
            with prepare_lock:
                item, _ = prompt_item(processor, history, images or None, text, sample_id="request",
                                      placement=placement)
        except (DataError, ValueError) as e:
            raise bad_request(f"messages: {e}", param="messages") from None
        n = int(item["input_ids"].numel())
        asked = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
        room = (limit - n) if limit is not None else asked
        if room < 1:
            raise bad_request(f"messages: the prompt has {n} tokens, which leaves no room in the model's context "
                              f"window of {limit} tokens; shorten the conversation or use fewer / smaller images",
                              param="messages", code="context_length_exceeded")
        return item, min(asked, room)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": cfg.model_name, **scheduler.snapshot()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": created,
                                            "owned_by": "vlm"}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Any:
        check_key(request)
        body = await read_body(request)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        req = parse_request(data)
        if req.model != cfg.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {cfg.model_name!r} "
                           f"(GET /v1/models)", type="not_found_error", param="model", code="model_not_found")
        sampling: dict[str, Any] = {}
        if req.temperature not in (None, 0) or req.top_p is not None and req.temperature != 0:
            sampling = {"do_sample": True, **({"temperature": req.temperature} if req.temperature else {}),
                        **({"top_p": req.top_p} if req.top_p is not None else {})}
        scheduler.arrive()   # a batch about to start waits (briefly) for this request's prompt
        try:
            item, budget = await asyncio.to_thread(prepare, req)
            job = Job(item, budget, sampling, req.stop_strings(), req.seed, req.stream, asyncio.get_running_loop(),
                      asyncio.Queue())
            scheduler.submit(job)
        except Overloaded as e:
            raise APIError(503, f"server busy: {e}; retry after {cfg.retry_after_s} s", type="server_error",
                           code="server_overloaded", headers={"Retry-After": str(cfg.retry_after_s)}) from None
        finally:
            scheduler.arrived()
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": cfg.model_name}
        usage = {"prompt_tokens": int(item["input_ids"].numel())}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(job, meta, usage, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            text, finish, completion = await wait_done(job, request)
        except BaseException:
            scheduler.cancel(job)
            raise
        return JSONResponse({**meta, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "logprobs": None, "finish_reason": finish}],
                             "usage": totals(usage, completion)})

    async def wait_done(job: Job, request: Request) -> tuple[str, str, int]:
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected", code="client_disconnected") from None
                continue
            if kind == "done":
                return payload
            if kind == "error":
                raise APIError(500, payload, type="server_error", code="generation_failed")

    async def stream(job: Job, meta: dict[str, Any], usage: dict[str, int], include_usage: bool
                     ) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, payload = await job.events.get()
                if kind == "delta":
                    yield chunk({"content": payload})
                elif kind == "done":
                    _, finish, completion = payload
                    yield chunk({}, finish)
                    if include_usage:
                        yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [], 'usage': totals(usage, completion)})}\n\n"
                    break
                else:
                    yield f"data: {json.dumps(APIError(500, payload, type='server_error').body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not job.released:
                scheduler.cancel(job)   # the client went away mid-stream: its row ends, its slot is freed

    return app


def totals(usage: dict[str, int], completion: int) -> dict[str, int]:
    return {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}
