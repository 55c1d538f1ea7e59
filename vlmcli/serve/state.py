"""What the routes share: the server's settings and pools, its metrics, and the dependency that
hands them to a route."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from vlmcli.serve.metrics import ServerMetrics
from vlmcli.serve.workers import ModelPool


@dataclass
class ServeConfig:
    pools: dict[str, ModelPool]  # model id -> its workers
    timeout: float = 300.0  # seconds a request may take, queueing included
    max_body: int = 32 * 1024 * 1024
    allow_files: Path | None = None
    allow_remote_images: bool = False
    api_key: str | None = None
    index: Path | None = None  # `--index`: the photo index POST /v1/search ranks (vlmcli/index)


@dataclass
class ServerState:
    config: ServeConfig
    metrics: ServerMetrics
    started: int = field(default_factory=lambda: int(time.time()))  # the models' `created`


def server_state(request: Request) -> ServerState:
    state = request.app.state.server
    assert isinstance(state, ServerState)
    return state


State = Annotated[ServerState, Depends(server_state)]
