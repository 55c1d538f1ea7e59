"""POST /v1/embeddings: texts and images (content parts, or data:image/ URLs as strings) in, CLIP
embeddings out, as float arrays or base64 of little-endian float32."""

from __future__ import annotations

import array
import base64
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from vlmcli.serve.image_urls import RemoteImage, fetch_remote, part_value
from vlmcli.serve.jobs import RunningJob, pool_for
from vlmcli.serve.schemas import EmbeddingsRequest
from vlmcli.serve.state import State

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(request: EmbeddingsRequest, state: State) -> JSONResponse:
    config = state.config
    model, pool = pool_for(config, request.model, "clip")
    items = [part_value(part, config, f"input[{i}]") for i, part in enumerate(request.input)]
    items = [(kind, await fetch_remote(v, config) if isinstance(v, RemoteImage) else v) for kind, v in items]
    running = RunningJob(pool, "embed", {"items": items}, config.timeout, image_param="input")
    result = await running.result()
    data = []
    for i, raw in enumerate(result["embeddings"]):
        value: Any
        if request.encoding_format == "base64":
            value = base64.b64encode(raw).decode("ascii")
        else:
            floats = array.array("f")
            floats.frombytes(raw)
            value = floats.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": result["tokens"], "total_tokens": result["tokens"]},
        }
    )
