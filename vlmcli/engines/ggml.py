"""ctypes bindings to the ggml shared libraries shipped inside llama-cpp-python (llama_cpp/lib/).

Only what CLIP's two towers need: contexts, tensors, a handful of ops, graphs, the backend API
(CPU, plus GPU devices when the build has them), graph allocation, and ggml's quantizer.

One copy of ggml per process: libllama.so pulls in lib/libggml.so.0 (and -base/-cpu .so.0) through
its RUNPATH, so we open exactly those files (or whatever copy of them is already mapped), never a
second build. Signatures and enum values follow ggml/include/ggml.h, ggml-backend.h, ggml-alloc.h
and ggml-cpu.h of llama.cpp as vendored in llama-cpp-python 0.3.36.

ggml aborts the whole process on a failed GGML_ASSERT, so `Graph` keeps every tensor's shape and
strides in Python and checks each op's preconditions before calling into the library. Shapes here
are in ggml order: `ne[0]` is the innermost (fastest) dimension, i.e. the reverse of numpy's shape.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmcli.errors import VlmError

# enum ggml_type (ggml.h). Removed values (4, 5, 31-33, 36-38) are left out on purpose.
GGML_TYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q8_0": 8,
    "Q8_1": 9,
    "Q2_K": 10,
    "Q3_K": 11,
    "Q4_K": 12,
    "Q5_K": 13,
    "Q6_K": 14,
    "Q8_K": 15,
    "IQ2_XXS": 16,
    "IQ2_XS": 17,
    "IQ3_XXS": 18,
    "IQ1_S": 19,
    "IQ4_NL": 20,
    "IQ3_S": 21,
    "IQ2_S": 22,
    "IQ4_XS": 23,
    "I8": 24,
    "I16": 25,
    "I32": 26,
    "I64": 27,
    "F64": 28,
    "IQ1_M": 29,
    "BF16": 30,
    "TQ1_0": 34,
    "TQ2_0": 35,
    "MXFP4": 39,
    "NVFP4": 40,
    "Q1_0": 41,
    "Q2_0": 42,
}
TYPE_NAMES: dict[int, str] = {v: k for k, v in GGML_TYPES.items()}
F32, F16, I32 = GGML_TYPES["F32"], GGML_TYPES["F16"], GGML_TYPES["I32"]

# Types ggml_quantize_chunk() handles without an importance matrix (its switch in ggml.c).
QUANTIZE_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
)

# enum ggml_backend_dev_type (ggml-backend.h)
DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL = 0, 1, 2, 3
GGML_STATUS = {-2: "allocation failed", -1: "failed", 0: "success", 1: "aborted"}


class ggml_init_params(ctypes.Structure):
    # struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; }  (ggml.h)
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class ggml_type_traits(ctypes.Structure):
    # struct ggml_type_traits (ggml.h); checked against ggml_blck_size / ggml_type_size before use
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)  # ggml_to_float_t


# --- loading the library -------------------------------------------------------------------------


def llama_cpp_lib_dir() -> Path:
    """llama_cpp/lib inside the installed llama-cpp-python, found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise VlmError("llama-cpp-python is not installed (ggml ships inside it)")
    return Path(os.path.abspath(list(spec.submodule_search_locations)[0])) / "lib"


def _mapped_copy(lib_dir: Path, stem: str) -> Path | None:
    """The file named stem(.N...) from lib_dir that this process has already mapped, if any."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    p = Path(parts[5].strip())
                    if p.parent == lib_dir and (p.name == stem or p.name.startswith(stem + ".")):
                        return p
    except OSError:  # not Linux
        pass
    return None


def _library_path(lib_dir: Path) -> Path:
    loaded = _mapped_copy(lib_dir, "libggml.so")
    if loaded is not None:
        return loaded
    # libllama.so's DT_NEEDED names the soname, so that is the file the dynamic loader picks
    for name in ("libggml.so.0", "libggml.so", "libggml.dylib", "ggml.dll"):
        if (lib_dir / name).exists():
            return lib_dir / name
    raise VlmError(f"no ggml library in {lib_dir}")


_vp, _i64, _i32, _f32, _sz, _bool = (
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int,
    ctypes.c_float,
    ctypes.c_size_t,
    ctypes.c_bool,
)

# name: (restype, argtypes). Symbols live in ggml-base (core, alloc, backend buffers), ggml-cpu (CPU
# backend) and ggml (the backend registry); dlsym on libggml searches its dependencies too.
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    # types
    "ggml_type_name": (ctypes.c_char_p, [_i32]),
    "ggml_blck_size": (_i64, [_i32]),
    "ggml_type_size": (_sz, [_i32]),
    "ggml_row_size": (_sz, [_i32, _i64]),
    "ggml_quantize_chunk": (_sz, [_i32, _vp, _vp, _i64, _i64, _i64, _vp]),
    "ggml_quantize_requires_imatrix": (_bool, [_i32]),
    "ggml_get_type_traits": (ctypes.POINTER(ggml_type_traits), [_i32]),
    # contexts and tensors
    "ggml_tensor_overhead": (_sz, []),
    "ggml_graph_overhead_custom": (_sz, [_sz, _bool]),
    "ggml_init": (_vp, [ggml_init_params]),
    "ggml_free": (None, [_vp]),
    "ggml_new_tensor_1d": (_vp, [_vp, _i32, _i64]),
    "ggml_new_tensor_2d": (_vp, [_vp, _i32, _i64, _i64]),
    "ggml_new_tensor_3d": (_vp, [_vp, _i32, _i64, _i64, _i64]),
    "ggml_new_tensor_4d": (_vp, [_vp, _i32, _i64, _i64, _i64, _i64]),
    "ggml_set_name": (_vp, [_vp, ctypes.c_char_p]),
    "ggml_set_input": (None, [_vp]),
    "ggml_set_output": (None, [_vp]),
    "ggml_nbytes": (_sz, [_vp]),
    "ggml_nelements": (_i64, [_vp]),
    "ggml_nrows": (_i64, [_vp]),
    "ggml_is_contiguous": (_bool, [_vp]),
    "ggml_is_transposed": (_bool, [_vp]),
    "ggml_get_data": (_vp, [_vp]),
    # ops
    # ctx, type, ne0..ne3, args, n_args, fun (ggml_custom_op_t), n_tasks, userdata
    "ggml_custom_4d": (_vp, [_vp, _i32, _i64, _i64, _i64, _i64, ctypes.POINTER(_vp), _i32, _vp, _i32, _vp]),
    "ggml_mul_mat": (_vp, [_vp, _vp, _vp]),
    "ggml_add": (_vp, [_vp, _vp, _vp]),
    "ggml_mul": (_vp, [_vp, _vp, _vp]),
    "ggml_norm": (_vp, [_vp, _vp, _f32]),
    "ggml_gelu": (_vp, [_vp, _vp]),
    "ggml_gelu_erf": (_vp, [_vp, _vp]),
    "ggml_gelu_quick": (_vp, [_vp, _vp]),
    "ggml_soft_max_ext": (_vp, [_vp, _vp, _vp, _f32, _f32]),
    "ggml_scale": (_vp, [_vp, _vp, _f32]),
    "ggml_reshape_2d": (_vp, [_vp, _vp, _i64, _i64]),
    "ggml_reshape_3d": (_vp, [_vp, _vp, _i64, _i64, _i64]),
    "ggml_reshape_4d": (_vp, [_vp, _vp, _i64, _i64, _i64, _i64]),
    "ggml_permute": (_vp, [_vp, _vp, _i32, _i32, _i32, _i32]),
    "ggml_transpose": (_vp, [_vp, _vp]),
    "ggml_cont": (_vp, [_vp, _vp]),
    "ggml_view_2d": (_vp, [_vp, _vp, _i64, _i64, _sz, _sz]),
    "ggml_view_3d": (_vp, [_vp, _vp, _i64, _i64, _i64, _sz, _sz, _sz]),
    "ggml_get_rows": (_vp, [_vp, _vp, _vp]),
    "ggml_concat": (_vp, [_vp, _vp, _vp, _i32]),
    "ggml_pad": (_vp, [_vp, _vp, _i32, _i32, _i32, _i32]),
    "ggml_repeat_4d": (_vp, [_vp, _vp, _i64, _i64, _i64, _i64]),
    # graphs
    "ggml_new_graph_custom": (_vp, [_vp, _sz, _bool]),
    "ggml_build_forward_expand": (None, [_vp, _vp]),
    "ggml_graph_n_nodes": (_i32, [_vp]),
    "ggml_graph_node": (_vp, [_vp, _i32]),
    # backends
    "ggml_backend_load_all": (None, []),
    "ggml_backend_dev_count": (_sz, []),
    "ggml_backend_dev_get": (_vp, [_sz]),
    "ggml_backend_dev_by_name": (_vp, [ctypes.c_char_p]),
    "ggml_backend_dev_by_type": (_vp, [_i32]),
    "ggml_backend_dev_name": (ctypes.c_char_p, [_vp]),
    "ggml_backend_dev_description": (ctypes.c_char_p, [_vp]),
    "ggml_backend_dev_type": (_i32, [_vp]),
    "ggml_backend_dev_init": (_vp, [_vp, ctypes.c_char_p]),
    "ggml_backend_dev_memory": (None, [_vp, ctypes.POINTER(_sz), ctypes.POINTER(_sz)]),
    "ggml_backend_dev_backend_reg": (_vp, [_vp]),
    "ggml_backend_reg_count": (_sz, []),
    "ggml_backend_reg_get": (_vp, [_sz]),
    "ggml_backend_reg_name": (ctypes.c_char_p, [_vp]),
    "ggml_backend_reg_dev_count": (_sz, [_vp]),
    "ggml_version": (ctypes.c_char_p, []),
    "ggml_commit": (ctypes.c_char_p, []),
    "ggml_backend_cpu_init": (_vp, []),
    "ggml_backend_is_cpu": (_bool, [_vp]),
    "ggml_backend_cpu_set_n_threads": (None, [_vp, _i32]),
    "ggml_cpu_has_avx512": (_i32, []),
    "ggml_cpu_has_avx512_bf16": (_i32, []),
    "ggml_backend_name": (ctypes.c_char_p, [_vp]),
    "ggml_backend_free": (None, [_vp]),
    "ggml_backend_supports_op": (_bool, [_vp, _vp]),
    "ggml_backend_get_default_buffer_type": (_vp, [_vp]),
    "ggml_backend_alloc_ctx_tensors": (_vp, [_vp, _vp]),
    "ggml_backend_buffer_free": (None, [_vp]),
    "ggml_backend_buffer_get_size": (_sz, [_vp]),
    "ggml_backend_tensor_set": (None, [_vp, _vp, _sz, _sz]),
    "ggml_backend_tensor_get": (None, [_vp, _vp, _sz, _sz]),
    "ggml_backend_graph_compute": (_i32, [_vp, _vp]),
    "ggml_gallocr_new": (_vp, [_vp]),
    "ggml_gallocr_free": (None, [_vp]),
    "ggml_gallocr_alloc_graph": (_bool, [_vp, _vp]),
    "ggml_gallocr_get_buffer_size": (_sz, [_vp, _i32]),
}


_CFunction = Callable[..., Any]  # a ctypes function; its argtypes and restype come from _SIGNATURES


class _Lib:
    """The ggml functions, with argtypes/restype set, as attributes: lib.ggml_init(...).

    Each is declared below so that mypy catches a misspelt name; tests/test_ggml.py checks the
    declarations and _SIGNATURES name the same functions.
    """

    ggml_type_name: _CFunction
    ggml_blck_size: _CFunction
    ggml_type_size: _CFunction
    ggml_row_size: _CFunction
    ggml_quantize_chunk: _CFunction
    ggml_quantize_requires_imatrix: _CFunction
    ggml_get_type_traits: _CFunction
    ggml_tensor_overhead: _CFunction
    ggml_graph_overhead_custom: _CFunction
    ggml_init: _CFunction
    ggml_free: _CFunction
    ggml_new_tensor_1d: _CFunction
    ggml_new_tensor_2d: _CFunction
    ggml_new_tensor_3d: _CFunction
    ggml_new_tensor_4d: _CFunction
    ggml_set_name: _CFunction
    ggml_set_input: _CFunction
    ggml_set_output: _CFunction
    ggml_nbytes: _CFunction
    ggml_nelements: _CFunction
    ggml_nrows: _CFunction
    ggml_is_contiguous: _CFunction
    ggml_is_transposed: _CFunction
    ggml_get_data: _CFunction
    ggml_custom_4d: _CFunction
    ggml_mul_mat: _CFunction
    ggml_add: _CFunction
    ggml_mul: _CFunction
    ggml_norm: _CFunction
    ggml_gelu: _CFunction
    ggml_gelu_erf: _CFunction
    ggml_gelu_quick: _CFunction
    ggml_soft_max_ext: _CFunction
    ggml_scale: _CFunction
    ggml_reshape_2d: _CFunction
    ggml_reshape_3d: _CFunction
    ggml_reshape_4d: _CFunction
    ggml_permute: _CFunction
    ggml_transpose: _CFunction
    ggml_cont: _CFunction
    ggml_view_2d: _CFunction
    ggml_view_3d: _CFunction
    ggml_get_rows: _CFunction
    ggml_concat: _CFunction
    ggml_pad: _CFunction
    ggml_repeat_4d: _CFunction
    ggml_new_graph_custom: _CFunction
    ggml_build_forward_expand: _CFunction
    ggml_graph_n_nodes: _CFunction
    ggml_graph_node: _CFunction
    ggml_backend_load_all: _CFunction
    ggml_backend_dev_count: _CFunction
    ggml_backend_dev_get: _CFunction
    ggml_backend_dev_by_name: _CFunction
    ggml_backend_dev_by_type: _CFunction
    ggml_backend_dev_name: _CFunction
    ggml_backend_dev_description: _CFunction
    ggml_backend_dev_type: _CFunction
    ggml_backend_dev_init: _CFunction
    ggml_backend_dev_memory: _CFunction
    ggml_backend_dev_backend_reg: _CFunction
    ggml_backend_reg_count: _CFunction
    ggml_backend_reg_get: _CFunction
    ggml_backend_reg_name: _CFunction
    ggml_backend_reg_dev_count: _CFunction
    ggml_version: _CFunction
    ggml_commit: _CFunction
    ggml_backend_cpu_init: _CFunction
    ggml_backend_is_cpu: _CFunction
    ggml_backend_cpu_set_n_threads: _CFunction
    ggml_cpu_has_avx512: _CFunction
    ggml_cpu_has_avx512_bf16: _CFunction
    ggml_backend_name: _CFunction
    ggml_backend_free: _CFunction
    ggml_backend_supports_op: _CFunction
    ggml_backend_get_default_buffer_type: _CFunction
    ggml_backend_alloc_ctx_tensors: _CFunction
    ggml_backend_buffer_free: _CFunction
    ggml_backend_buffer_get_size: _CFunction
    ggml_backend_tensor_set: _CFunction
    ggml_backend_tensor_get: _CFunction
    ggml_backend_graph_compute: _CFunction
    ggml_gallocr_new: _CFunction
    ggml_gallocr_free: _CFunction
    ggml_gallocr_alloc_graph: _CFunction
    ggml_gallocr_get_buffer_size: _CFunction

    def __init__(self, path: Path):
        self.path = path
        # RTLD_GLOBAL would not matter for a single copy; keep the default local binding like llama_cpp
        self.cdll = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.cdll, name)
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        # The enum values above come from the header; make sure this library agrees.
        for name, value in GGML_TYPES.items():
            got = (self.ggml_type_name(value) or b"").decode().upper()
            if got != name:
                raise VlmError(f"{path}: ggml type {value} is {got!r} here, expected {name}: unsupported ggml version")


_lib: _Lib | None = None


def lib() -> _Lib:
    """Load ggml once (lazily: importing vlmcli must not need llama-cpp-python)."""
    global _lib
    if _lib is None:
        _lib = _Lib(_library_path(llama_cpp_lib_dir()))
    return _lib


# --- types and quantization ----------------------------------------------------------------------


def type_id(qtype: str | int) -> int:
    if isinstance(qtype, str):
        key = qtype.upper()
        if key not in GGML_TYPES:
            raise VlmError(f"unknown ggml type {qtype!r}")
        return GGML_TYPES[key]
    value = int(qtype)  # ints and gguf.GGMLQuantizationType (an IntEnum with the same values)
    if value not in TYPE_NAMES:
        raise VlmError(f"unknown ggml type {qtype!r}")
    return value


def type_name(qtype: str | int) -> str:
    return TYPE_NAMES[type_id(qtype)]


def block_size(qtype: str | int) -> int:
    return int(lib().ggml_blck_size(type_id(qtype)))


def type_size(qtype: str | int) -> int:
    return int(lib().ggml_type_size(type_id(qtype)))


def row_size(qtype: str | int, n: int) -> int:
    """Bytes of one row of n values (n must be a multiple of the block size)."""
    t = type_id(qtype)
    if n % block_size(t):
        raise VlmError(f"{type_name(t)} rows need a multiple of {block_size(t)} values, got {n}")
    return int(lib().ggml_row_size(t, n))


def quantize(data: np.ndarray, qtype: str | int) -> np.ndarray:
    """Quantize rows of data.shape[-1] float values with ggml's own quantizer.

    Returns uint8 of shape data.shape[:-1] + (bytes per row,), the layout GGUFWriter.add_tensor
    expects together with raw_dtype. Raises VlmError for a row length the type can't take.
    """
    name = type_name(qtype)
    t = GGML_TYPES[name]
    if name not in QUANTIZE_TYPES:
        raise VlmError(f"cannot quantize to {name} (supported: {', '.join(QUANTIZE_TYPES)})")
    arr = np.ascontiguousarray(data, dtype=np.float32)
    if arr.ndim < 1 or arr.shape[-1] == 0:
        raise VlmError(f"cannot quantize an array of shape {arr.shape}")
    n_per_row = int(arr.shape[-1])
    nrows = int(arr.size // n_per_row)
    row_bytes = row_size(t, n_per_row)  # raises for a bad row length
    out = np.empty(arr.shape[:-1] + (row_bytes,), dtype=np.uint8)
    if nrows:
        written = lib().ggml_quantize_chunk(t, arr.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, None)
        if written != out.nbytes:
            raise VlmError(f"ggml wrote {written} bytes quantizing to {name}, expected {out.nbytes}")
    return out


def dequantize(raw: np.ndarray, qtype: str | int) -> np.ndarray:
    """A tensor's stored bytes (F16 or a quantized type) -> its values, float32, flat, by ggml's own
    dequantizer: gguf-py's numpy one took 0.7 s of a Q8_0 ViT-B/32's load, which now takes as long as
    an F16 one's."""
    t = type_id(qtype)
    name, traits = type_name(t), lib().ggml_get_type_traits(t).contents
    if (
        (traits.type_name or b"").decode().upper() != name
        or traits.blck_size != block_size(t)
        or traits.type_size != type_size(t)
        or not traits.to_float
    ):
        raise VlmError(f"ggml's type traits for {name} are not as expected: unsupported ggml version")
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size % traits.type_size:
        raise VlmError(f"{data.size} bytes are not whole {name} blocks of {traits.type_size}")
    out = np.empty(data.size // traits.type_size * traits.blck_size, np.float32)
    if out.size:
        _TO_FLOAT(traits.to_float)(data.ctypes.data, out.ctypes.data, out.size)
    return out


# --- tensors and graphs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """A ggml tensor pointer plus its type, shape and strides, tracked in Python (ggml order)."""

    ptr: int
    type: int
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int]

    @property
    def shape(self) -> tuple[int, ...]:
        """ne without trailing 1s, for messages."""
        dims = list(self.ne)
        while len(dims) > 1 and dims[-1] == 1:
            dims.pop()
        return tuple(dims)

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)

    @property
    def nbytes(self) -> int:
        return row_size(self.type, self.ne[0]) * self.ne[1] * self.ne[2] * self.ne[3]

    def is_contiguous(self) -> bool:  # ggml_is_contiguous_0 in ggml.c
        next_nb = type_size(self.type)
        if self.ne[0] != block_size(self.type) and self.nb[0] != next_nb:
            return False
        next_nb *= self.ne[0] // block_size(self.type)
        for i in range(1, 4):
            if self.ne[i] != 1 and self.nb[i] != next_nb:
                return False
            next_nb *= self.ne[i]
        return True

    def is_transposed(self) -> bool:
        return self.nb[0] > self.nb[1]


def _contiguous_strides(t: int, ne: Sequence[int]) -> tuple[int, int, int, int]:
    nb0 = type_size(t)
    nb1 = nb0 * (ne[0] // block_size(t))
    return (nb0, nb1, nb1 * ne[1], nb1 * ne[1] * ne[2])


def _pad4(ne: Sequence[int]) -> tuple[int, int, int, int]:
    if not 1 <= len(ne) <= 4 or any(int(n) < 0 for n in ne):
        raise VlmError(f"bad tensor shape {tuple(ne)}")
    dims = [int(n) for n in ne] + [1] * (4 - len(ne))
    return (dims[0], dims[1], dims[2], dims[3])


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise VlmError(message)


class Graph:
    """A ggml context holding tensor metadata, with shape-checked ops that build a graph.

    no_alloc=True: tensors get their memory later from a backend buffer (weights) or a graph
    allocator (activations); this context only holds their headers and the graph.
    """

    def __init__(self, max_tensors: int, graph_size: int = 0):
        L = lib()
        self.graph_size = graph_size
        mem = L.ggml_tensor_overhead() * max_tensors
        if graph_size:
            mem += L.ggml_graph_overhead_custom(graph_size, False)
        self.max_tensors = max_tensors
        self.n_tensors = 0
        self._userdata: list[ctypes.Structure] = []  # of custom ops, alive as long as the graph
        self.ctx = L.ggml_init(ggml_init_params(mem_size=mem, mem_buffer=None, no_alloc=True))
        if not self.ctx:
            raise VlmError("ggml_init failed (out of memory?)")
        self.cgraph = L.ggml_new_graph_custom(self.ctx, graph_size, False) if graph_size else None

    def close(self) -> None:
        if self.ctx:
            lib().ggml_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _made(self, ptr: int, t: int, ne: Sequence[int], nb: Sequence[int] | None = None) -> Tensor:
        if not ptr:
            raise VlmError("ggml returned no tensor")
        ne4 = _pad4(ne)
        strides = tuple(nb) if nb is not None else _contiguous_strides(t, ne4)
        return Tensor(ptr, t, ne4, strides)  # type: ignore[arg-type]

    # every op (views included) takes one tensor header from the context; running out would abort in ggml
    def _reserve(self, n: int = 1) -> None:
        _check(self.n_tensors + n <= self.max_tensors, f"ggml context full ({self.max_tensors} tensors)")
        self.n_tensors += n

    # --- creation
    def new_tensor(self, qtype: str | int, ne: Sequence[int], name: str | None = None) -> Tensor:
        t = type_id(qtype)
        ne4 = _pad4(ne)
        _check(
            ne4[0] % block_size(t) == 0, f"{type_name(t)} rows need a multiple of {block_size(t)} values, got {ne4[0]}"
        )
        self._reserve()
        ptr = lib().ggml_new_tensor_4d(self.ctx, t, *ne4)
        if name:
            lib().ggml_set_name(ptr, name.encode()[:63])
        return self._made(ptr, t, ne4)

    def input(self, qtype: str | int, ne: Sequence[int], name: str | None = None) -> Tensor:
        x = self.new_tensor(qtype, ne, name)
        lib().ggml_set_input(x.ptr)
        return x

    # --- ops
    def mul_mat(self, a: Tensor, b: Tensor) -> Tensor:
        """a [k, m, ...] x b [k, n, ...] -> [m, n, ...]  (a is typically a weight, nn.Linear layout)."""
        _check(
            a.ne[0] == b.ne[0] and b.ne[2] % a.ne[2] == 0 and b.ne[3] % a.ne[3] == 0,
            f"mul_mat: shapes {a.shape} and {b.shape} do not match",
        )
        _check(not a.is_transposed(), "mul_mat: first operand is transposed")
        _check(b.type == F32, "mul_mat: second operand must be F32")
        self._reserve()
        return self._made(lib().ggml_mul_mat(self.ctx, a.ptr, b.ptr), F32, (a.ne[1], b.ne[1], b.ne[2], b.ne[3]))

    def _binary(self, fn: Any, op: str, a: Tensor, b: Tensor) -> Tensor:
        _check(
            all(b.ne[i] and a.ne[i] % b.ne[i] == 0 for i in range(4)),
            f"{op}: {b.shape} does not broadcast to {a.shape}",
        )
        _check(a.type == F32 and b.type == F32, f"{op}: operands must be F32")
        self._reserve()
        return self._made(fn(self.ctx, a.ptr, b.ptr), a.type, a.ne)

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib().ggml_add, "add", a, b)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(lib().ggml_mul, "mul", a, b)

    def _unary(self, fn: Any, op: str, a: Tensor, *args: Any) -> Tensor:
        _check(a.type == F32, f"{op}: operand must be F32")
        self._reserve()
        return self._made(fn(self.ctx, a.ptr, *args), a.type, a.ne)

    def norm(self, a: Tensor, eps: float) -> Tensor:
        """(x - mean) / sqrt(var + eps) over ne[0]."""
        return self._unary(lib().ggml_norm, "norm", a, float(eps))

    def gelu(self, a: Tensor) -> Tensor:  # tanh approximation
        return self._unary(lib().ggml_gelu, "gelu", a)

    def gelu_erf(self, a: Tensor) -> Tensor:  # exact gelu, what HF calls "gelu"
        return self._unary(lib().ggml_gelu_erf, "gelu_erf", a)

    def gelu_quick(self, a: Tensor) -> Tensor:  # x * sigmoid(1.702 x)
        return self._unary(lib().ggml_gelu_quick, "gelu_quick", a)

    def scale(self, a: Tensor, s: float) -> Tensor:
        return self._unary(lib().ggml_scale, "scale", a, float(s))

    def soft_max_ext(self, a: Tensor, mask: Tensor | None, scale: float, max_bias: float = 0.0) -> Tensor:
        """softmax(a * scale + mask) over ne[0]."""
        _check(a.type == F32 and a.is_contiguous(), "soft_max: operand must be contiguous F32")
        if mask is not None:
            _check(mask.type in (F32, F16) and mask.is_contiguous(), "soft_max: mask must be contiguous F32/F16")
            _check(
                mask.ne[0] == a.ne[0]
                and mask.ne[1] >= a.ne[1]
                and a.ne[2] % mask.ne[2] == 0
                and a.ne[3] % mask.ne[3] == 0,
                f"soft_max: mask {mask.shape} does not fit {a.shape}",
            )
        _check(max_bias == 0.0 or mask is not None, "soft_max: max_bias needs a mask")
        self._reserve()
        ptr = lib().ggml_soft_max_ext(self.ctx, a.ptr, mask.ptr if mask else None, float(scale), float(max_bias))
        return self._made(ptr, F32, a.ne)

    def reshape(self, a: Tensor, *ne: int) -> Tensor:
        _check(a.is_contiguous(), "reshape: operand is not contiguous")
        ne4 = _pad4(ne)
        _check(math.prod(ne4) == a.n_elements, f"reshape: {a.shape} has {a.n_elements} values, not {math.prod(ne4)}")
        _check(ne4[0] % block_size(a.type) == 0, "reshape: rows must hold whole blocks")
        self._reserve()
        L = lib()
        if len(ne) == 2:
            ptr = L.ggml_reshape_2d(self.ctx, a.ptr, ne4[0], ne4[1])
        elif len(ne) == 3:
            ptr = L.ggml_reshape_3d(self.ctx, a.ptr, ne4[0], ne4[1], ne4[2])
        else:
            _check(len(ne) == 4, "reshape: give 2 to 4 dimensions")
            ptr = L.ggml_reshape_4d(self.ctx, a.ptr, *ne4)
        return self._made(ptr, a.type, ne4)

    def permute(self, a: Tensor, ax0: int, ax1: int, ax2: int, ax3: int) -> Tensor:
        """Dimension i of a becomes dimension ax_i of the result (ggml's convention, a view)."""
        axes = (ax0, ax1, ax2, ax3)
        _check(sorted(axes) == [0, 1, 2, 3], f"permute: bad axes {axes}")
        ne, nb = [0] * 4, [0] * 4
        for i, ax in enumerate(axes):
            ne[ax], nb[ax] = a.ne[i], a.nb[i]
        self._reserve()
        return self._made(lib().ggml_permute(self.ctx, a.ptr, *axes), a.type, ne, nb)

    def transpose(self, a: Tensor) -> Tensor:
        self._reserve()
        ne = (a.ne[1], a.ne[0], a.ne[2], a.ne[3])
        nb = (a.nb[1], a.nb[0], a.nb[2], a.nb[3])
        return self._made(lib().ggml_transpose(self.ctx, a.ptr), a.type, ne, nb)

    def cont(self, a: Tensor) -> Tensor:
        self._reserve()
        return self._made(lib().ggml_cont(self.ctx, a.ptr), a.type, a.ne)

    def view_rows(self, a: Tensor, n_rows: int, first_row: int = 0) -> Tensor:
        """Rows [first_row, first_row + n_rows) of a contiguous 2-D tensor (a view)."""
        _check(a.is_contiguous() and a.ne[2] == a.ne[3] == 1, "view_rows: needs a contiguous 2-D tensor")
        _check(
            0 <= first_row and n_rows >= 0 and first_row + n_rows <= a.ne[1],
            f"view_rows: rows {first_row}..{first_row + n_rows} out of {a.ne[1]}",
        )
        self._reserve()
        ptr = lib().ggml_view_2d(self.ctx, a.ptr, a.ne[0], n_rows, a.nb[1], first_row * a.nb[1])
        return self._made(ptr, a.type, (a.ne[0], n_rows), (a.nb[0], a.nb[1], a.nb[1] * n_rows, a.nb[1] * n_rows))

    def get_rows(self, a: Tensor, rows: Tensor) -> Tensor:
        """a [k, n] gathered at the I32 row ids in rows [m] -> [k, m] (F32)."""
        _check(rows.type == I32 and rows.ne[1] == rows.ne[2] == rows.ne[3] == 1, "get_rows: ids must be 1-D I32")
        _check(a.ne[2] == a.ne[3] == 1, "get_rows: data must be 2-D")
        self._reserve()
        return self._made(lib().ggml_get_rows(self.ctx, a.ptr, rows.ptr), F32, (a.ne[0], rows.ne[0]))

    def concat(self, a: Tensor, b: Tensor, dim: int) -> Tensor:
        _check(0 <= dim < 4 and a.type == b.type, "concat: bad dim or mixed types")
        _check(all(a.ne[d] == b.ne[d] for d in range(4) if d != dim), f"concat: {a.shape} and {b.shape} differ")
        ne = list(a.ne)
        ne[dim] += b.ne[dim]
        self._reserve()
        return self._made(lib().ggml_concat(self.ctx, a.ptr, b.ptr, dim), a.type, ne)

    def pad(self, a: Tensor, *pad: int) -> Tensor:
        """a with zeros appended: pad[i] more elements along dimension i."""
        p4 = tuple(int(p) for p in pad) + (0,) * (4 - len(pad))
        _check(len(p4) == 4 and all(p >= 0 for p in p4), f"pad: bad padding {pad}")
        self._reserve()
        return self._made(lib().ggml_pad(self.ctx, a.ptr, *p4), a.type, [n + p for n, p in zip(a.ne, p4)])

    def custom(self, ne: Sequence[int], args: Sequence[Tensor], fun: int, userdata: ctypes.Structure) -> Tensor:
        """An F32 tensor of shape ne computed by fun(dst, ith, nth, userdata) on every thread (a
        ggml_custom_op_t); args are the tensors it reads, so the graph computes them first. The graph
        keeps userdata alive, since ggml holds only its address."""
        _check(len(args) < 10, "custom: at most 9 arguments")
        self._reserve()
        arr = (ctypes.c_void_p * max(1, len(args)))(*[a.ptr for a in args])
        self._userdata.append(userdata)
        ptr = lib().ggml_custom_4d(self.ctx, F32, *_pad4(ne), arr, len(args), fun, -1, ctypes.addressof(userdata))
        return self._made(ptr, F32, ne)

    def repeat(self, a: Tensor, *ne: int) -> Tensor:
        ne4 = _pad4(ne)
        _check(all(ne4[i] % a.ne[i] == 0 for i in range(4)), f"repeat: {a.shape} does not tile {ne4}")
        self._reserve()
        return self._made(lib().ggml_repeat_4d(self.ctx, a.ptr, *ne4), a.type, ne4)

    # --- the graph
    def output(self, t: Tensor) -> Tensor:
        """Mark t as a result and add it (and everything it depends on) to the graph."""
        _check(self.cgraph is not None, "this context has no graph")
        lib().ggml_set_output(t.ptr)
        lib().ggml_build_forward_expand(self.cgraph, t.ptr)
        _check(lib().ggml_graph_n_nodes(self.cgraph) <= self.graph_size, "graph too big")
        return t

    def nodes(self) -> list[int]:
        L = lib()
        return [L.ggml_graph_node(self.cgraph, i) for i in range(L.ggml_graph_n_nodes(self.cgraph))]


# --- backends ------------------------------------------------------------------------------------

DEVICE_TYPES = {DEV_CPU: "cpu", DEV_GPU: "gpu", DEV_IGPU: "igpu", DEV_ACCEL: "accel"}


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # what --device takes: CPU, CUDA0, ROCm0, Vulkan0, MTL0, ...
    description: str  # the hardware, e.g. "NVIDIA GeForce RTX 4090" or the CPU model
    type: str  # cpu | gpu | igpu | accel
    backend: str  # the registry it belongs to: CPU, CUDA, Vulkan, Metal, BLAS, ...
    memory_total: int  # bytes (system memory for the CPU)
    memory_free: int


def devices(load_all: bool = True) -> list[DeviceInfo]:
    """Every ggml device with its backend and memory. load_all, as Backend does before it picks a GPU,
    so that builds whose GPU backends are separate modules show them too."""
    L = lib()
    if load_all:
        L.ggml_backend_load_all()
    out = []
    for i in range(L.ggml_backend_dev_count()):
        dev = L.ggml_backend_dev_get(i)
        free, total = _sz(0), _sz(0)
        L.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = L.ggml_backend_dev_backend_reg(dev)
        kind = L.ggml_backend_dev_type(dev)
        out.append(
            DeviceInfo(
                name=(L.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                description=(L.ggml_backend_dev_description(dev) or b"").decode(errors="replace").strip(),
                type=DEVICE_TYPES.get(kind, str(kind)),
                backend=(L.ggml_backend_reg_name(reg) or b"").decode(errors="replace") if reg else "",
                memory_total=int(total.value),
                memory_free=int(free.value),
            )
        )
    return out


def backends(load_all: bool = True) -> list[tuple[str, int]]:
    """(name, device count) of every registered ggml backend: CPU, plus BLAS, CUDA, Metal... as built."""
    L = lib()
    if load_all:
        L.ggml_backend_load_all()
    out = []
    for i in range(L.ggml_backend_reg_count()):
        reg = L.ggml_backend_reg_get(i)
        out.append(
            ((L.ggml_backend_reg_name(reg) or b"").decode(errors="replace"), int(L.ggml_backend_reg_dev_count(reg)))
        )
    return out


def version() -> tuple[str, str]:
    """(ggml version, ggml_commit(): the short git commit its build recorded, "unknown" when built
    outside a git checkout, "-dirty" when the tree had changes)."""
    L = lib()
    return (L.ggml_version() or b"").decode(), (L.ggml_commit() or b"").decode()


class Backend:
    """A ggml backend (CPU by default, a GPU device on request) and its graph allocator."""

    def __init__(self, device: str | None = None, gpu: bool = False, n_threads: int | None = None):
        L = lib()
        if device is not None and device.lower() != "cpu":
            L.ggml_backend_load_all()  # GPU backends may be separate modules in some builds
            dev = L.ggml_backend_dev_by_name(device.encode())
            if not dev:
                names = ", ".join(d.name for d in devices())
                raise VlmError(f"no ggml device named {device!r} in this build (available: {names})")
            self.ptr = L.ggml_backend_dev_init(dev, None)
        elif gpu and device is None and self._gpu_device():
            self.ptr = L.ggml_backend_dev_init(self._gpu_device(), None)
        else:  # as llama.cpp does with -ngl on a build without a GPU backend: the CPU
            self.ptr = L.ggml_backend_cpu_init()
        if not self.ptr:
            raise VlmError("could not initialise the ggml backend")
        self.name = L.ggml_backend_name(self.ptr).decode()
        self.is_cpu = bool(L.ggml_backend_is_cpu(self.ptr))
        self.n_threads = int(n_threads or os.cpu_count() or 1)
        if self.n_threads < 1:
            raise VlmError(f"n_threads must be at least 1, got {n_threads}")
        if self.is_cpu:
            L.ggml_backend_cpu_set_n_threads(self.ptr, self.n_threads)
        self.buffer_type = L.ggml_backend_get_default_buffer_type(self.ptr)
        self.gallocr = L.ggml_gallocr_new(self.buffer_type)
        self.buffers: list[int] = []

    @staticmethod
    def _gpu_device() -> int | None:
        L = lib()
        L.ggml_backend_load_all()  # GPU backends may be separate modules in some builds
        return L.ggml_backend_dev_by_type(DEV_GPU) or L.ggml_backend_dev_by_type(DEV_IGPU) or None

    def set_threads(self, n: int) -> None:
        """Threads for the next compute (CPU backend; at most the n_threads it was created with)."""
        if self.is_cpu:
            lib().ggml_backend_cpu_set_n_threads(self.ptr, max(1, min(int(n), self.n_threads)))

    def alloc_tensors(self, g: Graph) -> int:
        """Give every tensor of a no_alloc context memory in one backend buffer; returns its size."""
        buf = lib().ggml_backend_alloc_ctx_tensors(g.ctx, self.ptr)
        if not buf:
            raise VlmError("out of memory allocating the model weights")
        self.buffers.append(buf)
        return int(lib().ggml_backend_buffer_get_size(buf))

    @staticmethod
    def set(t: Tensor, data: np.ndarray) -> None:
        """Copy data (exactly t's bytes) into t."""
        arr = np.ascontiguousarray(data)
        _check(arr.nbytes == t.nbytes, f"tensor needs {t.nbytes} bytes, got {arr.nbytes}")
        lib().ggml_backend_tensor_set(t.ptr, arr.ctypes.data, 0, arr.nbytes)

    @staticmethod
    def get(t: Tensor, ndim: int = 4) -> np.ndarray:
        """An F32 tensor's values as a numpy array of ndim dimensions in numpy order (reversed ne)."""
        _check(t.type == F32 and t.is_contiguous(), "can only read contiguous F32 tensors")
        _check(1 <= ndim <= 4 and all(n == 1 for n in t.ne[ndim:]), f"tensor {t.shape} has more than {ndim} dimensions")
        out = np.empty(tuple(reversed(t.ne[:ndim])), dtype=np.float32)
        lib().ggml_backend_tensor_get(t.ptr, out.ctypes.data, 0, out.nbytes)
        return out

    def allocate(self, g: Graph) -> None:
        """Give g's activations memory, reusing the allocator's buffer; set the inputs after this."""
        L = lib()
        if not self.is_cpu:
            for node in g.nodes():
                if not L.ggml_backend_supports_op(self.ptr, node):
                    raise VlmError(f"the {self.name} backend cannot run this model (unsupported op)")
        if not L.ggml_gallocr_alloc_graph(self.gallocr, g.cgraph):
            raise VlmError("out of memory allocating the compute graph")

    def compute(self, g: Graph) -> None:
        status = lib().ggml_backend_graph_compute(self.ptr, g.cgraph)
        if status != 0:
            raise VlmError(f"ggml graph compute {GGML_STATUS.get(status, status)}")

    def compute_buffer_size(self) -> int:
        return int(lib().ggml_gallocr_get_buffer_size(self.gallocr, 0))

    def close(self) -> None:
        L = lib()
        if self.gallocr:
            L.ggml_gallocr_free(self.gallocr)
            self.gallocr = None
        for buf in self.buffers:
            L.ggml_backend_buffer_free(buf)
        self.buffers = []
        if self.ptr:
            L.ggml_backend_free(self.ptr)
            self.ptr = None


__all__ = [
    "GGML_TYPES",
    "QUANTIZE_TYPES",
    "Backend",
    "DeviceInfo",
    "Graph",
    "Tensor",
    "backends",
    "block_size",
    "devices",
    "lib",
    "version",
    "llama_cpp_lib_dir",
    "quantize",
    "row_size",
    "type_id",
    "type_name",
    "type_size",
]
