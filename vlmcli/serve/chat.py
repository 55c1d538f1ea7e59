"""POST /v1/chat/completions: a checked ChatRequest becomes a worker job (its images and videos, the turns,
the sampling options); its result an OpenAI completion, or server-sent chunks as it is generated."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vlmcli.defaults import DEFAULT_MAX_TOKENS
from vlmcli.serve.errors import bad
from vlmcli.serve.image_urls import RemoteImage, fetch_remote, part_value
from vlmcli.serve.jobs import RunningJob, pool_for
from vlmcli.serve.response import logprobs_content, response_options
from vlmcli.serve.schemas import ChatRequest
from vlmcli.serve.state import ServeConfig, State

router = APIRouter()

# OpenAI's roles -> the template's.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# "closed": a constrained answer completed inside max_tokens (a whole JSON value): it ended, it was not cut.
FINISH = {"eos": "stop", "length": "length", "stopped": "stop", "closed": "stop"}
# Far more than any context holds (each image is 64 tokens or more); bounds the work of a hostile request.
MAX_MEDIA = 256


def chat_job(request: ChatRequest, config: ServeConfig) -> dict[str, Any]:
    """The worker's job: the images and videos of every message in order ("media": [kind, bytes or a
    RemoteImage]), the turns (role, texts, where each item goes among them), the options. A request
    without any is a text-only prompt."""
    media: list[list[Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        texts: list[str] = []
        slots: list[list[Any]] = []
        for j, part in enumerate(message.content or []):
            where = f"messages[{i}].content[{j}]"
            kind, value = part_value(part, config, where, videos=True)
            if isinstance(value, str):
                texts.append(value)
                continue
            if len(media) >= MAX_MEDIA:
                raise bad(f"a request takes at most {MAX_MEDIA} images and videos", where, "too_many_images")
            media.append([kind, value])
            slots.append([len(texts), kind])  # before the texts that follow it
        turns.append({"role": ROLES[message.role], "parts": texts, "media": slots})
    if not any(t["role"] == "user" for t in turns):
        raise bad("the request has no user message", "messages")
    max_tokens = request.max_tokens or request.max_completion_tokens or DEFAULT_MAX_TOKENS
    return {
        "media": media,
        "turns": turns,
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "seed": request.seed or 0,
        "n": request.n or 1,
        "stream": bool(request.stream),
        "stop": request.stop or [],
        **response_options(request),  # response_format, logprobs; unsupported fields refused
    }


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatRequest, state: State) -> Response:
    config = state.config
    model, pool = pool_for(config, request.model, "vlm")
    job = chat_job(request, config)
    for item in job["media"]:
        if isinstance(item[1], RemoteImage):
            item[1] = await fetch_remote(item[1], config)
    running = RunningJob(pool, "chat", job, config.timeout, image_param="messages")
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    if not job["stream"]:
        return JSONResponse(completion(cid, model, await running.result()))
    first = await running.next_event()  # errors before the first token keep their status
    if first[0] == "error":
        raise running.error(first[1])
    return StreamingResponse(
        stream(cid, model, running, first, job["n"]),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def stream(cid: str, model: str, running: RunningJob, first: tuple[Any, ...], n: int) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI sends them; with n > 1 each chunk carries its choice's index
    (choice i is candidate i, sampled with seed + i: streamed choices are not reordered best first)."""
    created = int(time.time())

    def chunk(
        delta: dict[str, Any],
        index: int = 0,
        finish_reason: str | None = None,
        usage: dict[str, Any] | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        data: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if usage is not None:
            data["usage"] = usage
        return _sse(data)

    event = first
    try:
        for i in range(n):
            yield chunk({"role": "assistant", "content": ""}, i)
        while True:
            if event[0] == "token":
                yield chunk({"content": event[1]}, event[2] if len(event) > 2 else 0)
            elif event[0] == "done":
                ends = sorted(event[1]["choices"], key=lambda c: c.get("candidate", 0))
                for k, c in enumerate(ends):
                    last = k == len(ends) - 1
                    yield chunk(
                        {},
                        c.get("candidate", 0),
                        FINISH.get(c["stop_reason"], "stop"),
                        usage(event[1]) if last else None,
                        logprobs_content(c.get("logprobs")),  # the whole answer's, on its last chunk
                    )
                break
            elif event[0] == "error":
                yield _sse(running.error(event[1]).body())
                break
            event = await running.next_event()
        yield b"data: [DONE]\n\n"
    finally:
        running.cancel()  # a client that left stops its generation


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
                "logprobs": logprobs_content(c.get("logprobs")),
            }
            for i, c in enumerate(result["choices"])
        ],
        "usage": usage(result),
    }
