"""Validate a GGUF file and tell what kind of model it holds, before a native library sees it.

llama.cpp and ggml abort the whole process on some malformed files, so every model path goes
through `inspect_gguf` first: the checks here are cheap (a memory-mapped header read) and turn a
crash into a one-line error that names the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlmcli.errors import ModelError

GGUF_MAGIC = b"GGUF"

ModelKind = Literal["llm", "mmproj", "clip"]
KIND_NAMES = {
    "llm": "a language model GGUF",
    "mmproj": "a vision projector (mmproj) GGUF",
    "clip": "a two-tower CLIP GGUF",
}


@dataclass
class GgufInfo:
    path: Path
    arch: str
    kind: ModelKind
    n_tensors: int
    file_type: str | None = None  # e.g. "Q8_0", from the tensor types
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)


def _field_value(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def inspect_gguf(path: str | os.PathLike[str]) -> GgufInfo:
    """Read a GGUF header and classify it, or raise ModelError naming the file."""
    p = Path(path)
    if not p.exists():
        raise ModelError("no such model file", p)
    if p.is_dir():
        raise ModelError("is a directory, not a GGUF file", p)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read model file ({e.strerror})", p) from None
    if magic != GGUF_MAGIC:
        raise ModelError("not a GGUF file (bad magic)", p)

    from gguf import GGUFReader  # imported late: it is only needed here

    try:
        reader = GGUFReader(p, "r")
    except Exception as e:  # truncated or corrupt: gguf-py raises many kinds
        raise ModelError(f"corrupt or truncated GGUF file ({type(e).__name__}: {e})", p) from None

    size = p.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelError(f"corrupt or truncated GGUF file (tensor {t.name} runs past the end)", p)

    arch = _field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ModelError("GGUF file has no general.architecture", p)
    if arch == "clip":
        has_text = bool(_field_value(reader, "clip.has_text_encoder"))
        has_vision = bool(_field_value(reader, "clip.has_vision_encoder"))
        kind: ModelKind = "clip" if has_text and has_vision else "mmproj"
    else:
        kind = "llm"

    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
    quantized = sorted(types - {"F32"})
    file_type = quantized[0] if len(quantized) == 1 else ("+".join(quantized) or ("F32" if types else None))
    metadata = {k: _field_value(reader, k) for k in reader.fields if not k.startswith("tokenizer.ggml.")}
    return GgufInfo(path=p, arch=arch, kind=kind, n_tensors=len(reader.tensors), file_type=file_type, metadata=metadata)


def require_kind(path: str | os.PathLike[str], kind: ModelKind) -> GgufInfo:
    """inspect_gguf, and refuse a file of the wrong kind (a text model passed as mmproj and the reverse)."""
    info = inspect_gguf(path)
    if info.kind != kind:
        raise ModelError(f"this is {KIND_NAMES[info.kind]}, expected {KIND_NAMES[kind]}", path)
    return info
