"""What every request goes through before a route: metrics, the API key, the body size cap.
Plain ASGI: each sees the response start (its status) and may answer without calling the app."""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmcli.serve.errors import ApiError
from vlmcli.serve.metrics import ServerMetrics


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The route template a request matched, or "other": metrics labels stay a fixed set whatever
    paths clients send."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE and isinstance(route, Route):
            return route.path
    return "other"


class ObserveRequests:
    """Counts each request by route and status, and times it to its response's start."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Sequence[BaseRoute]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            if not observed:
                observed = True
                self.metrics.observe(route_label(self.routes, scope), status, time.perf_counter() - t0)

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            observe(500)  # no response started: the app raised (the error handler answers 500)


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (the scheme is case-insensitive, RFC 7235)."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class RequireApiKey:
    """401 for /v1/ requests without `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            token = bearer_token(Headers(scope=scope).get("authorization", ""))
            if token is None or not hmac.compare_digest(token.encode(), self.key):
                error = ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LimitBody:
    """413 for a request body over `max_body` bytes: from its Content-Length before reading it, or
    once that many bytes have come (a chunked body). The body is read here and handed on whole."""

    def __init__(self, app: ASGIApp, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()  # after the body: the disconnect a streaming response waits for
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(
            413, f"the request body is over {self.max_body:,} bytes (vlm serve --max-body)", code="body_too_large"
        )
        await error.response()(scope, receive, send)
