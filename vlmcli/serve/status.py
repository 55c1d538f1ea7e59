"""GET /health (the workers), /metrics (Prometheus) and /v1/models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from vlmcli.serve.state import State

router = APIRouter()


@router.get("/health")
async def health(state: State) -> dict[str, Any]:
    return {
        "status": "ok",
        "models": {
            m: {
                "kind": p.spec.kind,
                "queue": p.queue_depth,
                "restarts": p.restarts,
                "workers": [
                    {"pid": w.pid, "alive": w.alive, "busy": w.current is not None, "restarts": w.restarts}
                    for w in p.workers
                ],
            }
            for m, p in state.config.pools.items()
        },
    }


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": state.started, "owned_by": "vlmcli", "kind": p.spec.kind}
            for m, p in state.config.pools.items()
        ],
    }
