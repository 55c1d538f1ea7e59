"""`embed`: CLIP embeddings (L2-normalised float32) of images and texts; one record per input.

Images are decoded (JPEG draft mode) and preprocessed in the runner's worker threads; the model
encodes them `batch_size` at a time in one ggml graph. Image records carry "path", "input" and
"kind": "image"; text records "input" and "kind": "text" (texts are keyed by content for resume).
Images and texts of one model share one identity, so their rows can share one matrix.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmcli.defaults import DEFAULT_IMAGE_BATCH, DEFAULT_MAX_PIXELS, DEFAULT_TEXT_BATCH
from vlmcli.engines.clip_preprocess import draft_size, preprocess
from vlmcli.engines.clip_tokenizer import ClipTokenizer
from vlmcli.errors import ImageError, VlmError
from vlmcli.images import load_image
from vlmcli.tasks.resume import FileKey, Record, text_key
from vlmcli.tasks.task import Task

if TYPE_CHECKING:
    from PIL import Image

    from vlmcli.engines.clip import ClipConfig, ClipModel


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero instead of becoming NaN."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows.astype(np.float64), axis=-1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


_tokenizers: weakref.WeakKeyDictionary[object, ClipTokenizer] = weakref.WeakKeyDictionary()


def tokenizer_for(model: ClipModel) -> ClipTokenizer:
    """The model's own tokenizer (vocabulary and merges from its GGUF), built once per model."""
    tok = _tokenizers.get(model)
    if tok is None:
        cfg = model.config
        tok = ClipTokenizer(cfg.merges, cfg.tokens or None, bos_id=cfg.bos_id, eos_id=cfg.eos_id, path=model.path)
        _tokenizers[model] = tok
    return tok


def preprocess_image(image: Image.Image, config: ClipConfig, path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """A decoded image -> (3, S, S) float32, as the model was trained on."""
    try:
        return preprocess(image, config.image_size, config.image_mean, config.image_std)
    except (OSError, ValueError, MemoryError) as e:
        raise ImageError(f"cannot preprocess image ({e})", path) from None


def prepare_image(
    path: str | os.PathLike[str], config: ClipConfig, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one file (JPEGs in draft mode) and preprocess it. Raises ImageError naming the file;
    safe in a worker thread (no model access)."""
    image = load_image(path, max_pixels=max_pixels or None, draft=draft_size(config.image_size))
    return preprocess_image(image, config, path)


def embed_pixels(model: ClipModel, pixels: np.ndarray) -> np.ndarray:
    """(N, 3, S, S) preprocessed images -> (N, D) L2-normalised float32 image embeddings."""
    return l2_normalize(model.encode_images(pixels))


def embed_texts(
    model: ClipModel, texts: Sequence[str], batch_size: int = DEFAULT_TEXT_BATCH
) -> tuple[np.ndarray, list[bool]]:
    """Texts -> (L2-normalised (N, D) embeddings, which texts were cut to the 77-token context)."""
    tok = tokenizer_for(model)
    ids, truncated = tok.tokenize(list(texts), model.config.context_length)
    step = max(1, batch_size)
    chunks = [model.encode_texts(ids[i : i + step]) for i in range(0, len(ids), step)]
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, model.config.projection_dim), np.float32)
    return l2_normalize(vectors), truncated


class ClipImagesTask(Task):
    """What embed and classify share: CLIP's identity, image records and preprocessing."""

    name = "embed"

    def __init__(
        self,
        model: ClipModel,
        batch_size: int = DEFAULT_IMAGE_BATCH,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        model_name: str | None = None,
    ):
        self.model = model
        self.batch_size = batch_size
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self.identity: dict[str, Any] = {
            "task": self.name,
            "model": model_name or model.path.stem,
            "quant": model.config.file_type,
        }

    def base(self, path: str) -> Record:
        return {"path": path, "input": path, "kind": "image", **self.identity}

    def prepare(self, path: str) -> np.ndarray:
        return prepare_image(path, self.model.config, self.max_pixels)

    def prepare_decoded(self, image: Image.Image) -> np.ndarray:
        """An image a caller decoded itself (the C library's pixel buffers)."""
        return preprocess_image(image, self.model.config)

    def close(self) -> None:
        self.model.close()


class EmbedImagesTask(ClipImagesTask):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.identity["options"] = {"normalized": True}

    def run(self, prepared: list[np.ndarray]) -> list[Record | VlmError]:
        t0 = time.perf_counter()
        vectors = embed_pixels(self.model, np.stack(prepared))
        per_image = round((time.perf_counter() - t0) * 1000 / len(prepared), 2)
        return [{"dim": int(v.shape[0]), "embedding": v, "timings": {"model_ms": per_image}} for v in vectors]


class EmbedTextsTask(Task):
    """embed --text: texts as inputs, encoded in batches; same identity as the images' task. It
    shares the images' task's model (and leaves closing it to that task)."""

    name = "embed"
    workers: int | None = 1
    prefetch: int | None = 256
    file_inputs = False

    def __init__(self, images: EmbedImagesTask, batch_size: int = DEFAULT_TEXT_BATCH):
        self.model = images.model
        self.identity = images.identity  # same model and options: the rows share one matrix
        self.batch_size = batch_size
        self.truncated: list[str] = []

    def base(self, text: str) -> Record:
        return {"input": text, "kind": "text", **self.identity}

    def key(self, text: str, use_hash: bool) -> FileKey:
        return text_key(text)

    def prepare(self, text: str) -> str:
        return text

    def run(self, prepared: list[str]) -> list[Record | VlmError]:
        t0 = time.perf_counter()
        vectors, truncated = embed_texts(self.model, prepared, self.batch_size)
        per_text = round((time.perf_counter() - t0) * 1000 / len(prepared), 2)
        self.truncated += [t for t, cut in zip(prepared, truncated) if cut]
        return [
            {"dim": int(v.shape[0]), "embedding": v, "truncated": cut, "timings": {"model_ms": per_text}}
            for v, cut in zip(vectors, truncated)
        ]
