"""Request models of ``POST /v1/chat/completions`` (pydantic) and the checks OpenAI's schema alone does not make:
parameters this server does not implement (400 naming them), bounds on ``stop`` and ``max_tokens``.

Unknown parameters are refused (as OpenAI refuses them) except a few that change nothing here (``user``,
``metadata``, ``store``, ``service_tier``, ``stream_options``' other keys).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlm.serve.errors import APIError, bad_request, unsupported

#: At most this many stop strings (OpenAI: 4), each at most ``MAX_STOP_CHARS`` characters.
MAX_STOP, MAX_STOP_CHARS = 16, 256
#: Accepted and ignored: they change nothing about a reply.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    """One chat message: ``content`` a string or a list of text / image_url parts (other part types are refused)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The parameters ``vlm.serve`` implements; anything else lands in ``model_extra`` and is checked by
    :func:`parse_request`."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


def _refuse_unimplemented(req: ChatRequest) -> None:
    if req.n is not None and req.n > 1:
        raise unsupported("n", f"n={req.n} (several choices per request)")
    if req.logprobs or req.top_logprobs:
        raise unsupported("logprobs" if req.logprobs else "top_logprobs", "returning log probabilities")
    for name in ("tools", "tool_choice", "functions", "function_call"):
        if getattr(req, name) not in (None, [], "none"):
            raise unsupported(name, "tool / function calling")
    if req.response_format is not None and req.response_format.get("type") not in (None, "text"):
        raise unsupported("response_format", f"response_format type {req.response_format.get('type')!r}")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise unsupported(name, f"{name}={getattr(req, name)}")
    if req.logit_bias:
        raise unsupported("logit_bias", "logit_bias")
    for name in (req.model_extra or {}):
        if name not in IGNORED:
            raise APIError(400, f"unrecognized request argument supplied: {name!r}", param=name,
                           code="unknown_parameter")


def _check_stop(req: ChatRequest) -> None:
    stop = req.stop_strings()
    if len(stop) > MAX_STOP:
        raise bad_request(f"stop: {len(stop)} stop strings given; at most {MAX_STOP} are accepted", param="stop")
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise bad_request(f"stop[{i}]: a stop string must have 1 to {MAX_STOP_CHARS} characters; got "
                              f"{len(s)}", param="stop")


def parse_request(data: Any) -> ChatRequest:
    """A decoded JSON body -> ``ChatRequest``; ``APIError`` 400 naming the field for anything invalid or not
    implemented."""
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object; got {type(data).__name__}")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']} (got {str(first.get('input'))[:80]!r})", param=param) from None
    _refuse_unimplemented(req)
    _check_stop(req)
    return req
