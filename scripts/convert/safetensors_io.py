"""Read and write .safetensors files with numpy alone (no torch, no safetensors package).

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
{dtype, shape, data_offsets} (offsets relative to the end of the header) plus an optional
"__metadata__" dict of strings, then the raw little-endian tensor bytes.

Reading is lazy: `load_safetensors` memory-maps each file and returns `LazyTensor`s that only
touch their bytes when `.load()` is called, so a converter can stream a multi-GB checkpoint one
tensor at a time. Writing accepts arrays, or `TensorSpec`s that produce their array on demand,
so a fixture builder can write real-size checkpoints without holding every weight in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmcli.errors import ModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype name -> numpy dtype of the stored bytes. BF16 has no numpy dtype: it is read
# as uint16 and widened to float32 on load.
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_DTYPE_NAMES: dict[np.dtype, str] = {
    np.dtype("<f8"): "F64",
    np.dtype("<f4"): "F32",
    np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64",
    np.dtype("<i4"): "I32",
    np.dtype("<i2"): "I16",
    np.dtype("i1"): "I8",
    np.dtype("<u8"): "U64",
    np.dtype("<u4"): "U32",
    np.dtype("<u2"): "U16",
    np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 stored bits up."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even, NaN kept NaN), as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    # uint32 wraps only for NaN bit patterns, which are replaced below.
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded = np.where(nan, np.uint16(0x7FC0), rounded)
    return rounded


@dataclass(frozen=True)
class LazyTensor:
    """One tensor inside a safetensors file; `.load()` reads it.

    Each load maps just this tensor's bytes and drops the mapping afterwards, so converting a
    checkpoint keeps about one tensor resident, not the whole (page-cached) file.
    """

    name: str
    dtype: str  # safetensors dtype name: F32, F16, BF16, I64, ...
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def raw(self) -> np.ndarray:
        """The stored values without conversion (BF16 comes back as its uint16 bits), memory-mapped read-only."""
        stored = _NUMPY_DTYPES[self.dtype]
        if self.nbytes == 0:
            return np.zeros(self.shape, stored)
        return np.memmap(self.path, dtype=stored, mode="r", offset=self.offset, shape=self.shape)

    def load(self) -> np.ndarray:
        """The values as numpy: BF16 widened to float32, everything else in its stored dtype."""
        data = self.raw()
        out = bf16_bits_to_float32(data) if self.dtype == "BF16" else np.array(data)  # copies out of the map
        del data
        return out

    numpy = load

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, {self.dtype}, {self.shape}, {self.path.name})"


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ModelError("not a safetensors file (too short)", path)
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > size - 8 or n > 100_000_000:
                raise ModelError("not a safetensors file (bad header length)", path)
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelError(f"cannot read safetensors file ({e.strerror})", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError("not a safetensors file (header is not JSON)", path) from None
    if not isinstance(header, dict):
        raise ModelError("not a safetensors file (header is not a JSON object)", path)
    return header, 8 + n


def _load_file(path: Path) -> dict[str, LazyTensor]:
    header, data_start = _read_header(path)
    size = path.stat().st_size
    tensors: dict[str, LazyTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"malformed safetensors header entry for tensor {name}", path) from None
        if dtype not in _NUMPY_DTYPES:
            raise ModelError(f"tensor {name} has unsupported dtype {dtype}", path)
        expected = int(np.prod(shape, dtype=np.int64)) * _NUMPY_DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0 or data_start + end > size:
            raise ModelError(f"tensor {name} data is truncated or its size does not match its shape", path)
        tensors[name] = LazyTensor(name, dtype, shape, path, data_start + begin, end - begin)
    return tensors


def safetensors_files(path: str | os.PathLike[str]) -> list[Path]:
    """The .safetensors files making up a checkpoint (a file, or a folder with one file or shards)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ModelError("no such file or directory", p)
    index = p / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))  # keep order, drop duplicates
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError("malformed safetensors index (expected a weight_map)", index) from None
        files = [p / n for n in names]
        for f in files:
            if not f.is_file():
                raise ModelError(f"shard listed in {INDEX_FILE} is missing", f)
        return files
    single = p / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(p.glob("*.safetensors"))
    if not found:
        raise ModelError(f"no {SINGLE_FILE} (or {INDEX_FILE}) in the checkpoint folder", p)
    return found


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, LazyTensor]:
    """All tensors of a safetensors file or checkpoint folder (sharded or not), memory-mapped."""
    tensors: dict[str, LazyTensor] = {}
    for file in safetensors_files(path):
        for name, tensor in _load_file(file).items():
            if name in tensors:
                raise ModelError(f"tensor {name} appears in more than one shard", file)
            tensors[name] = tensor
    return tensors


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The "__metadata__" strings of one safetensors file."""
    header, _ = _read_header(Path(path))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write whose values are produced only when it is written (keeps memory flat)."""

    shape: tuple[int, ...]
    dtype: np.dtype | type | str  # dtype of the array `make` returns (before any BF16 conversion)
    make: Callable[[], np.ndarray]


TensorSource = np.ndarray | TensorSpec


def _stored(name: str, source: TensorSource, to_bf16: bool) -> tuple[str, tuple[int, ...], int]:
    """(safetensors dtype, shape, nbytes) of a tensor as it will be written."""
    shape = tuple(int(d) for d in source.shape)
    dtype = np.dtype(source.dtype).newbyteorder("<") if np.dtype(source.dtype).itemsize > 1 else np.dtype(source.dtype)
    if to_bf16 and dtype.kind == "f":
        return "BF16", shape, int(np.prod(shape, dtype=np.int64)) * 2
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
    return _DTYPE_NAMES[dtype], shape, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, TensorSource],
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: str | None = None,
) -> Path:
    """Write tensors (arrays or TensorSpecs) to one .safetensors file, one tensor at a time.

    dtype="BF16" stores every floating-point tensor as bfloat16 (what real checkpoints ship);
    otherwise each array keeps its own dtype. Tensors are written in the mapping's order.
    """
    if dtype not in (None, "BF16"):
        raise ValueError(f"unsupported dtype override {dtype!r} (only 'BF16')")
    to_bf16 = dtype == "BF16"
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    layout: list[tuple[str, str, tuple[int, ...], int]] = []
    for name, source in tensors.items():
        st_dtype, shape, nbytes = _stored(name, source, to_bf16)
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        layout.append((name, st_dtype, shape, nbytes))
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # align the data section like the reference writer

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, st_dtype, shape, nbytes in layout:
            source = tensors[name]
            array = source.make() if isinstance(source, TensorSpec) else source
            array = np.asarray(array)
            if tuple(array.shape) != shape:
                raise ValueError(f"tensor {name}: produced shape {array.shape}, declared {shape}")
            if st_dtype == "BF16":
                data = float32_to_bf16_bits(array.astype(np.float32, copy=False))
            else:
                data = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[st_dtype])
            if data.nbytes != nbytes:
                raise ValueError(f"tensor {name}: {data.nbytes} bytes, expected {nbytes}")
            f.write(data.tobytes(order="C"))
    os.replace(tmp, out)
    return out


def save_sharded_safetensors(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, TensorSource],
    shards: int,
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: str | None = None,
) -> list[Path]:
    """Write tensors as model-0000i-of-0000n.safetensors plus model.safetensors.index.json."""
    folder = Path(folder)
    names = list(tensors)
    shards = max(1, min(shards, len(names)))
    per_shard = -(-len(names) // shards)
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        part = names[i * per_shard : (i + 1) * per_shard]
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        for n in part:
            weight_map[n] = file_name
            total += _stored(n, tensors[n], dtype == "BF16")[2]
        files.append(save_safetensors(folder / file_name, {n: tensors[n] for n in part}, metadata, dtype=dtype))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files


def iter_tensors(tensors: Mapping[str, LazyTensor]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, loaded array) one at a time, so only one tensor is materialised at once."""
    for name, lazy in tensors.items():
        yield name, lazy.load()
