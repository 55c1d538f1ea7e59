"""The HTTP front end of `vlm serve`: OpenAI's API in, jobs for the worker pools (workers.py) out.

A thin translator, as the CLI and the C library are. The request models (schemas.py) check types and
shapes; the routes (chat.py, embeddings.py, status.py) check what needs the server's settings and
turn results into OpenAI responses; every failure leaves in OpenAI's error shape with its HTTP status
(errors.py). FastAPI is imported only by this package, and this package only by the serve command.
"""

from __future__ import annotations

from fastapi import FastAPI

from vlmcli.serve import chat, embeddings, search, status
from vlmcli.serve.errors import install_error_handlers
from vlmcli.serve.metrics import ServerMetrics
from vlmcli.serve.middleware import LimitBody, ObserveRequests, RequireApiKey
from vlmcli.serve.state import ServeConfig, ServerState

__all__ = ["ServeConfig", "create_app"]


def create_app(config: ServeConfig) -> FastAPI:
    app = FastAPI(title="vlm serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(config.pools)
    app.state.server = ServerState(config, metrics)
    routers = (status.router, chat.router, embeddings.router, search.router)
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    # The last added runs first: metrics see every request, the key is checked before a body is read.
    app.add_middleware(LimitBody, max_body=config.max_body)
    if config.api_key:
        app.add_middleware(RequireApiKey, key=config.api_key)
    app.add_middleware(ObserveRequests, metrics=metrics, routes=[r for router in routers for r in router.routes])
    return app
