"""Read a GGUF header and tell what kind of model it holds, before a native library sees it.

llama.cpp and ggml abort the whole process on some malformed files, so every model path goes
through `inspect_gguf` first (validate.require_kind: then the rules). It parses the header itself (the
format is small: key/values, then tensor infos) rather than with gguf-py's GGUFReader, which builds a
numpy view for every one of the ~100k vocabulary strings and takes seconds; here string arrays are
skipped unless asked for.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from vlmcli.errors import ModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

ModelKind = Literal["llm", "mmproj", "clip"]

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
    # key -> (GGUF value type, array item type or None): mtmd's typed getters abort on another type
    types: dict[str, tuple[int, int | None]] = field(default_factory=dict, repr=False)


class _Corrupt(Exception):
    pass


# A file may hold anything where a name or string should be (a corrupt length reads megabytes of
# tensor data as one name): messages quote at most this much of any text read from a file.
QUOTE_CHARS = 60
GGUF_MAX_KEY = 65535  # the GGUF specification's bound on a key's length
GGML_MAX_NAME = 64  # ggml.h: a tensor name and its terminating NUL; gguf.cpp refuses longer ones


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """Text read from a file, for a one-line message: a short prefix, control characters escaped."""
    short = text if len(text) <= limit else text[:limit]
    shown = short if short.isprintable() else repr(short)
    return shown if short is text else f"{shown}... ({len(text):,} characters)"


def _p(name: str) -> str:
    """A key or tensor name for a one-line message."""
    return quote(name)


class _Reader:
    """Reads a GGUF header from a memory map (vocabularies hold ~100k strings: no syscall per string)."""

    def __init__(self, buf: Any, size: int):
        self.buf, self.size = buf, size
        self.pos = 0
        self.item_type: int | None = None  # the item type of the last array read

    def tell(self) -> int:
        return self.pos

    def read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt("runs past the end of the file")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Corrupt("runs past the end of the file")
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, max_bytes: int | None = None, what: str = "string") -> str:
        n = self.unpack("<Q")
        if max_bytes is not None and n > max_bytes:
            raise _Corrupt(f"a {what} {n:,} bytes long (at most {max_bytes:,})")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_strings: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            self.item_type = itype
            if count > self.size:
                raise _Corrupt("array length larger than the file")
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                data = self.read(struct.calcsize(fmt) * count)
                return list(struct.unpack(f"<{count}{fmt[1]}", data))
            if itype == _STRING:
                buf, pos, size, unpack = self.buf, self.pos, self.size, struct.unpack_from
                if keep_strings:
                    out = []
                    for _ in range(count):
                        if pos + 8 > size:
                            raise _Corrupt("runs past the end of the file")
                        n = unpack("<Q", buf, pos)[0]
                        pos += 8
                        if pos + n > size:
                            raise _Corrupt("runs past the end of the file")
                        out.append(buf[pos : pos + n].decode("utf-8", errors="replace"))
                        pos += n
                    self.pos = pos
                    return out
                for _ in range(count):  # skip: only the lengths are read
                    if pos + 8 > size:
                        raise _Corrupt("runs past the end of the file")
                    pos += 8 + unpack("<Q", buf, pos)[0]
                if pos > size:
                    raise _Corrupt("runs past the end of the file")
                self.pos = pos
                return count
            raise _Corrupt(f"unsupported array item type {itype}")
        raise _Corrupt(f"unknown value type {vtype}")


def read_gguf(
    path: str | os.PathLike[str],
    keep_string_arrays: bool = False,
    types: dict[str, tuple[int, int | None]] | None = None,
    keep_keys: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata and tensor infos. String arrays (the vocabulary) come back as their length unless kept
    (all of them, or those of `keep_keys`). `types`, if given, is filled with each key's GGUF type."""
    p = Path(path)
    size = p.stat().st_size
    if size < 24:
        raise _Corrupt("too short for a GGUF header")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = _Reader(mm, size)
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
            key = r.string(GGUF_MAX_KEY, "key")
            if key in meta:
                raise _Corrupt(f"key {_p(key)} appears twice")
            vtype = r.unpack("<I")
            r.item_type = None
            meta[key] = r.value(vtype, keep_string_arrays or key in keep_keys)
            if types is not None:
                types[key] = (vtype, r.item_type)
        raw = []
        for _ in range(n_tensors):
            name = r.string(GGML_MAX_NAME - 1, "tensor name")
            n_dims = r.unpack("<I")
            if n_dims > 4:  # GGML_MAX_DIMS
                raise _Corrupt(f"tensor {_p(name)} has {n_dims} dimensions")
            shape = tuple(r.unpack("<Q") for _ in range(n_dims))
            raw.append((name, shape, r.unpack("<I"), r.unpack("<Q")))
        align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
        data_start = (r.tell() + align - 1) // align * align
    if len({name for name, *_ in raw}) != len(raw):
        raise _Corrupt("a tensor name appears twice")
    tensors = []
    expected = 0  # gguf.cpp: tensor data is laid out in info order, each padded to the alignment
    for name, shape, tcode, rel in raw:
        try:
            qtype = GGMLQuantizationType(tcode)
        except ValueError:
            raise _Corrupt(f"tensor {_p(name)} has unknown type {tcode}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise _Corrupt(f"tensor {_p(name)} has unsupported type {qtype.name}")
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in shape:
            n *= d
        if shape and shape[0] % block:
            raise _Corrupt(f"tensor {_p(name)} rows are not a whole number of {qtype.name} blocks")
        n_bytes = n // block * type_size
        if rel != expected:
            raise _Corrupt(f"tensor {_p(name)} is at data offset {rel}, but the tensors before it end at {expected}")
        expected += (n_bytes + align - 1) // align * align
        offset = data_start + rel
        if offset + n_bytes > size:
            raise _Corrupt(f"tensor {_p(name)} runs past the end of the file (truncated?)")
        tensors.append(TensorInfo(name, shape, qtype.name, offset, n_bytes))
    return meta, tensors


def inspect_gguf(
    path: str | os.PathLike[str], keep_string_arrays: bool = False, keep_keys: frozenset[str] = frozenset()
) -> GgufInfo:
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
    types: dict[str, tuple[int, int | None]] = {}
    try:
        meta, tensors = read_gguf(p, keep_string_arrays, types, keep_keys)
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
    return GgufInfo(
        path=p,
        arch=arch,
        kind=kind,
        n_tensors=len(tensors),
        file_type=file_type,
        metadata=meta,
        tensors=tensors,
        types=types,
    )
