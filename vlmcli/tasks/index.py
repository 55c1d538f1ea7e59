"""`index`: keep an index (vlmcli/index) in step with image folders, embedding through the one runner.

A run compares what the folders hold now with what the index knows (path, size, mtime):
- unchanged files are left alone (a stat each: an unchanged tree re-indexes in seconds);
- a new or changed file whose content the index already has a vector for (moved, renamed, copied,
  touched) gets its file row without embedding; only files of a size some indexed file has can be
  such, so only those are hashed up front;
- files gone from the folders are dropped, and vectors no file refers to any more with them;
- the rest runs through the runner as `vlm embed` does (the same task, with --ray the same pool),
  keyed by SHA-256, and `IndexSink` writes each batch's vectors and file rows in one transaction.
A run killed at any moment keeps every batch it committed; the next run sees those files as
unchanged and embeds the rest.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmcli.errors import VlmError
from vlmcli.files import sha256_file
from vlmcli.index.db import FileRow, IndexDB, ModelRef
from vlmcli.tasks.resume import Record, ResumeIndex, ResumePlan
from vlmcli.tasks.sinks import Sink

if TYPE_CHECKING:
    from vlmcli.engines.clip import ClipModel
    from vlmcli.tasks.models import ModelSpec


def default_db_path() -> Path:
    """Where the index lives unless --db says: STORE/index/photos.sqlite."""
    from vlmcli.store.store import store_root

    return store_root() / "index" / "photos.sqlite"


# ----------------------------------------------------------------------------- the model


def clip_model_file(spec: ModelSpec, notify: Any = None) -> tuple[str, Path]:
    """(name, path) of the CLIP model a spec names, as open_model resolves it (pulling it if needed),
    without loading it: with --ray the driver needs its hash, not the model."""
    given = Path(spec.model).expanduser() if spec.model else None
    if given is not None and given.suffix.lower() == ".gguf" and given.is_file():
        return given.stem, given
    from vlmcli.store.resolve import resolve_model

    resolved = resolve_model(spec.model, "clip", offline=spec.offline, notify=notify)
    return resolved.name, Path(resolved.model)


def model_ref(db: IndexDB, name: str, path: Path) -> ModelRef:
    """The model as the index records it: its name and its file's SHA-256 (remembered per size + mtime)."""
    path = path.resolve()
    st = path.stat()
    digest = db.cached_model_hash(str(path), st.st_size, st.st_mtime_ns)
    if digest is None:
        digest = sha256_file(path)
    ref = ModelRef(name, digest, str(path))
    db.put_model(ref, st.st_size, st.st_mtime_ns)
    return ref


# ----------------------------------------------------------------------------- what a run does


@dataclass
class IndexPlan:
    """What a run found: `embed` goes through the runner; the rest is done by `plan_index`."""

    embed: list[str] = field(default_factory=list)  # paths to embed, one per content where known
    copies: dict[str, list[FileRow]] = field(default_factory=dict)  # content -> other new paths holding it
    unchanged: int = 0
    relinked: int = 0  # moved, renamed, copied or touched: a row without embedding
    removed: int = 0

    def line(self) -> str:
        return (
            f"{self.unchanged} unchanged, {self.relinked} moved or renamed, "
            f"{len(self.embed)} to embed, {self.removed} removed"
        )


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _hash(path: str) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def plan_index(
    db: IndexDB,
    paths: Sequence[str],
    folders: Sequence[str],
    named: Sequence[str],
    model: ModelRef,
    redo: bool = False,
    hash_threads: int = 4,
) -> IndexPlan:
    """Compare `paths` (the expansion of the user's inputs) with the index, under `folders` (walked)
    and `named` files: drop what is gone, relink moved content, and list what needs the model."""
    plan = IndexPlan()
    absolute = [os.path.abspath(p) for p in paths]
    known = db.files_under([os.path.abspath(f) for f in folders], [os.path.abspath(n) for n in named])
    seen = set(absolute)
    gone = [p for p in known if p not in seen]
    have = db.shas_with_vectors(model.hash, [r.sha256 for r in known.values()]) if not redo else set()
    sizes = {int(r[0]) for r in db.conn.execute("SELECT DISTINCT size FROM files")}
    to_hash: list[tuple[str, int, int]] = []
    relink: list[FileRow] = []
    for ap in absolute:
        st = _stat(ap)
        row = known.get(ap)
        if st is None:
            plan.embed.append(ap)  # the runner reports it (no such file, permission denied)
        elif row is not None and (row.size, row.mtime_ns) == st and row.sha256 in have:
            plan.unchanged += 1
        elif row is not None and (row.size, row.mtime_ns) == st:
            plan.embed.append(ap)  # unchanged, but no vector of this model yet (or --redo)
        elif not redo and st[0] in sizes:
            to_hash.append((ap, *st))  # may be content the index has: hash before embedding
        else:
            plan.embed.append(ap)
    if to_hash:
        with ThreadPoolExecutor(max(1, hash_threads)) as pool:
            digests = list(pool.map(_hash, [p for p, _, _ in to_hash]))
        found = db.shas_with_vectors(model.hash, [d for d in digests if d])
        first_of: dict[str, str] = {}
        for (ap, size, mtime), digest in zip(to_hash, digests):
            if digest is None:
                plan.embed.append(ap)
            elif digest in found:
                relink.append(FileRow(ap, size, mtime, digest))
            elif digest in first_of:
                plan.copies.setdefault(digest, []).append(FileRow(ap, size, mtime, digest))
            else:
                first_of[digest] = ap
                plan.embed.append(ap)
        plan.relinked = len(relink)
    # Rows of files gone and of moved content change together: a move is never half done.
    with db.transaction() as c:
        IndexDB.delete_files(c, gone)
        IndexDB.put_files(c, relink)
    plan.removed = len(gone)
    return plan


class IndexSink(Sink):
    """Embedding records into the index: each batch's vectors and file rows in one transaction."""

    resumable = True

    def __init__(self, db: IndexDB, model: ModelRef, copies: dict[str, list[FileRow]] | None = None):
        self.db, self.model = db, model
        self.copies = copies or {}
        self.written = 0

    def open(self, plan: ResumePlan, with_hash: bool) -> ResumeIndex:
        # plan_index already left out what the index has: every input given to the runner is to do.
        return ResumeIndex(plan.identity, with_hash)

    def write_batch(self, records: list[Record]) -> None:
        with self.db.transaction() as c:
            for rec in records:
                f = rec.get("file")
                vector = rec.get("embedding")
                if rec.get("error") or vector is None or not isinstance(f, dict) or not f.get("sha256"):
                    continue
                if rec.get("model") != self.model.name:
                    raise VlmError(f"a record of model {rec.get('model')} reached the index of {self.model.name}")
                sha = str(f["sha256"])
                IndexDB.put_vector(c, sha, self.model, np.asarray(vector, np.float32))
                rows = [FileRow(str(f["abspath"]), int(f["size"]), int(f["mtime_ns"]), sha)]
                IndexDB.put_files(c, rows + self.copies.get(sha, []))
                self.written += 1


# ----------------------------------------------------------------------------- queries


class ClipQueryEncoder:
    """Query terms to vectors with a loaded CLIP model (index.search.QueryEncoder). Not thread-safe:
    callers serialise (the page holds a lock)."""

    def __init__(self, clip: ClipModel, model: ModelRef):
        self.clip = clip
        self._model = model

    @property
    def model(self) -> ModelRef:
        return self._model

    def texts(self, texts: list[str]) -> np.ndarray:
        from vlmcli.tasks.embed import embed_texts

        return embed_texts(self.clip, texts)[0]

    def images(self, images: list[str | bytes]) -> np.ndarray:
        from vlmcli.images import load_image
        from vlmcli.tasks.embed import embed_pixels, prepare_image, preprocess_image

        pixels = []
        for image in images:
            if isinstance(image, bytes):
                pixels.append(preprocess_image(load_image(io.BytesIO(image)), self.clip.config))
            else:
                pixels.append(prepare_image(image, self.clip.config))
        return embed_pixels(self.clip, np.stack(pixels))


def choose_model(db: IndexDB, requested: str | None) -> tuple[str, ModelRef | None]:
    """What to open for queries: the model asked for, else the index's only model (by its file
    where it still is, else its name). Returns (the --model value, the index's ModelRef if known)."""
    models = db.models()
    if requested is not None:
        return requested, None
    if not models:
        raise VlmError("the index holds no vectors yet (build it with `vlm index PATH`)", db.path)
    if len(models) > 1:
        names = ", ".join(f"{m.name} ({n} images)" for m, n in models)
        raise VlmError(f"the index holds vectors of several models: {names}; choose one with --model", db.path)
    ref = models[0][0]
    return (ref.path if ref.path and os.path.isfile(ref.path) else ref.name), ref


def check_model_in_index(db: IndexDB, model: ModelRef) -> None:
    models = db.models()
    if not any(m.hash == model.hash for m, _ in models):
        have = ", ".join(m.name for m, _ in models) or "none"
        raise VlmError(
            f"the index has no vectors of {model.name} (it has: {have}); index with --model {model.name} first",
            db.path,
        )


# ----------------------------------------------------------------------------- captions


def contents_to_caption(db: IndexDB, paths: Sequence[str], model: str, detail: str) -> list[str]:
    """One path per indexed content among `paths` that has no caption of (model, detail) yet."""
    done = db.caption_shas(model, detail)
    wanted: dict[str, str] = {}
    for p in paths:
        row = db.file(os.path.abspath(p))
        if row is not None and row.sha256 not in done:
            wanted.setdefault(row.sha256, row.path)
    return list(wanted.values())


class CaptionSink(Sink):
    """Caption records into the index's captions (and their full-text index), one transaction per batch."""

    resumable = True

    def __init__(self, db: IndexDB, model: str, detail: str):
        self.db, self.model, self.detail = db, model, detail

    def open(self, plan: ResumePlan, with_hash: bool) -> ResumeIndex:
        return ResumeIndex(plan.identity, with_hash)  # contents_to_caption left out what is done

    def write_batch(self, records: list[Record]) -> None:
        with self.db.transaction() as c:
            for rec in records:
                f = rec.get("file")
                text = rec.get("caption")
                if rec.get("error") or not isinstance(text, str) or not isinstance(f, dict) or not f.get("sha256"):
                    continue
                IndexDB.put_caption(c, str(f["sha256"]), self.model, self.detail, " ".join(text.split()))
