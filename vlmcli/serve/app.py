"""The HTTP front end of `vlm serve`: OpenAI's API in, jobs for the worker pools (workers.py) out.

A thin translator, as the CLI and the C library are: requests are parsed and checked here (JSON,
types, image URLs, sizes) and become jobs; results and vlmcli errors become OpenAI responses and
OpenAI's error shape {"error": {"message", "type", "param", "code"}} with the HTTP status.
FastAPI is imported only here, and this module only by the serve command.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmcli.serve.workers import Job, JobFailed, JobTimeout, ModelPool, QueueFull, WorkerDied

DEFAULT_MAX_TOKENS = 256  # tasks.ask.DEFAULT_ASK_MAX_TOKENS (not imported: it would load the tasks here)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, math.inf)


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


def job_error(exc: BaseException) -> ApiError:
    """A worker-side failure as an OpenAI error."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, JobTimeout):
        return ApiError(504, str(exc), "timeout_error", code="timeout")
    if isinstance(exc, WorkerDied):
        return ApiError(503, str(exc), "server_error", code="worker_died")
    if isinstance(exc, JobFailed):
        if exc.kind == "image":
            return bad(exc.message, "messages", "invalid_image")
        if exc.kind == "option":
            return bad(exc.message, exc.param)
        if exc.kind == "context":
            return bad(exc.message, "messages", "context_length_exceeded")
        if exc.kind == "internal":
            return ApiError(500, exc.message, "server_error")
        return ApiError(500, exc.message, "server_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


@dataclass
class ServeConfig:
    pools: dict[str, ModelPool]  # model id -> its workers
    timeout: float = 300.0  # seconds a request may take, queueing included
    max_body: int = 32 * 1024 * 1024
    allow_files: Path | None = None
    allow_remote_images: bool = False
    api_key: str | None = None


@dataclass
class Metrics:
    """Prometheus counters kept in the server process (one process: plain dicts suffice)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    latency: dict[str, list[int]] = field(default_factory=dict)  # route -> bucket counts
    latency_sum: dict[str, float] = field(default_factory=dict)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        counts = self.latency.setdefault(route, [0] * len(LATENCY_BUCKETS))
        for i, b in enumerate(LATENCY_BUCKETS):
            if seconds <= b:
                counts[i] += 1
        self.latency_sum[route] = self.latency_sum.get(route, 0.0) + seconds

    def render(self, pools: dict[str, ModelPool]) -> str:
        out = ["# HELP vlm_requests_total HTTP requests by route and status.", "# TYPE vlm_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'vlm_requests_total{{route="{route}",status="{status}"}} {n}')
        out += ["# HELP vlm_request_duration_seconds Request latency.", "# TYPE vlm_request_duration_seconds histogram"]
        for route, counts in sorted(self.latency.items()):
            for b, n in zip(LATENCY_BUCKETS, counts):
                le = "+Inf" if b == math.inf else f"{b:g}"
                out.append(f'vlm_request_duration_seconds_bucket{{route="{route}",le="{le}"}} {n}')
            out.append(f'vlm_request_duration_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
            out.append(f'vlm_request_duration_seconds_count{{route="{route}"}} {counts[-1]}')
        out += ["# HELP vlm_queue_depth Requests waiting for a worker.", "# TYPE vlm_queue_depth gauge"]
        out += [f'vlm_queue_depth{{model="{m}"}} {p.queue_depth}' for m, p in pools.items()]
        out += ["# HELP vlm_workers_busy Workers running a request.", "# TYPE vlm_workers_busy gauge"]
        out += [f'vlm_workers_busy{{model="{m}"}} {p.busy}' for m, p in pools.items()]
        out += [
            "# HELP vlm_worker_restarts_total Worker processes restarted after dying.",
            "# TYPE vlm_worker_restarts_total counter",
        ]
        out += [f'vlm_worker_restarts_total{{model="{m}"}} {p.restarts}' for m, p in pools.items()]
        out += [
            "# HELP vlm_encoder_passes_total Vision encoder passes of completed requests (SmolVLM2 tiles + overview, CLIP images).",
            "# TYPE vlm_encoder_passes_total counter",
        ]
        out += [f'vlm_encoder_passes_total{{model="{m}"}} {p.encoder_passes}' for m, p in pools.items()]
        return "\n".join(out) + "\n"


# ---- request parsing -------------------------------------------------------------------------


def _want(obj: dict[str, Any], key: str, types: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise bad(f"'{key}' must be {what}", key)
    return value


def decode_data_url(url: str, param: str) -> bytes:
    """data:[<type>][;base64],<data> -> bytes (base64 only: images are binary)."""
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise bad("malformed data: URL (expected data:image/...;base64,...)", param, "invalid_image_url")
    if not head.endswith(";base64"):
        raise bad("data: URLs of images must be base64-encoded (data:image/png;base64,...)", param, "invalid_image_url")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad("the data: URL is not valid base64", param, "invalid_image_url") from None


def image_bytes(url: Any, config: ServeConfig, param: str) -> bytes | RemoteImage:
    """The bytes an image_url names: a data: URL, or a file under --allow-files; an http(s) URL (only
    with --allow-remote-images) comes back as a RemoteImage for the route to fetch off the event loop."""
    if not isinstance(url, str) or not url:
        raise bad("image_url.url must be a non-empty string", param)
    lower = url[:16].lower()
    if lower.startswith("data:"):
        return decode_data_url(url, param)
    if lower.startswith(("http://", "https://")):
        if not config.allow_remote_images:
            raise bad(
                "remote image URLs are refused by this server (start it with --allow-remote-images); send the image as a data: URL",
                param,
                "remote_image_refused",
            )
        return RemoteImage(url, param)
    path_text = url[7:] if lower.startswith("file://") else url
    if config.allow_files is None:
        raise bad(
            "local image paths are refused by this server (start it with --allow-files DIR); send the image as a data: URL",
            param,
            "local_image_refused",
        )
    root = config.allow_files.resolve()
    try:
        path = (root / path_text).resolve()
    except (OSError, ValueError, RuntimeError):
        raise bad("invalid image path", param, "invalid_image_url") from None
    if path != root and root not in path.parents:
        raise bad(f"image paths must lie under {root}", param, "local_image_refused")
    try:
        with open(path, "rb") as f:
            return f.read(config.max_body + 1)
    except OSError as e:
        raise bad(f"cannot read image file ({e.strerror or e})", param, "invalid_image_url") from None


def content_part(part: Any, config: ServeConfig, where: str) -> tuple[str, Any]:
    """("text", str) or ("image", bytes | RemoteImage) for an OpenAI content part (chat messages, and
    embeddings' input items)."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise bad(f"{where} must be an object with a 'type'", where)
    if part["type"] == "text":
        if not isinstance(part.get("text"), str):
            raise bad(f"{where}.text must be a string", where)
        if not _is_unicode(part["text"]):
            raise bad(f"{where}.text is not valid Unicode (a lone surrogate)", where)
        return "text", part["text"]
    if part["type"] == "image_url":
        iu = part.get("image_url")
        return "image", image_bytes(iu.get("url") if isinstance(iu, dict) else iu, config, where)
    raise bad(f"{where}: content type {part['type']!r} is not supported (text, image_url)", where)


@dataclass
class RemoteImage:
    """An http(s) image_url, fetched by the route (remote.py) once the request is parsed."""

    url: str
    param: str


# OpenAI's roles -> the template's ("developer" is OpenAI's newer name for system instructions).
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_chat(body: dict[str, Any], config: ServeConfig) -> dict[str, Any]:
    """An OpenAI chat request -> a worker job: the image, the turns (role, texts, where the image is), options."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array", "messages")
    image: bytes | RemoteImage | None = None
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        if m["role"] not in ROLES:
            raise bad(
                f"messages[{i}].role {m['role']!r} is not supported (system, developer, user, assistant)",
                f"messages[{i}].role",
            )
        content = m.get("content")
        parts: list[Any]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        elif content is None and m["role"] != "user":
            parts = []
        else:
            raise bad(f"messages[{i}].content must be a string or an array of content parts", f"messages[{i}].content")
        texts: list[str] = []
        image_at: int | None = None
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            kind, value = content_part(part, config, where)
            if kind == "text":
                texts.append(value)
            else:
                if image is not None:
                    raise bad("this server takes one image per request", where, "too_many_images")
                image = value
                image_at = len(texts)  # the image goes before the texts that follow it
        turns.append({"role": ROLES[m["role"]], "parts": texts, "image_at": image_at})
    if image is None:
        raise bad(
            "the request has no image: SmolVLM2 answers about one image (an image_url content part)",
            "messages",
            "missing_image",
        )
    if not any(t["role"] == "user" for t in turns):
        raise bad("the request has no user message", "messages")
    max_tokens = _want(body, "max_completion_tokens", (int,), "an integer", None)
    max_tokens = _want(body, "max_tokens", (int,), "an integer", max_tokens)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise bad("'max_tokens' must be at least 1", "max_tokens")
    temperature = _want(body, "temperature", (int, float), "a number", None)
    if temperature is not None and not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise bad("'temperature' must be between 0 and 2", "temperature")
    top_p = _want(body, "top_p", (int, float), "a number", 1.0)
    if not (0 < top_p <= 1):
        raise bad("'top_p' must be more than 0 and at most 1", "top_p")
    seed = _want(body, "seed", (int,), "an integer", 0)
    n = _want(body, "n", (int,), "an integer", 1)
    if n < 1:
        raise bad("'n' must be at least 1", "n")
    stream = _want(body, "stream", (bool,), "a boolean", False)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise bad("'stop' must be a string or an array of at most 4 non-empty strings", "stop")
    return {
        "image": image,
        "turns": turns,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": float(top_p),
        "seed": seed,
        "n": n,
        "stream": stream,
        "stop": stop,
    }


def _is_unicode(text: str) -> bool:
    """False for a lone surrogate (JSON's \\ud800 escapes make them): it cannot be tokenized."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_embeddings(body: dict[str, Any], config: ServeConfig) -> tuple[list[tuple[str, Any]], str]:
    items = body.get("input")
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        raise bad("'input' must be a string or a non-empty array of strings and content parts", "input")
    out: list[tuple[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, dict):  # a content part, as in chat: an image by URL or path, or a text
            out.append(content_part(item, config, f"input[{i}]"))
        elif not isinstance(item, str):
            raise bad(f"input[{i}] must be a string or a content part (token arrays are not supported)", "input")
        elif item[:11].lower().startswith("data:image/"):
            out.append(("image", decode_data_url(item, "input")))
        else:
            out.append(("text", item))
    fmt = _want(body, "encoding_format", (str,), "'float' or 'base64'", "float")
    if fmt not in ("float", "base64"):
        raise bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad("'dimensions' is not supported: CLIP embeddings have the model's size", "dimensions")
    return out, fmt


# ---- the app ---------------------------------------------------------------------------------


def create_app(config: ServeConfig) -> FastAPI:
    app = FastAPI(title="vlm serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    created = int(time.time())

    def pool_for(body: dict[str, Any], kind: str) -> tuple[str, ModelPool]:
        model = body.get("model")
        candidates = {m: p for m, p in config.pools.items() if p.spec.kind == kind}
        if model is None or model == "":
            if len(candidates) == 1:
                return next(iter(candidates.items()))
            raise bad("'model' is required", "model")
        if not isinstance(model, str):
            raise bad("'model' must be a string", "model")
        if model in candidates:
            return model, candidates[model]
        if model in config.pools:
            what = (
                "a CLIP model (use it for /v1/embeddings)"
                if kind == "vlm"
                else "a SmolVLM2 model (use it for /v1/chat/completions)"
            )
            raise bad(f"model {model!r} is {what}", "model", "wrong_model_kind")
        raise ApiError(
            404,
            f"the model {model!r} does not exist on this server (GET /v1/models lists them)",
            param="model",
            code="model_not_found",
        )

    async def read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body:
            raise ApiError(
                413, f"the request body is over {config.max_body:,} bytes (vlm serve --max-body)", code="body_too_large"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body:
                raise ApiError(
                    413,
                    f"the request body is over {config.max_body:,} bytes (vlm serve --max-body)",
                    code="body_too_large",
                )
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object", code="invalid_json")
        return body

    def submit(pool: ModelPool, kind: str, payload: dict[str, Any]) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:  # from a supervisor thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutting down)
                pass

        job = Job(kind, payload, emit, config.timeout)
        pool.submit(job)
        return job, events

    async def next_event(job: Job, events: asyncio.Queue) -> tuple:
        try:
            # The supervisor enforces the deadline (and kills the worker); this is a backstop.
            return await asyncio.wait_for(events.get(), timeout=max(0.1, job.deadline - time.monotonic()) + 10)
        except asyncio.TimeoutError:
            job.cancelled = True
            return ("error", JobTimeout(f"the request took more than {config.timeout:g} s"))

    async def finish(job: Job, events: asyncio.Queue) -> dict[str, Any]:
        while True:
            ev = await next_event(job, events)
            if ev[0] == "done":
                return ev[1]
            if ev[0] == "error":
                raise job_error(ev[1])

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        if config.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {config.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                response: Response = ApiError(
                    401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key"
                ).response()
                metrics.observe(request.url.path, 401, time.perf_counter() - t0)
                return response
        try:
            response = await call_next(request)
        except ApiError as e:
            response = e.response()
        route = request.url.path if request.url.path in KNOWN_ROUTES else "other"
        metrics.observe(route, response.status_code, time.perf_counter() - t0)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": {
                m: {
                    "kind": p.spec.kind,
                    "queue": p.queue_depth,
                    "restarts": p.restarts,
                    "workers": [
                        {"pid": w.pid, "busy": w.current is not None, "restarts": w.restarts} for w in p.workers
                    ],
                }
                for m, p in config.pools.items()
            },
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(config.pools), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": created, "owned_by": "vlmcli", "kind": p.spec.kind}
                for m, p in config.pools.items()
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await read_json(request)
        model, pool = pool_for(body, "vlm")
        payload = parse_chat(body, config)
        if isinstance(payload["image"], RemoteImage):
            payload["image"] = await fetch_remote(payload["image"])
        try:
            job, events = submit(pool, "chat", payload)
        except QueueFull as e:
            raise job_error(e) from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if not payload["stream"]:
            result = await finish(job, events)
            return JSONResponse(completion(cid, model, result))
        first = await next_event(job, events)  # errors before the first token keep their status
        if first[0] == "error":
            raise job_error(first[1])
        return StreamingResponse(
            stream(cid, model, job, events, first, payload["n"]),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def fetch_remote(image: RemoteImage) -> bytes:
        from vlmcli.serve.remote import FETCH_TIMEOUT, FetchError, fetch_image

        timeout = min(FETCH_TIMEOUT, config.timeout)
        try:
            # The fetch keeps its own deadline between reads; this one also bounds connecting and the headers.
            return await asyncio.wait_for(
                asyncio.to_thread(fetch_image, image.url, config.max_body, timeout), timeout + 1
            )
        except FetchError as e:
            raise bad(e.message, image.param, e.code) from None
        except asyncio.TimeoutError:
            raise bad(
                f"fetching the image URL took more than {timeout:g} s", image.param, "invalid_image_url"
            ) from None

    async def stream(
        cid: str, model: str, job: Job, events: asyncio.Queue, first: tuple, n: int
    ) -> AsyncIterator[bytes]:
        """Server-sent events as OpenAI sends them; with n > 1 each chunk carries its choice's index
        (choice i is candidate i, sampled with seed + i: streamed choices are not reordered best first)."""
        created_at = int(time.time())

        def chunk(
            delta: dict[str, Any], index: int = 0, finish_reason: str | None = None, usage: dict[str, Any] | None = None
        ) -> bytes:
            data: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created_at,
                "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
            }
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

        ev = first
        try:
            for i in range(n):
                yield chunk({"role": "assistant", "content": ""}, i)
            while True:
                if ev[0] == "token":
                    yield chunk({"content": ev[1]}, ev[2] if len(ev) > 2 else 0)
                elif ev[0] == "done":
                    ends = sorted(ev[1]["choices"], key=lambda c: c.get("candidate", 0))
                    for k, c in enumerate(ends):
                        last = k == len(ends) - 1
                        yield chunk(
                            {},
                            c.get("candidate", 0),
                            FINISH.get(c["stop_reason"], "stop"),
                            usage(ev[1]) if last else None,
                        )
                    break
                elif ev[0] == "error":
                    yield f"data: {json.dumps(job_error(ev[1]).body(), ensure_ascii=False)}\n\n".encode()
                    break
                ev = await next_event(job, events)
            yield b"data: [DONE]\n\n"
        finally:
            job.cancelled = True  # a client that left stops its generation (the worker checks it per token)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await read_json(request)
        model, pool = pool_for(body, "clip")
        items, fmt = parse_embeddings(body, config)
        items = [(kind, await fetch_remote(v) if isinstance(v, RemoteImage) else v) for kind, v in items]
        try:
            job, events = submit(pool, "embed", {"items": items})
        except QueueFull as e:
            raise job_error(e) from None
        result = await finish(job, events)
        data = []
        for i, raw in enumerate(result["embeddings"]):
            if fmt == "base64":
                value: Any = base64.b64encode(raw).decode("ascii")
            else:
                import array

                a = array.array("f")
                a.frombytes(raw)
                value = a.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": result["tokens"], "total_tokens": result["tokens"]},
            }
        )

    return app


KNOWN_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/embeddings"}
FINISH = {"eos": "stop", "length": "length", "stopped": "stop"}


def usage(result: dict[str, Any]) -> dict[str, int]:
    t = result["tokens"]
    completion_tokens = sum(int(c["generated_tokens"] or 0) for c in result["choices"])
    return {
        "prompt_tokens": int(t["prompt"]),
        "completion_tokens": completion_tokens,
        "total_tokens": int(t["prompt"]) + completion_tokens,
    }


def completion(cid: str, model: str, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": FINISH.get(c["stop_reason"], "stop"),
                "logprobs": None,
            }
            for i, c in enumerate(result["choices"])
        ],
        "usage": usage(result),
    }
