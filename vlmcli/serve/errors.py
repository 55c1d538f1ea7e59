"""OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, for every failure the server
answers: request checks, worker outcomes, routing, validation by the request models, and bugs."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmcli.serve.workers import JobFailed, JobTimeout, QueueFull, WorkerDied


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def job_error(exc: BaseException, image_param: str = "messages") -> ApiError:
    """A worker-side failure as an OpenAI error; an image the worker cannot decode is named by the
    worker's param (an embeddings input item) or else by `image_param`."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, JobTimeout):
        return ApiError(504, str(exc), "timeout_error", code="timeout")
    if isinstance(exc, WorkerDied):
        return ApiError(503, str(exc), "server_error", code="worker_died")
    if isinstance(exc, JobFailed):
        if exc.kind == "image":
            return bad(exc.message, exc.param or image_param, "invalid_image")
        if exc.kind == "option":
            return bad(exc.message, exc.param)
        if exc.kind == "context":
            return bad(exc.message, exc.param or "messages", "context_length_exceeded")
        return ApiError(500, exc.message, "server_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def param_name(loc: tuple[int | str, ...]) -> str | None:
    """A validation error's location as OpenAI names a field: ("messages", 4, "role") -> messages[4].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or None


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first error a request model found, worded as the server's own checks are."""
    errors = exc.errors()
    if not errors:
        return bad("invalid request")
    first: dict[str, Any] = dict(errors[0])
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", first["msg"])
        return bad(f"the request body is not valid JSON ({reason})", code="invalid_json")
    loc = tuple(first["loc"])
    loc = loc[1:] if loc[:1] == ("body",) else loc
    if not loc:  # the body itself: not an object, or not sent as JSON (Content-Type)
        return bad("the request body must be a JSON object (Content-Type: application/json)", code="invalid_json")
    param = param_name(loc)
    return bad(f"{param}: {first['msg']}", param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()
