"""Opening a model: the one function every front end (CLI, C library, and those to come) calls.

`open_model(ModelSpec(...), kind)` resolves the spec through the store (a store name, pulled on first
use; a GGUF file; a folder), applies the registry's defaults, and loads the engine, so settings mean
the same everywhere: `n_gpu_layers` -1 (the default) = all layers on the GPU when the build has one
and none otherwise, 0 = CPU; CLIP is small and goes to the GPU whole for any non-zero value;
`detail` None = the model's registry default, else "auto".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlmcli.defaults import DEFAULT_N_CTX, DEFAULT_N_GPU_LAYERS
from vlmcli.errors import EXIT_USAGE, InvalidOption, ModelError, VlmError, debugging

Kind = Literal["vlm", "clip"]


@dataclass
class ModelSpec:
    """What a front end asks for; None / defaults are the CLI's defaults."""

    model: str | None = None  # store name (NAME[:QUANT]), GGUF file or folder; None: the kind's default model
    mmproj: str | None = None  # SmolVLM2: the vision projector, when `model` is a GGUF file
    offline: bool | None = None  # None: follow HF_HUB_OFFLINE
    n_threads: int | None = None  # None: a share of the cores, per unit of work (engines/cores.py)
    n_gpu_layers: int = DEFAULT_N_GPU_LAYERS  # -1 = all layers on the GPU when the build has one (else CPU); 0 = CPU
    n_ctx: int = DEFAULT_N_CTX  # SmolVLM2 context in tokens
    detail: str | None = None  # SmolVLM2: low | high | auto; None = the registry's default for the model
    max_tiles: int | None = None
    device: str | None = None  # CLIP: a ggml device name (CPU, CUDA0, Vulkan0, ...)
    native_logs: bool = field(default_factory=debugging)  # SmolVLM2: let llama.cpp print its logs (--debug)
    n_sequences: int = 1  # SmolVLM2: sequences decoded together (best-of candidates)
    cache: bool = True  # SmolVLM2: keep image encodings in the store's encoding cache (--no-cache: False)


@dataclass
class OpenedModel:
    kind: Kind
    name: str  # the store name, or the file's stem: what CLIP records carry as "model"
    path: Path  # the main GGUF
    engine: Any  # VlmEngine | ClipModel

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> OpenedModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def detect_kind(spec: str) -> Kind | None:
    """'vlm' or 'clip' for a GGUF file, a folder or a registered store name; None if unknown."""
    from vlmcli.gguf.reader import inspect_gguf

    path = Path(spec).expanduser()
    if path.is_file():
        kind = inspect_gguf(path).kind
        if kind == "mmproj":
            raise ModelError(
                "this is a vision projector (mmproj); open the language model GGUF (with its mmproj "
                "beside it) or the folder holding both",
                path,
            )
        return "clip" if kind == "clip" else "vlm"
    if path.is_dir():
        kinds = set()
        for p in sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf"):
            with contextlib.suppress(VlmError):
                kinds.add(inspect_gguf(p).kind)
        if "llm" in kinds:
            return "vlm"
        return "clip" if "clip" in kinds else None
    from vlmcli.store.registry import load_registry

    entry = load_registry().get(spec.partition(":")[0].lower())
    if entry is None:
        return None
    return "clip" if entry.kind == "clip" else "vlm"


def open_model(spec: ModelSpec, kind: Kind | None = None, notify: Callable[[str], None] | None = None) -> OpenedModel:
    """Resolve and load. kind None: whatever the spec is (the C library). `notify` hears about an
    automatic pull (the CLI prints it on stderr)."""
    if spec.model is not None and not spec.model.strip():
        raise InvalidOption("model", "the model name is empty")
    if kind is None:
        kind = detect_kind(spec.model) if spec.model else None
        if kind is None:  # unknown: whichever kind resolves it
            return _first_that_opens(spec, notify)
    if kind == "clip":
        return _open_clip(spec, notify)
    return _open_vlm(spec, notify)


def _first_that_opens(spec: ModelSpec, notify: Callable[[str], None] | None) -> OpenedModel:
    first_error: ModelError | None = None
    kinds: tuple[Kind, ...] = ("vlm", "clip")
    for kind in kinds:
        try:
            return open_model(spec, kind, notify)
        except ModelError as e:
            first_error = first_error or e
    assert first_error is not None
    raise first_error


def _open_vlm(spec: ModelSpec, notify: Callable[[str], None] | None) -> OpenedModel:
    from vlmcli.engines.detail import validate as validate_detail
    from vlmcli.engines.llama import EngineOptions, VlmEngine
    from vlmcli.store.resolve import resolve_model

    validate_detail(spec.detail or "auto", spec.max_tiles)  # before a download or a load
    resolved = resolve_model(spec.model, "vlm", mmproj=spec.mmproj, offline=spec.offline, notify=notify)
    assert resolved.mmproj is not None
    options = EngineOptions(
        n_threads=spec.n_threads,
        n_gpu_layers=spec.n_gpu_layers,
        n_ctx=spec.n_ctx,
        detail=spec.detail or resolved.detail or "auto",
        max_tiles=spec.max_tiles,
        native_logs=spec.native_logs,
        n_seq_max=spec.n_sequences,
        cache=encoding_cache() if spec.cache else None,
    )
    engine = VlmEngine(resolved.model, resolved.mmproj, options)
    return OpenedModel("vlm", resolved.name, resolved.model, engine)


def encoding_cache() -> Any:
    """The store's image-encoding cache (an engines.encoding_cache.EncodingCache), or None when
    VLM_CACHE_SIZE is 0. Folder: $VLM_CACHE_DIR, else STORE/cache/encodings; bound: VLM_CACHE_SIZE
    (default 2G)."""
    import os

    from vlmcli.engines.encoding_cache import DEFAULT_MAX_BYTES, EncodingCache, parse_size
    from vlmcli.store.store import store_root

    text = os.environ.get("VLM_CACHE_SIZE", "").strip()
    try:
        max_bytes = parse_size(text) if text else DEFAULT_MAX_BYTES
    except ValueError as e:
        raise VlmError(f"VLM_CACHE_SIZE: {e}", exit_code=EXIT_USAGE) from None
    if max_bytes == 0:
        return None
    folder = os.environ.get("VLM_CACHE_DIR")
    return EncodingCache(Path(folder).expanduser() if folder else store_root() / "cache" / "encodings", max_bytes)


def _open_clip(spec: ModelSpec, notify: Callable[[str], None] | None) -> OpenedModel:
    from vlmcli.engines.clip import ClipModel

    if spec.mmproj is not None:
        raise InvalidOption("mmproj", "a vision projector only applies to SmolVLM2 models, not CLIP")
    given = Path(spec.model).expanduser() if spec.model else None
    if given is not None and given.suffix.lower() == ".gguf" and given.is_file():
        # ClipModel.load validates the file itself: resolving it too would parse its large header twice.
        path, name = given, given.stem
    else:
        from vlmcli.store.resolve import resolve_model

        resolved = resolve_model(spec.model, "clip", offline=spec.offline, notify=notify)
        path, name = Path(resolved.model), resolved.name
    engine = ClipModel.load(path, n_threads=spec.n_threads, n_gpu_layers=spec.n_gpu_layers, device=spec.device)
    return OpenedModel("clip", name, path, engine)
