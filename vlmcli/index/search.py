"""Searching an index: queries of weighted texts and images, ranked by exact cosine similarity.

A query is terms joined by + and - (rclip's form): `"dog" + "beach" - "night"`, each term a text, an
image file, or either with a weight, `2*dog`. The query vector is the weighted sum of the terms'
unit vectors, normalised; every image's score is its cosine with it (the index's rows are unit
vectors, so a dot product). Exact search: numpy over the rows, ties in path order. Where the index
holds captions, texts also match them in full text (FTS5) and a match adds `caption_weight` x its
relevance to the score.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np

from vlmcli.errors import EXIT_USAGE, VlmError
from vlmcli.index import ann
from vlmcli.index.ann import IvfIndex
from vlmcli.index.db import FileRow, IndexDB, ModelRef, Vectors

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif"})
DEFAULT_CAPTION_WEIGHT = 0.1

_OPERATOR = re.compile(r"\s+([+-])\s+")
_WEIGHT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*\*\s*(.+)$", re.S)


@dataclass(frozen=True)
class Term:
    """One part of a query: a text or an image file, with its weight (negative: subtracted)."""

    weight: float
    text: str | None = None
    image: str | bytes | None = None  # a file's path, or an upload's bytes

    def describe(self) -> str:
        what = self.text if self.text is not None else (self.image if isinstance(self.image, str) else "<image>")
        return f"{self.weight:+g}*{what}"


def date_ns(value: str) -> int:
    """A date (YYYY-MM-DD, optionally with a time; local time) as nanoseconds since the epoch, within
    SQLite's integers; ValueError when it is not one (each front end words that its own way)."""
    limit = 2**63 - 1
    return max(-limit, min(limit, int(datetime.fromisoformat(value).timestamp() * 1_000_000_000)))


def _looks_like_image_file(word: str) -> bool:
    return os.path.splitext(word)[1].lower() in IMAGE_SUFFIXES and os.path.isfile(word)


def parse_query(
    words: Sequence[str],
    images: Sequence[str] = (),
    is_image: Callable[[str], bool] = _looks_like_image_file,
) -> list[Term]:
    """Terms of a command line's words (`dog + beach - night`, or the same in one quoted word) and
    --image files. A word naming an existing image file is an image term."""
    tokens: list[str] = []
    for word in words:
        if word in ("+", "-"):
            tokens.append(word)
            continue
        # Whitespace runs as one space first (CLIP's tokenizer does the same): the operator pattern tries
        # every position of a long run, quadratic in it (100,000 spaces took minutes).
        parts = _OPERATOR.split(f" {' '.join(word.split())} ")  # spaces around: an operator may lead or end it
        tokens += [p.strip() if p.strip() in ("+", "-") else p for p in parts if p.strip()]
    terms: list[Term] = []
    sign = 1.0
    for tok in tokens:
        if tok in ("+", "-"):
            sign = 1.0 if tok == "+" else -1.0
            continue
        weight, body = 1.0, tok.strip()
        m = _WEIGHT.match(body)
        if m:
            weight, body = float(m.group(1)), m.group(2).strip()
        body = body.strip().strip('"').strip("'").strip() if len(body) > 1 else body
        if not body:
            continue
        if is_image(body):
            terms.append(Term(sign * weight, image=body))
        else:
            terms.append(Term(sign * weight, text=body))
        sign = 1.0
    terms += [Term(1.0, image=p) for p in images]
    if not terms:
        raise VlmError("the query is empty: give words, image files or --image", exit_code=EXIT_USAGE)
    if all(t.weight <= 0 for t in terms):
        raise VlmError("the query only subtracts: give at least one term to add", exit_code=EXIT_USAGE)
    return terms


class QueryEncoder(Protocol):
    """What turns query terms into vectors: a loaded CLIP model (tasks/index.ClipQueryEncoder)."""

    @property
    def model(self) -> ModelRef: ...

    def texts(self, texts: list[str]) -> np.ndarray:
        """(N, D) unit vectors."""

    def images(self, images: list[str | bytes]) -> np.ndarray:
        """(N, D) unit vectors of image files (paths) or uploads (bytes); raise VlmError for a bad one."""


def query_vector(terms: Sequence[Term], encoder: QueryEncoder) -> np.ndarray:
    """The weighted sum of the terms' vectors, as a unit vector (float32)."""
    texts = [t for t in terms if t.text is not None]
    images = [t for t in terms if t.image is not None]
    parts: list[np.ndarray] = []
    if texts:
        parts.append(np.asarray(encoder.texts([str(t.text) for t in texts]), np.float64) * _weights(texts))
    if images:
        found: list[str | bytes] = [t.image for t in images if t.image is not None]
        parts.append(np.asarray(encoder.images(found), np.float64) * _weights(images))
    q = np.concatenate(parts).sum(axis=0)
    norm = float(np.linalg.norm(q))
    if norm == 0.0:
        raise VlmError("the query's terms cancel out", exit_code=EXIT_USAGE)
    return (q / norm).astype(np.float32)


def _weights(terms: Sequence[Term]) -> np.ndarray:
    return np.array([[t.weight] for t in terms], np.float64)


def rank(matrix: np.ndarray, q: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, scores) of the n best rows by dot product with q, best first, ties by row order."""
    scores = matrix @ q.astype(matrix.dtype, copy=False)
    count = len(scores) if n is None else min(n, len(scores))
    if count <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if count < len(scores):
        # Only the best `count` (and any row tied with the last of them) are sorted.
        cut = np.partition(scores, len(scores) - count)[len(scores) - count]
        candidates = np.flatnonzero(scores >= cut)
    else:
        candidates = np.arange(len(scores))
    order = candidates[np.lexsort((candidates, -scores[candidates]))][:count]
    return order, scores[order].astype(np.float32)


@dataclass
class Hit:
    path: str
    score: float
    model: str
    size: int
    mtime_ns: int
    sha256: str
    clip_score: float
    text_score: float | None = None
    caption: str | None = None

    def record(self) -> dict[str, object]:
        rec: dict[str, object] = {"path": self.path, "score": round(self.score, 6), "model": self.model}
        if self.text_score is not None:
            rec["clip_score"] = round(self.clip_score, 6)
            rec["text_score"] = round(self.text_score, 6)
        if self.caption is not None:
            rec["caption"] = self.caption
        return rec


@dataclass
class Filters:
    folders: list[str] = field(default_factory=list)  # only files under these
    since_ns: int | None = None  # file mtime at or after
    until_ns: int | None = None  # file mtime before

    def key(self) -> tuple[object, ...]:
        return (tuple(os.path.abspath(f) for f in self.folders), self.since_ns, self.until_ns)


class Searcher:
    """Search one index with one model. The rows are read once and kept until the file changes
    (SQLite's data_version), so a long-lived page answers from memory."""

    def __init__(
        self,
        db: IndexDB,
        encoder: QueryEncoder,
        caption_weight: float = DEFAULT_CAPTION_WEIGHT,
        approximate: bool = True,
    ):
        self.db, self.encoder, self.caption_weight = db, encoder, caption_weight
        self.approximate = approximate  # use the saved approximate index where it is fresh (see ann.py)
        self._cache: tuple[tuple[object, ...], Vectors] | None = None
        self._ann: tuple[int, tuple[IvfIndex, list[FileRow]] | None] | None = None

    def _fresh_ann(self) -> tuple[IvfIndex, list[FileRow]] | None:
        if not self.approximate:
            return None
        generation = self.db.generation()
        if self._ann is None or self._ann[0] != generation:
            self._ann = (generation, ann.load_fresh(self.db, self.model.hash))
        return self._ann[1]

    @property
    def model(self) -> ModelRef:
        return self.encoder.model

    def rows(self, filters: Filters) -> Vectors:
        version = self.db.conn.execute("PRAGMA data_version").fetchone()[0]
        key = (self.model.hash, version, filters.key())
        if self._cache is None or self._cache[0] != key:
            vectors = self.db.vectors(self.model.hash, filters.folders, filters.since_ns, filters.until_ns)
            self._cache = (key, vectors)
        return self._cache[1]

    def search(self, terms: Sequence[Term], n: int | None = 20, filters: Filters | None = None) -> list[Hit]:
        filters = filters or Filters()
        text = " ".join(str(t.text) for t in terms if t.text is not None and t.weight > 0)
        matches = self.db.caption_matches(text) if text and self.caption_weight else {}
        fresh = self._fresh_ann() if n is not None and not matches and filters.key() == Filters().key() else None
        if fresh is not None and n is not None:
            index, files = fresh
            q = query_vector(terms, self.encoder)
            ids, scores = index.search(q, n)
            return [self._hit_of(files[int(i)], float(s), float(s), None) for i, s in zip(ids, scores)]
        vectors = self.rows(filters)
        if len(vectors) == 0:
            return []
        q = query_vector(terms, self.encoder)
        if vectors.matrix.shape[1] != q.shape[0]:
            raise VlmError(f"the index's vectors have {vectors.matrix.shape[1]} dimensions, the query {q.shape[0]}")
        if not matches:
            order, scores = rank(vectors.matrix, q, n)
            return [self._hit(vectors, int(i), float(s), float(s), None) for i, s in zip(order, scores)]
        clip = vectors.matrix @ q
        bonus = np.array([matches.get(f.sha256, 0.0) for f in vectors.files], np.float32)
        mixed = clip + np.float32(self.caption_weight) * bonus
        order, scores = rank(mixed[:, None], np.ones(1, np.float32), n)
        return [self._hit(vectors, int(i), float(s), float(clip[i]), float(bonus[i])) for i, s in zip(order, scores)]

    def _hit(self, vectors: Vectors, i: int, score: float, clip: float, text: float | None) -> Hit:
        return self._hit_of(vectors.files[i], score, clip, text)

    def _hit_of(self, f: FileRow, score: float, clip: float, text: float | None) -> Hit:
        return Hit(f.path, score, self.model.name, f.size, f.mtime_ns, f.sha256, clip, text)

    def with_captions(self, hits: list[Hit]) -> list[Hit]:
        captions = self.db.captions_of(h.sha256 for h in hits)
        for h in hits:
            h.caption = captions.get(h.sha256)
        return hits
