"""From a route to a worker pool and back: the model a request names, and a submitted job whose
events (accepted, tokens, done, error) arrive on the event loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from vlmcli.serve.errors import ApiError, bad, job_error
from vlmcli.serve.state import ServeConfig
from vlmcli.serve.workers import Job, JobTimeout, ModelPool, QueueFull

KIND_NAMES = {
    "vlm": "a SmolVLM2 model (use it for /v1/chat/completions)",
    "clip": "a CLIP model (use it for /v1/embeddings)",
}


def pool_for(config: ServeConfig, model: str | None, kind: str) -> tuple[str, ModelPool]:
    """The model id and pool a request names; `model` may be left out when one model of the kind is served."""
    candidates = {m: p for m, p in config.pools.items() if p.spec.kind == kind}
    if not model:
        if len(candidates) == 1:
            return next(iter(candidates.items()))
        raise bad("'model' is required", "model")
    if model in candidates:
        return model, candidates[model]
    if model in config.pools:
        raise bad(f"model {model!r} is {KIND_NAMES[config.pools[model].spec.kind]}", "model", "wrong_model_kind")
    raise ApiError(
        404,
        f"the model {model!r} does not exist on this server (GET /v1/models lists them)",
        param="model",
        code="model_not_found",
    )


class RunningJob:
    """A job in a pool's queue or on a worker. `image_param` names the request's images in errors."""

    def __init__(self, pool: ModelPool, kind: str, payload: dict[str, Any], timeout: float, image_param: str):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.timeout, self.image_param = timeout, image_param

        def emit(event: tuple[Any, ...]) -> None:  # from a supervisor thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutting down)
                pass

        self.job = Job(kind, payload, emit, timeout)
        try:
            pool.submit(self.job)
        except QueueFull as e:
            raise job_error(e) from None

    def cancel(self) -> None:
        self.job.cancelled = True  # the worker checks it per token

    def error(self, exc: BaseException) -> ApiError:
        return job_error(exc, self.image_param)

    async def next_event(self) -> tuple[Any, ...]:
        try:
            # The supervisor enforces the deadline (and kills the worker); this is a backstop.
            remaining = max(0.1, self.job.deadline - time.monotonic())
            return await asyncio.wait_for(self.events.get(), timeout=remaining + 10)
        except asyncio.TimeoutError:
            self.cancel()
            return ("error", JobTimeout(f"the request took more than {self.timeout:g} s"))

    async def result(self) -> dict[str, Any]:
        while True:
            event = await self.next_event()
            if event[0] == "done":
                return event[1]
            if event[0] == "error":
                raise self.error(event[1])
