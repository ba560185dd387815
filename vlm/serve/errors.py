"""OpenAI's error JSON for every failure the server answers: ``{"error": {"message", "type", "param", "code"}}``.

Handlers raise :class:`APIError`; :func:`install` makes FastAPI answer its own errors (unknown route, wrong method,
request validation) in the same shape instead of its default ``{"detail": ...}``.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An HTTP error answered as OpenAI's error object. ``status``: the HTTP code; ``type``: OpenAI's error type
    (``invalid_request_error``, ``authentication_error``, ``not_found_error``, ``server_error``); ``param``: the request
    field at fault (``None``: the request as a whole); ``code``: a short machine-readable reason; ``headers``: extra
    response headers (``Retry-After`` of a 503)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, why: str) -> APIError:
    """400 for an OpenAI parameter this server does not implement, naming it."""
    return APIError(400, f"{param}: {why} is not supported by vlm.serve", param=param, code="unsupported_parameter")


_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error"}


def install(app: FastAPI) -> None:
    """Answer ``APIError``, Starlette's HTTP errors, FastAPI's validation errors and anything unexpected (500) in
    OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        err = APIError(e.status_code, str(e.detail), type=_HTTP_TYPES.get(e.status_code, "invalid_request_error"),
                       code=f"http_{e.status_code}", headers=dict(e.headers or {}))
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return bad_request(f"{param}: {first.get('msg', 'invalid request')}", param=param).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                        code="internal_error").response()
