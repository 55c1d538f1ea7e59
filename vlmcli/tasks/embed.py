"""CLIP embeddings of images and texts (L2-normalised float32), independent of the terminal.

Building blocks for callers that stream many files (a batch runner with a decode thread):
- `prepare_image(path, config)`: decode (JPEG draft mode) + preprocess one file -> (3, S, S) float32;
  it raises ImageError for that file only.
- `embed_pixels(model, pixels)`: a chunk of already-preprocessed images -> normalised (N, D) rows.
- `embed_texts(model, texts)`: texts -> normalised rows, with which ones were cut at 77 tokens.
Convenience over paths: `iter_image_batches` and `embed_images` (yield per-image failures, never stop).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Sequence

import numpy as np

from vlmcli.engines.clip_preprocess import draft_size, preprocess
from vlmcli.engines.clip_tokenizer import ClipTokenizer
from vlmcli.errors import ImageError, VlmError
from vlmcli.images import DEFAULT_MAX_PIXELS, load_image

if TYPE_CHECKING:
    from vlmcli.engines.clip import ClipConfig, ClipModel

DEFAULT_IMAGE_BATCH = 8
DEFAULT_TEXT_BATCH = 64


@dataclass
class Embedding:
    """One embedding: `input` is the image path or the text."""

    input: str
    kind: Literal["image", "text"]
    vector: np.ndarray = field(repr=False)  # (D,) float32, L2 norm 1
    truncated: bool = False  # text only: cut to the model's context length (77 tokens)


@dataclass
class ImageFailure:
    """An image that could not be used; the others go on."""

    path: str
    error: VlmError

    @property
    def message(self) -> str:
        return self.error.message


@dataclass
class TextEmbeddings:
    texts: list[str]
    vectors: np.ndarray  # (N, D) float32, rows L2-normalised
    truncated: list[bool]

    def as_embeddings(self) -> list[Embedding]:
        return [Embedding(t, "text", v, c) for t, v, c in zip(self.texts, self.vectors, self.truncated)]


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero instead of becoming NaN."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows.astype(np.float64), axis=-1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


_tokenizers: "weakref.WeakKeyDictionary[object, ClipTokenizer]" = weakref.WeakKeyDictionary()


def tokenizer_for(model: "ClipModel") -> ClipTokenizer:
    """The model's own tokenizer (vocabulary and merges from its GGUF), built once per model."""
    tok = _tokenizers.get(model)
    if tok is None:
        cfg = model.config
        tok = ClipTokenizer(cfg.merges, cfg.tokens, bos_id=cfg.bos_id, eos_id=cfg.eos_id)
        _tokenizers[model] = tok
    return tok


def prepare_image(
    path: str | os.PathLike[str],
    config: "ClipConfig",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one image (JPEGs in draft mode) and preprocess it for the model: (3, S, S) float32.

    Raises ImageError naming the file. Safe to call from a worker thread (no model access).
    """
    size = config.image_size
    image = load_image(path, max_pixels=max_pixels or None, draft=draft_size(size))
    try:
        return preprocess(image, size, config.image_mean, config.image_std)
    except (OSError, ValueError, MemoryError) as e:
        raise ImageError(f"cannot preprocess image ({e})", path) from None


def embed_pixels(model: "ClipModel", pixels: np.ndarray) -> np.ndarray:
    """(N, 3, S, S) preprocessed images -> (N, D) L2-normalised float32 image embeddings."""
    return l2_normalize(model.encode_images(pixels))


def embed_texts(
    model: "ClipModel",
    texts: Sequence[str],
    batch_size: int = DEFAULT_TEXT_BATCH,
    tokenizer: ClipTokenizer | None = None,
) -> TextEmbeddings:
    """Texts -> L2-normalised embeddings, encoded `batch_size` at a time; too-long texts are truncated."""
    texts = list(texts)
    tok = tokenizer or tokenizer_for(model)
    ids, truncated = tok.tokenize(texts, model.config.context_length)
    step = max(1, batch_size)
    chunks = [model.encode_texts(ids[i : i + step]) for i in range(0, len(texts), step)]
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, model.config.projection_dim), np.float32)
    return TextEmbeddings(texts, l2_normalize(vectors), truncated)


@dataclass
class ImageBatch:
    """A chunk of decoded images ready for the model, and the files of that chunk that failed."""

    paths: list[str]  # the good images, in input order
    pixels: np.ndarray  # (len(paths), 3, S, S)
    failures: list[ImageFailure]
    order: list[bool] = field(default_factory=list)  # input order: True = next good image, False = next failure

    def merge(self, results: Sequence) -> list:
        """`results` (one per good image) interleaved with the failures, in the order files were given."""
        good, bad = iter(results), iter(self.failures)
        return [next(good) if ok else next(bad) for ok in self.order]


def iter_image_batches(
    paths: Iterable[str | os.PathLike[str]],
    config: "ClipConfig",
    batch_size: int = DEFAULT_IMAGE_BATCH,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[ImageBatch]:
    """Decode and preprocess images in order, yielding batches of up to `batch_size` good images.

    A file that fails is reported in the batch it falls in; it never stops the others.
    """
    step = max(1, batch_size)
    s = config.image_size
    batch = ImageBatch([], np.zeros((0, 3, s, s), np.float32), [])
    arrays: list[np.ndarray] = []
    for p in paths:
        path = os.fspath(p)
        try:
            arrays.append(prepare_image(path, config, max_pixels))
            batch.paths.append(path)
            batch.order.append(True)
        except VlmError as e:
            batch.failures.append(ImageFailure(path, e))
            batch.order.append(False)
        if len(arrays) == step:
            batch.pixels = np.stack(arrays)
            yield batch
            batch, arrays = ImageBatch([], np.zeros((0, 3, s, s), np.float32), []), []
    if batch.order:
        if arrays:
            batch.pixels = np.stack(arrays)
        yield batch


def embed_images(
    model: "ClipModel",
    paths: Iterable[str | os.PathLike[str]],
    batch_size: int = DEFAULT_IMAGE_BATCH,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[Embedding | ImageFailure]:
    """Image embeddings in input order; a bad file yields an ImageFailure in its place."""
    for batch in iter_image_batches(paths, model.config, batch_size, max_pixels):
        vectors = embed_pixels(model, batch.pixels) if batch.paths else []
        yield from batch.merge([Embedding(p, "image", v) for p, v in zip(batch.paths, vectors)])
