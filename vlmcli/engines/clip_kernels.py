"""vlm's own CPU kernels for CLIP (_clip_kernels.c) as ops in ggml graphs.

Where the CPU has AVX512_BF16, CLIP's F16 / F32 matmul weights are held as BF16, packed for the
kernel when the model loads (`pack`), and every linear layer of a graph runs through it (`linear`),
with its bias (and a quick GELU after fc1) applied as the results leave the registers. ggml's own
BF16 mul_mat reaches 165-250 GFLOPS on ViT-B/32's shapes on a 2-core AVX-512 EPYC, this kernel
360-400 (benchmarks/bench_matmul.py). `attention` runs a layer's attention in one op over sequences
packed one after another (no padding between texts of different lengths). It is a C extension
built when vlm is installed; where it did not build or the CPU lacks AVX512_BF16, `available()`
is False and CLIP keeps ggml's own ops.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import numpy as np

from vlmcli.engines import ggml
from vlmcli.engines.ggml import Graph, Tensor

PANEL = 32  # output columns per packed panel (NR in the C file)
K_MULTIPLE = 16  # the kernel rounds 16 activations to BF16 at a time
ACTIVATIONS = {None: 0, "gelu_quick": 1}  # what the kernel can apply itself (act in the C struct)
MAX_HEAD_SIZE = 256  # attention: a head of hd floats (a multiple of 16) accumulates in hd / 16 registers


class MatmulOp(ctypes.Structure):
    """struct vlm_matmul in _clip_kernels.c: one linear layer in one graph."""

    _fields_ = [("get_data", ctypes.c_void_p), ("x", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("w", ctypes.c_void_p), ("m", ctypes.c_int64), ("k", ctypes.c_int64), ("n", ctypes.c_int64),
                ("act", ctypes.c_int32)]


class AttentionOp(ctypes.Structure):
    """struct vlm_attention in _clip_kernels.c: one layer's attention in one graph."""

    _fields_ = [("get_data", ctypes.c_void_p), ("qkv", ctypes.c_void_p), ("seqs", ctypes.c_void_p),
                ("n_seqs", ctypes.c_int64), ("d", ctypes.c_int64), ("n_heads", ctypes.c_int64),
                ("scale", ctypes.c_float), ("causal", ctypes.c_int32)]


@functools.lru_cache(maxsize=1)
def _kernel() -> ctypes.CDLL | None:
    try:
        from vlmcli.engines import _clip_kernels  # type: ignore[attr-defined]
    except ImportError:  # not built here (no compiler at install, not x86): ggml's mul_mat does the work
        return None
    lib = ctypes.CDLL(_clip_kernels.__file__)
    lib.vlm_clip_kernels_available.restype = ctypes.c_int
    return lib if lib.vlm_clip_kernels_available() else None


def available() -> bool:
    """Whether the kernels were built and this CPU runs them (AVX512_BF16)."""
    return _kernel() is not None


def _loaded() -> ctypes.CDLL:
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("vlm's CLIP kernels are not available on this machine")
    return kernel


def _get_data() -> int:
    return ctypes.cast(ggml.lib().ggml_get_data, ctypes.c_void_p).value  # type: ignore[return-value]


def fits(k: int, n: int) -> bool:
    """Whether a k -> n weight can be packed (CLIP's widths are multiples of 64)."""
    return k > 0 and n > 0 and k % K_MULTIPLE == 0 and n % PANEL == 0


@dataclass(frozen=True)
class PackedWeight:
    """A k -> n weight as BF16 in the kernel's layout: [n / 32][k / 2][32][2]."""

    data: np.ndarray  # uint16
    k: int
    n: int


def pack(rows: np.ndarray) -> PackedWeight:
    """BF16 bits of a weight, (n, k) in numpy order (HF's nn.Linear layout) -> the kernel's layout."""
    n, k = rows.shape
    if not fits(k, n):
        raise ValueError(f"a {k} -> {n} weight does not fit the BF16 kernel")
    pairs = np.ascontiguousarray(rows, dtype=np.uint16).view(np.uint32)  # a pair of k as one item: a faster copy
    packed = np.ascontiguousarray(pairs.reshape(n // PANEL, PANEL, k // 2).transpose(0, 2, 1))
    return PackedWeight(packed.view(np.uint16).reshape(n // PANEL, k // 2, PANEL, 2), k, n)


def unpack(w: PackedWeight) -> np.ndarray:
    """The (n, k) BF16 bits back (for tests)."""
    return w.data.reshape(w.n // PANEL, w.k // 2, PANEL, 2).transpose(0, 2, 1, 3).reshape(w.n, w.k)


def linear(g: Graph, x: Tensor, w: PackedWeight, bias: Tensor | None = None, act: str | None = None) -> Tensor:
    """act(x @ w.T + bias) for x [k, ...] F32 contiguous -> [n, ...], on every thread of the graph."""
    kernel = _loaded()
    if x.type != ggml.F32 or not x.is_contiguous() or x.ne[0] != w.k:
        raise ValueError(f"the BF16 kernel needs contiguous F32 rows of {w.k}, got {x.shape}")
    if bias is not None and (bias.type != ggml.F32 or bias.n_elements != w.n or not bias.is_contiguous()):
        raise ValueError(f"the BF16 kernel needs an F32 bias of {w.n}, got {bias.shape}")
    op = MatmulOp(get_data=_get_data(), x=x.ptr,
                  bias=bias.ptr if bias is not None else None, w=w.data.ctypes.data,
                  m=x.n_elements // w.k, k=w.k, n=w.n, act=ACTIVATIONS[act])
    op.weight = w  # the C side holds only the address of its data
    fun = ctypes.cast(kernel.vlm_bf16_matmul_op, ctypes.c_void_p).value  # type: ignore[union-attr]
    args = [x] if bias is None else [x, bias]
    return g.custom((w.n, *x.ne[1:]), args, fun, op)


def attention_fits(d: int, n_heads: int) -> bool:
    """Whether the attention op takes d = n_heads heads of hd floats."""
    hd = d // n_heads if n_heads > 0 else 0
    return hd > 0 and d == hd * n_heads and hd % 16 == 0 and hd <= MAX_HEAD_SIZE


def attention(g: Graph, qkv: Tensor, seqs: np.ndarray, n_heads: int, causal: bool) -> Tensor:
    """Multi-head attention over sequences packed one after another: qkv [3 d, m] F32 holds each token's
    q, k and v (as one linear layer of 3 d outputs gives them); seqs (n, 2) int32 rows of (first token,
    length) tile the m tokens. Returns [d, m], each token's heads side by side (for the out projection)."""
    kernel = _loaded()
    d, m = qkv.ne[0] // 3, qkv.n_elements // qkv.ne[0]
    if qkv.type != ggml.F32 or not qkv.is_contiguous() or qkv.ne[0] != 3 * d or not attention_fits(d, n_heads):
        raise ValueError(f"the attention op needs contiguous F32 q, k, v of {n_heads} heads, got {qkv.shape}")
    seqs = np.ascontiguousarray(seqs, dtype=np.int32)
    if seqs.ndim != 2 or seqs.shape[1] != 2 or seqs[:, 1].min(initial=1) < 1 or (seqs.sum(axis=1) > m).any():
        raise ValueError(f"sequences {seqs.tolist()} do not fit {m} tokens")
    op = AttentionOp(get_data=_get_data(), qkv=qkv.ptr, seqs=seqs.ctypes.data, n_seqs=len(seqs), d=d,
                     n_heads=n_heads, scale=1.0 / math.sqrt(d // n_heads), causal=int(causal))
    op.seqs_array = seqs  # the C side holds only its address
    fun = ctypes.cast(kernel.vlm_attention_op, ctypes.c_void_p).value
    return g.custom((d, *qkv.ne[1:]), [qkv], fun, op)
