"""Validate a GGUF file and tell what kind of model it holds, before a native library sees it.

llama.cpp and ggml abort the whole process on some malformed files, so every model path goes
through `inspect_gguf` first. It parses the header itself (the format is small: key/values, then
tensor infos) rather than with gguf-py's GGUFReader, which builds a numpy view for every one of the
~100k vocabulary strings and takes seconds; here string arrays are skipped unless asked for.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from vlmcli.errors import ModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

ModelKind = Literal["llm", "mmproj", "clip"]
KIND_NAMES = {
    "llm": "a language model GGUF",
    "mmproj": "a vision projector (mmproj) GGUF",
    "clip": "a two-tower CLIP GGUF",
}

# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (fastest-varying first)
    type: str  # GGML type name, e.g. "F16", "Q8_0"
    offset: int  # absolute file offset of the data
    n_bytes: int


@dataclass
class GgufInfo:
    path: Path
    arch: str
    kind: ModelKind
    n_tensors: int
    file_type: str | None = None  # e.g. "Q8_0", from the matrix tensor types
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    tensors: list[TensorInfo] = field(default_factory=list, repr=False)


class _Corrupt(Exception):
    pass


class _Reader:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def read(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise _Corrupt("runs past the end of the file")
        return self.f.read(n)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_strings: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if count > self.size:
                raise _Corrupt("array length larger than the file")
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                data = self.read(struct.calcsize(fmt) * count)
                return list(struct.unpack(f"<{count}{fmt[1]}", data))
            if itype == _STRING:
                if keep_strings:
                    return [self.string() for _ in range(count)]
                for _ in range(count):  # skip: only the lengths are read
                    self.f.seek(self.unpack("<Q"), os.SEEK_CUR)
                if self.f.tell() > self.size:
                    raise _Corrupt("runs past the end of the file")
                return count
            raise _Corrupt(f"unsupported array item type {itype}")
        raise _Corrupt(f"unknown value type {vtype}")


def read_gguf(path: str | os.PathLike[str], keep_string_arrays: bool = False) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata and tensor infos. String arrays (the vocabulary) come back as their length unless kept."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        r = _Reader(f, size)
        if r.read(4) != GGUF_MAGIC:
            raise _Corrupt("bad magic")
        version = r.unpack("<I")
        if version not in (2, 3):
            raise _Corrupt(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise _Corrupt("implausible tensor or key count")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.unpack("<I"), keep_string_arrays)
        raw = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            if n_dims > 8:
                raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
            shape = tuple(r.unpack("<Q") for _ in range(n_dims))
            raw.append((name, shape, r.unpack("<I"), r.unpack("<Q")))
        align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
        data_start = (f.tell() + align - 1) // align * align
    tensors = []
    for name, shape, tcode, rel in raw:
        try:
            qtype = GGMLQuantizationType(tcode)
        except ValueError:
            raise _Corrupt(f"tensor {name} has unknown type {tcode}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in shape:
            n *= d
        if shape and shape[0] % block:
            raise _Corrupt(f"tensor {name} rows are not a whole number of {qtype.name} blocks")
        n_bytes = n // block * type_size
        offset = data_start + rel
        if offset + n_bytes > size:
            raise _Corrupt(f"tensor {name} runs past the end of the file (truncated?)")
        tensors.append(TensorInfo(name, shape, qtype.name, offset, n_bytes))
    return meta, tensors


def inspect_gguf(path: str | os.PathLike[str], keep_string_arrays: bool = False) -> GgufInfo:
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
    try:
        meta, tensors = read_gguf(p, keep_string_arrays)
    except _Corrupt as e:
        raise ModelError(f"corrupt or truncated GGUF file ({e})", p) from None
    except (OSError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise ModelError(f"corrupt or truncated GGUF file ({type(e).__name__})", p) from None

    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError("GGUF file has no general.architecture", p)
    if arch == "clip":
        both = bool(meta.get("clip.has_text_encoder")) and bool(meta.get("clip.has_vision_encoder"))
        kind: ModelKind = "clip" if both else "mmproj"
    else:
        kind = "llm"
    if not tensors:
        raise ModelError("GGUF file holds no tensors", p)

    matrix_types = {t.type for t in tensors if len(t.shape) >= 2}
    quantized = sorted(matrix_types - {"F32"})
    file_type = quantized[0] if len(quantized) == 1 else ("+".join(quantized) or "F32")
    return GgufInfo(path=p, arch=arch, kind=kind, n_tensors=len(tensors), file_type=file_type, metadata=meta, tensors=tensors)


def require_kind(path: str | os.PathLike[str], kind: ModelKind, keep_string_arrays: bool = False) -> GgufInfo:
    """inspect_gguf, and refuse a file of the wrong kind (a text model passed as mmproj and the reverse)."""
    info = inspect_gguf(path, keep_string_arrays)
    if info.kind != kind:
        raise ModelError(f"this is {KIND_NAMES[info.kind]}, expected {KIND_NAMES[kind]}", path)
    return info
