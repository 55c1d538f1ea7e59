"""Streaming GGUF output shared by the converters.

gguf's GGUFWriter normally keeps every tensor in memory until the end. Here the tensor infos
(name, shape, type, byte size) are declared first, the header and metadata written, and then
each tensor is loaded, converted and written one at a time, so converting a multi-GB checkpoint
needs about one tensor's worth of memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

QType = gguf.GGMLQuantizationType

# Output type names as llama.cpp spells them -> GGML tensor type for the bulk of the weights.
DIRECT_TYPES: dict[str, QType] = {
    "F32": QType.F32,
    "F16": QType.F16,
    "BF16": QType.BF16,
    "Q8_0": QType.Q8_0,
}
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


@dataclass
class PlannedTensor:
    """A tensor to write: its GGUF name, logical numpy shape, type, and how to get its float data."""

    name: str
    shape: tuple[int, ...]
    qtype: QType
    load: Callable[[], np.ndarray]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def quantizable(shape: tuple[int, ...], qtype: QType) -> bool:
    """Whether gguf can store a tensor of this shape as qtype (rows must fill whole blocks)."""
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return len(shape) > 0 and shape[-1] % block == 0


def weight_type(shape: tuple[int, ...], wanted: QType) -> QType:
    """The type llama.cpp's converter ends up with: wanted, or F16 when rows don't fill blocks."""
    if wanted in (QType.F32, QType.F16):
        return wanted
    return wanted if quantizable(shape, wanted) else QType.F16


def _stored_shape_dtype(t: PlannedTensor) -> tuple[tuple[int, ...], np.dtype, int]:
    if t.qtype == QType.F32:
        return t.shape, np.dtype(np.float32), t.n_elements * 4
    if t.qtype == QType.F16:
        return t.shape, np.dtype(np.float16), t.n_elements * 2
    byte_shape = tuple(int(d) for d in gguf.quant_shape_to_byte_shape(t.shape, t.qtype))
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape, dtype=np.int64))


def encode(data: np.ndarray, qtype: QType) -> np.ndarray:
    """float data -> the bytes GGUF stores for qtype (numpy float arrays for F32/F16)."""
    if qtype == QType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == QType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def declare_tensors(writer: gguf.GGUFWriter, tensors: list[PlannedTensor]) -> None:
    """Register every tensor's info (so parameter counts and the header are known up front)."""
    for t in tensors:
        shape, dtype, nbytes = _stored_shape_dtype(t)
        writer.add_tensor_info(t.name, shape, dtype, nbytes, raw_dtype=t.qtype)


def write_gguf(
    writer: gguf.GGUFWriter,
    path: Path,
    tensors: list[PlannedTensor],
    on_tensor: Callable[[int, int, str], None] | None = None,
    encoder: Callable[[np.ndarray, QType], np.ndarray] = encode,
) -> Path:
    """Write header, metadata, then each tensor in declaration order; atomically (rename at the end).
    `encoder` turns float data into the stored bytes (gguf-py's quantizer by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(tensors):
            data = t.load()
            if tuple(data.shape) != t.shape:
                raise ValueError(f"tensor {t.name}: got shape {data.shape}, declared {t.shape}")
            writer.write_tensor_data(encoder(data, t.qtype))
            if on_tensor is not None:
                on_tensor(i + 1, len(tensors), t.name)
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path
