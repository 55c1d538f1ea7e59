"""POST /v1/search: `vlm search` as JSON, over the index `vlm serve --index FILE` names.

    {"query": "dog + beach - night", "images": ["data:image/jpeg;base64,..."], "n": 20,
     "in": ["/photos/2024"], "since": "2024-06-01", "until": null, "model": "clip-vit-base-patch32"}
    -> {"object": "list", "model": ..., "data": [{"path", "score", "model"[, "clip_score", "text_score", "caption"]}]}

The query's texts and images are embedded by the CLIP model's workers (the /v1/embeddings job);
the ranking runs here, exactly as the CLI's (vlmcli.index.search), on one open index at a time.
"""

from __future__ import annotations

import array
import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from vlmcli.errors import VlmError
from vlmcli.index.db import IndexDB, IndexLocked, ModelRef, is_locked
from vlmcli.index.search import Filters, Searcher, Term, date_ns, parse_query
from vlmcli.serve.errors import ApiError, bad
from vlmcli.serve.image_urls import RemoteImage, fetch_remote, image_source
from vlmcli.serve.jobs import RunningJob, pool_for
from vlmcli.serve.state import ServeConfig, State

router = APIRouter()


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    query: StrictStr = ""
    images: list[StrictStr] = Field(default_factory=list, max_length=8)
    n: StrictInt = Field(20, ge=1, le=1000)
    folders: list[StrictStr] = Field(default_factory=list, alias="in")
    since: StrictStr | None = None
    until: StrictStr | None = None
    model: StrictStr | None = None


class _Embedded:
    """The query's vectors, already computed by the workers, as index.search.QueryEncoder."""

    def __init__(self, model: ModelRef, texts: np.ndarray, images: np.ndarray):
        self._model, self._texts, self._images = model, texts, images

    @property
    def model(self) -> ModelRef:
        return self._model

    def texts(self, texts: list[str]) -> np.ndarray:
        return self._texts[: len(texts)]

    def images(self, images: list[str | bytes]) -> np.ndarray:
        return self._images[: len(images)]


class _OpenIndex:
    """The served index, opened once; searches run one at a time in a thread (SQLite, numpy)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self._db: IndexDB | None = None
        self._models: dict[str, ModelRef] = {}
        self._searchers: dict[str, Searcher] = {}  # by model hash: each keeps its rows between requests

    def db(self) -> IndexDB:
        if self._db is None:
            self._db = IndexDB(self.path, create=False)
        return self._db

    def model(self, model_spec: str) -> ModelRef:
        """The served CLIP model as the index knows it (name + file hash, remembered per file state)."""
        if model_spec not in self._models:
            from vlmcli.tasks.index import check_model_in_index, clip_model_file, model_ref
            from vlmcli.tasks.models import ModelSpec

            name, path = clip_model_file(ModelSpec(model_spec, offline=True))
            ref = model_ref(self.db(), name, path)
            check_model_in_index(self.db(), ref)
            self._models[model_spec] = ref
        return self._models[model_spec]

    def searcher(self, encoder: _Embedded) -> Searcher:
        searcher = self._searchers.get(encoder.model.hash)
        if searcher is None:
            searcher = self._searchers[encoder.model.hash] = Searcher(self.db(), encoder)
        searcher.encoder = encoder  # this request's vectors
        return searcher


_indexes: dict[Path, _OpenIndex] = {}
_indexes_lock = threading.Lock()


def _open(path: Path) -> _OpenIndex:
    with _indexes_lock:
        return _indexes.setdefault(path, _OpenIndex(path))


def _date_ns(value: str | None, param: str) -> int | None:
    if value is None:
        return None
    try:
        return date_ns(value)
    except ValueError:
        raise bad(f"not a date: {value!r} (YYYY-MM-DD)", param) from None


def _vectors(raws: list[bytes]) -> np.ndarray:
    rows = []
    for raw in raws:
        floats = array.array("f")
        floats.frombytes(raw)
        rows.append(np.asarray(floats, np.float32))
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


@router.post("/v1/search")
async def search(request: SearchRequest, state: State) -> JSONResponse:
    config: ServeConfig = state.config
    if config.index is None:
        raise ApiError(404, "this server has no index (start it with vlm serve --index FILE)", code="no_index")
    name, pool = pool_for(config, request.model, "clip")
    try:
        terms = parse_query([request.query], is_image=lambda _: False) if request.query.strip() else []
    except VlmError as e:
        raise bad(e.message, "query") from None
    sources: list[bytes | RemoteImage] = [image_source(u, config, f"images[{i}]") for i, u in enumerate(request.images)]
    images = [await fetch_remote(s, config) if isinstance(s, RemoteImage) else s for s in sources]
    terms += [Term(1.0, image=b) for b in images]
    if not terms:
        raise bad("the query is empty: give 'query' text or 'images'", "query")
    filters = Filters(list(request.folders), _date_ns(request.since, "since"), _date_ns(request.until, "until"))
    texts = [str(t.text) for t in terms if t.text is not None]
    items: list[tuple[str, Any]] = [("text", t) for t in texts] + [("image", b) for b in images]
    running = RunningJob(pool, "embed", {"items": items}, config.timeout, image_param="images")
    embedded = _vectors((await running.result())["embeddings"])
    index = _open(config.index)

    def ranked() -> list[dict[str, Any]]:
        with index.lock:
            try:
                encoder = _Embedded(index.model(pool.spec.model), embedded[: len(texts)], embedded[len(texts) :])
                searcher = index.searcher(encoder)
                return [h.record() for h in searcher.with_captions(searcher.search(terms, request.n, filters))]
            except sqlite3.OperationalError as e:  # the open index, locked since by another process
                if is_locked(e):
                    raise index.db().locked_error() from None
                raise

    try:
        data = await asyncio.to_thread(ranked)
    except IndexLocked as e:  # another process writes the index now: worth a retry, not the client's fault
        raise ApiError(503, e.message, "server_error", code="index_locked", headers={"Retry-After": "5"}) from None
    except VlmError as e:
        raise bad(f"{e.path}: {e.message}" if e.path else e.message, "model") from None
    return JSONResponse({"object": "list", "model": name, "data": data})
