"""The Python side of the C API in plain Python types: handles, options and the calls.

`exports.py` converts C arguments into these types and results back; everything here runs the
same tasks and engines as the CLI (vlmcli.tasks.*, vlmcli.engines.*), so the C API gives the
CLI's answers. Errors are CapiError(status, message), status being a vlm_status of vlm.h.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vlmcli.defaults import DEFAULT_MAX_PIXELS, DEFAULT_MAX_TOKENS, DEFAULT_N_CTX
from vlmcli.errors import ContextOverflow, ImageError, InvalidOption, ModelError, VlmError

if TYPE_CHECKING:
    from vlmcli.tasks.ask import AskTask
    from vlmcli.tasks.classify import LabelEmbeddings
    from vlmcli.tasks.models import OpenedModel
    from vlmcli.tasks.resume import Record
    from vlmcli.tasks.structured import Structure
    from vlmcli.tasks.task import Task

# vlm_status (vlm.h)
OK = 0
E_INVALID_ARGUMENT = -1
E_INVALID_HANDLE = -2
E_BUFFER_TOO_SMALL = -3
E_ABI_MISMATCH = -4
E_MODEL = -5
E_IMAGE = -6
E_WRONG_KIND = -7
E_BUSY = -8
E_FAILED = -9
E_RUNTIME = -10

ABI_VERSION = 3  # VLM_ABI_VERSION in vlm.h (a test checks they agree)
ABI_VERSIONS = (1, 2, 3)  # the vlm_options layouts this library reads
KIND_VLM = 1
KIND_CLIP = 2
DETAILS = {0: None, 1: "low", 2: "high"}
SELECTS = {0: "logprob", 1: "vote"}  # VLM_DETAIL_AUTO: the model's registry default, else auto

# Neutral option names (errors.InvalidOption.option) -> the field a C caller sets.
FIELDS = {
    "n_ctx": "vlm_options.n_ctx",
    "detail": "vlm_options.detail",
    "max_tiles": "vlm_options.max_tiles",
    "n_threads": "vlm_options.n_threads",
    "n_gpu_layers": "vlm_options.n_gpu_layers",
    "max_tokens": "vlm_options.max_tokens",
    "temperature": "vlm_options.temperature",
    "top_p": "vlm_options.top_p",
    "seed": "vlm_options.seed",
    "best_of": "vlm_options.best_of",
    "select": "vlm_options.select",
    "json_schema": "vlm_options.json_schema",
    "grammar": "vlm_options.grammar",
    "model": "model",
    "labels": "labels",
}


class CapiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def status_of(exc: BaseException) -> tuple[int, str]:
    """The vlm_status and message for an exception raised while serving a call."""
    if isinstance(exc, CapiError):
        return exc.status, exc.message
    if isinstance(exc, InvalidOption):
        return E_INVALID_ARGUMENT, f"{FIELDS.get(exc.option, exc.option)}: {exc.message}"
    if isinstance(exc, ContextOverflow):
        return E_FAILED, f"{exc} (raise vlm_options.n_ctx{' or lower vlm_options.detail' if exc.image_tokens else ''})"
    if isinstance(exc, ImageError):
        return E_IMAGE, str(exc)
    if isinstance(exc, ModelError):
        return E_MODEL, str(exc)
    if isinstance(exc, VlmError):
        return E_FAILED, str(exc)
    if isinstance(exc, MemoryError):
        return E_FAILED, "out of memory"
    return E_RUNTIME, f"internal error: {type(exc).__name__}: {exc}"


@dataclass
class OpenOptions:
    """vlm_options, validated; None / defaults are the CLI's defaults."""

    n_threads: int | None = None
    n_gpu_layers: int = 0
    n_ctx: int = DEFAULT_N_CTX
    seed: int = 0
    max_tokens: int | None = None  # None: 256 for ask, 96 for caption (as the CLI)
    temperature: float = 0.0
    top_p: float = 1.0
    detail: str | None = None  # None: the model's registry default, else auto
    max_tiles: int | None = None
    best_of: int = 1
    select: str = "logprob"
    structure: Structure | None = None  # json_schema / grammar (ABI 3), checked and converted

    @classmethod
    def from_c(
        cls,
        abi_version: int,
        n_threads: int,
        n_gpu_layers: int,
        n_ctx: int,
        seed: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        detail: int,
        max_tiles: int = 0,
        best_of: int = 0,
        select: int = 0,
        json_schema: str | None = None,
        grammar: str | None = None,
    ) -> OpenOptions:
        if abi_version not in ABI_VERSIONS:
            raise CapiError(
                E_ABI_MISMATCH,
                f"vlm_options.abi_version is {abi_version}, this library implements ABI {ABI_VERSION} "
                "(set it to VLM_ABI_VERSION and compile against this library's vlm.h)",
            )

        def bad(what: str) -> CapiError:
            return CapiError(E_INVALID_ARGUMENT, f"vlm_options.{what}")

        if n_threads < 0:
            raise bad(f"n_threads is {n_threads}; use 0 for the default (a share of the cores) or a positive count")
        if n_gpu_layers < -1:
            raise bad(f"n_gpu_layers is {n_gpu_layers}; use -1 (all), 0 (none) or a positive count")
        if n_ctx != 0 and n_ctx < 256:
            raise bad(f"n_ctx is {n_ctx}; use 0 ({DEFAULT_N_CTX}) or at least 256")
        if max_tokens < 0:
            raise bad(f"max_tokens is {max_tokens}; use 0 (the default) or a positive count")
        if not temperature >= 0.0:  # also refuses NaN
            raise bad(f"temperature is {temperature}; use 0 (greedy) or more")
        if not 0.0 <= top_p <= 1.0:
            raise bad(f"top_p is {top_p}; use 0 (off) or a value in (0, 1]")
        if detail not in DETAILS:
            raise bad(f"detail is {detail}; use VLM_DETAIL_AUTO, VLM_DETAIL_LOW or VLM_DETAIL_HIGH")
        if max_tiles < 0:
            raise bad(f"max_tiles is {max_tiles}; use 0 (no cap) or a positive count")
        if best_of < 0:
            raise bad(f"best_of is {best_of}; use 0 (one answer) or a candidate count")
        if select not in SELECTS:
            raise bad(f"select is {select}; use VLM_SELECT_LOGPROB or VLM_SELECT_VOTE")
        return cls(
            n_threads=n_threads or None,
            n_gpu_layers=n_gpu_layers,
            n_ctx=n_ctx or DEFAULT_N_CTX,
            seed=seed,
            max_tokens=max_tokens or None,
            temperature=float(temperature),
            top_p=float(top_p) if top_p > 0 else 1.0,
            detail=DETAILS[detail],
            max_tiles=max_tiles or None,
            best_of=best_of or 1,
            select=SELECTS[select],
            structure=_structure(json_schema, grammar),
        )


def _structure(json_schema: str | None, grammar: str | None) -> Structure | None:
    """vlm_options.json_schema / .grammar as the CLI's --json-schema / --grammar (InvalidOption names the field)."""
    from vlmcli.tasks import structured

    if json_schema is not None and grammar is not None:
        raise InvalidOption("json_schema", "give json_schema or grammar, not both")
    if json_schema is not None:
        try:
            schema = json.loads(json_schema)
        except ValueError as e:
            raise InvalidOption("json_schema", f"not JSON: {e}") from None
        return structured.from_schema(schema)
    return structured.from_grammar(grammar) if grammar is not None else None


@dataclass
class Handle:
    id: int
    kind: str  # "vlm" | "clip"
    engine: Any  # VlmEngine (kind "vlm") | ClipModel (kind "clip"), as OpenedModel.engine
    options: OpenOptions
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    owner: int | None = None  # the thread running a call on this handle
    closed: bool = False
    # The last classify call's labels and their embeddings: callers pass the same labels call after call.
    labels: tuple[tuple[str, ...], LabelEmbeddings] | None = None

    @property
    def kind_code(self) -> int:
        return KIND_VLM if self.kind == "vlm" else KIND_CLIP


class HandleTable:
    """Open models by integer id. Ids are never reused, so a closed handle stays detectably closed."""

    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._lock = threading.Lock()
        self._next_id = 1

    def open(self, spec: str, options: OpenOptions) -> int:
        opened = open_model(spec, options)
        with self._lock:
            h = Handle(id=self._next_id, kind=opened.kind, engine=opened.engine, options=options, name=opened.name)
            self._next_id += 1
            self._handles[h.id] = h
        return h.id

    def _get(self, hid: int) -> Handle:
        h = self._handles.get(hid)
        if h is None:
            raise CapiError(E_INVALID_HANDLE, f"handle {hid} is not open (never opened, or closed)")
        return h

    def close(self, hid: int) -> None:
        with self._lock:
            h = self._get(hid)
            if h.owner == threading.get_ident():
                raise CapiError(E_BUSY, f"handle {hid} cannot be closed from inside one of its own calls")
            del self._handles[hid]
        with h.lock:  # waits for a call running in another thread
            h.closed = True
            h.engine.close()

    @contextlib.contextmanager
    def use(self, hid: int, kind: str | None = None) -> Iterator[Handle]:
        """Hold the handle for one call: calls on one handle run one at a time."""
        with self._lock:
            h = self._get(hid)
        if h.owner == threading.get_ident():
            raise CapiError(E_BUSY, f"handle {hid} is busy: called again from inside its own token callback")
        if kind is not None and h.kind != kind:
            what = {"vlm": "a SmolVLM2 (vision-language)", "clip": "a CLIP"}
            raise CapiError(
                E_WRONG_KIND, f"handle {hid} holds {what[h.kind]} model; this call needs {what[kind]} model"
            )
        with h.lock:
            if h.closed:
                raise CapiError(E_INVALID_HANDLE, f"handle {hid} was closed")
            h.owner = threading.get_ident()
            try:
                yield h
            finally:
                h.owner = None

    def close_all(self) -> None:
        for hid in list(self._handles):
            with contextlib.suppress(CapiError):
                self.close(hid)


# ---- opening models --------------------------------------------------------------------------


def open_model(spec: str, options: OpenOptions) -> OpenedModel:
    """Open `spec` as `--model` does (store name, GGUF file or folder; SmolVLM2 or CLIP)."""
    from vlmcli.tasks.models import ModelSpec
    from vlmcli.tasks.models import open_model as open_task_model

    o = options
    return open_task_model(
        ModelSpec(
            spec,
            n_threads=o.n_threads,
            n_gpu_layers=o.n_gpu_layers,
            n_ctx=o.n_ctx,
            detail=o.detail,
            max_tiles=o.max_tiles,
            n_sequences=o.best_of,
        )
    )


# ---- images ----------------------------------------------------------------------------------


def image_from_rgb(data: bytes, width: int, height: int) -> Image.Image:
    """Packed RGB8 pixels from a C caller, as the image the engines take."""
    if width <= 0 or height <= 0:
        raise CapiError(E_INVALID_ARGUMENT, f"image size {width}x{height}: width and height must be positive")
    if width * height > DEFAULT_MAX_PIXELS:
        raise ImageError(
            f"image is {width}x{height} = {width * height:,} pixels, over the {DEFAULT_MAX_PIXELS:,} pixel limit"
        )
    if len(data) != width * height * 3:
        raise CapiError(E_INVALID_ARGUMENT, f"{len(data)} bytes of pixels for a {width}x{height} RGB image")
    return Image.frombytes("RGB", (width, height), data)


# ---- SmolVLM2 --------------------------------------------------------------------------------


def _vlm_task(handle: Handle, prompt: str | None) -> AskTask:
    """`vlm ask` with one question, or `vlm caption` when prompt is None, with the handle's options."""
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.tasks.ask import AskTask
    from vlmcli.tasks.best_of import temperature_for
    from vlmcli.tasks.caption import DEFAULT_CAPTION_MAX_TOKENS, CaptionTask

    o = handle.options
    default_tokens = DEFAULT_MAX_TOKENS if prompt is not None else DEFAULT_CAPTION_MAX_TOKENS
    temperature = temperature_for(o.best_of, o.temperature or None)  # 0 = the CLI's default, as for every field
    gen = GenerationOptions(
        max_tokens=o.max_tokens or default_tokens, temperature=temperature, top_p=o.top_p, seed=o.seed
    )
    engine, best = handle.engine, (o.best_of, o.select)
    if prompt is not None:
        return AskTask(engine, [prompt], gen, DEFAULT_MAX_PIXELS, *best, structure=o.structure)
    return CaptionTask(engine, gen, n_best=best[0], select=best[1], structure=o.structure)


def _run_one(
    task: Task, image: str | Image.Image, prepare_decoded: Callable[[Image.Image], Any] | None = None
) -> Record:
    """One image through the task's own batch step: the record the CLI would write."""
    from vlmcli.tasks.runner import run_prepared

    prepared = task.prepare(image) if isinstance(image, str) else (prepare_decoded(image) if prepare_decoded else image)
    result = run_prepared(task, [prepared])[0]
    if isinstance(result, VlmError):
        if isinstance(image, str) and result.path is None:
            result.path = image
        raise result
    return result


def ask(
    handle: Handle, image: str | Image.Image, prompt: str | None, on_token: Callable[[str], bool | None] | None
) -> str:
    """The answer (`vlm ask IMAGE PROMPT`) or caption (`vlm caption IMAGE` when prompt is None)."""
    task = _vlm_task(handle, prompt)
    task.on_token = on_token
    record = _run_one(task, image)
    return record["answers"][0]["answer"] if prompt is not None else record["caption"]


def ask_media(
    handle: Handle, items: list[str | Image.Image], prompt: str, on_token: Callable[[str], bool | None] | None
) -> str:
    """The answer about several images and videos in order (`vlm ask -i A -i B PROMPT`), or none."""
    from vlmcli.tasks.media_inputs import MediaInput, load_media
    from vlmcli.tasks.video import Sampling

    task = _vlm_task(handle, prompt)
    task.on_token = on_token
    media = []
    for item in items:
        if isinstance(item, str):
            media += load_media(MediaInput((item,)), DEFAULT_MAX_PIXELS, handle.engine.vision.tile_size, Sampling())
        else:
            media.append(item)
    answers = task.generate(media)
    return task.record(answers)["answers"][0]["answer"]


# ---- CLIP ------------------------------------------------------------------------------------


def embedding_size(handle: Handle) -> int:
    return int(handle.engine.config.projection_dim)


def embed_images(handle: Handle, images: list[str | Image.Image]) -> np.ndarray:
    """(N, D) L2-normalised image embeddings, as `vlm embed` computes them, in its batches."""
    from vlmcli.tasks.embed import EmbedImagesTask
    from vlmcli.tasks.runner import run_prepared

    task = EmbedImagesTask(handle.engine, model_name=handle.name)
    prepared = [task.prepare(im) if isinstance(im, str) else task.prepare_decoded(im) for im in images]
    return np.stack([_vector(r) for r in run_prepared(task, prepared)])


def _vector(result: Record | VlmError) -> np.ndarray:
    if isinstance(result, VlmError):
        raise result
    return result["embedding"]


def embed_texts(handle: Handle, texts: list[str]) -> np.ndarray:
    """(N, D) L2-normalised text embeddings (texts over 77 tokens are truncated, as in the CLI)."""
    from vlmcli.tasks.embed import EmbedImagesTask, EmbedTextsTask
    from vlmcli.tasks.runner import run_prepared

    task = EmbedTextsTask(EmbedImagesTask(handle.engine, model_name=handle.name))
    return np.stack([_vector(r) for r in run_prepared(task, texts)])


def classify(handle: Handle, image: str | Image.Image, labels: list[str]) -> np.ndarray:
    """Probabilities of each label (in the order given), as `vlm classify` computes them."""
    from vlmcli.tasks.classify import ClassifyTask, encode_labels

    key = tuple(labels)
    if handle.labels is None or handle.labels[0] != key:  # the same labels call after call: encode them once
        handle.labels = (key, encode_labels(handle.engine, labels))
    task = ClassifyTask(handle.engine, handle.labels[1], top_k=len(labels), model_name=handle.name)
    record = _run_one(task, image, task.prepare_decoded)
    score = {x["label"]: x["score"] for x in record["labels"]}
    return np.array([score[label] for label in labels], dtype=np.float64)
