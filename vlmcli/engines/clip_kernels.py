"""vlm's own CPU kernels for CLIP (_clip_kernels.c) as ops in ggml graphs, on x86-64 CPUs.

Two kinds of packed weights, three forms of the matmul (FORMS), by what the CPU has:
- "bf16" (AVX512_BF16): matmul weights held as BF16, activations rounded to BF16, F32 sums (VDPBF16PS:
  32 multiply-adds per instruction).
- "i16-avx2" (AVX2, FMA, F16C): weights and activations as 16-bit integers with a scale per 128 values
  of k (a column of w, a row of x), |q| <= 4095, exact 32-bit integer sums (VPMADDWD: 16 multiply-adds
  per instruction, twice an F32 FMA's) scaled into F32 per block.
- "i16-vnni" (AVX512_VNNI): the same weights and the same numbers, bit for bit, in 512-bit registers
  (VPDPWSSD: 32 multiply-adds and the add in one instruction).
The weights are packed for the kernel when the model loads (`pack`); every linear layer of a graph
runs through it (`linear`), with its bias (and a quick GELU after fc1) applied as the results leave
the registers, and `attention` (AVX2) runs a layer's attention in one op over sequences packed one
after another (no padding between texts of different lengths). The C file is built at install as a
plain shared library (setup.py) and opened here with ctypes; where it did not build or the CPU lacks
the instructions, `available()` is False and CLIP keeps ggml's own ops (engines/clip_path.py).
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmcli.engines import ggml
from vlmcli.engines.ggml import Graph, Tensor

# vlm_clip_kernels_cpu()'s flags: what the CPU runs (0: the library has no kernels, not x86-64)
CPU_AVX2, CPU_AVX512_BF16, CPU_AVX512_VNNI = 1, 2, 4
LIBRARY = "libvlm_clip_kernels" + (".dll" if sys.platform == "win32" else ".so")  # beside this file (setup.py)


@dataclass(frozen=True)
class Form:
    """One form of the kernels: the weights' packing and the C op that multiplies by them."""

    name: str
    packing: str  # "bf16" or "i16": the layout pack() writes (both i16 forms read the same one)
    panel: int  # output columns per packed panel
    k_multiple: int  # rows of k must be a multiple of this
    matmul_op: str
    isa: str  # what matmul_op runs on
    needs: int  # CPU_* flags


FORMS = {
    "bf16": Form("bf16", "bf16", 32, 16, "vlm_bf16_matmul_op", "AVX512_BF16", CPU_AVX512_BF16),
    "i16-vnni": Form("i16-vnni", "i16", 16, 2, "vlm_i16_vnni_matmul_op", "AVX512_VNNI", CPU_AVX512_VNNI),
    "i16-avx2": Form("i16-avx2", "i16", 16, 2, "vlm_i16_matmul_op", "AVX2", CPU_AVX2),
}
PACKINGS = {"bf16": FORMS["bf16"], "i16": FORMS["i16-avx2"]}  # a form of each packing (its panel, k_multiple)
I16_BLOCK, I16_MAX = 128, 4095  # KB and QMAX in the C file: a scale per 128 values of k, |q| <= 4095
ACTIVATIONS = {None: 0, "gelu_quick": 1, "gelu": 2}  # what the kernels apply themselves (act in the C struct)
HEAD_MULTIPLE, MAX_HEAD = 8, 128  # the attention op (AVX2, both kinds): heads of hd floats, 8 to a register


class MatmulOp(ctypes.Structure):
    """struct vlm_matmul in _clip_kernels.c: one linear layer in one graph."""

    _fields_ = [
        ("get_data", ctypes.c_void_p),
        ("x", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("act", ctypes.c_int32),
        ("w_scales", ctypes.c_void_p),
        ("ln_w", ctypes.c_void_p),
        ("ln_b", ctypes.c_void_p),
        ("ln_eps", ctypes.c_float),
        ("residual", ctypes.c_void_p),
        ("next_row", ctypes.c_int64),  # the C side's, for handing out rows to threads: 0 here
        ("finished", ctypes.c_int32),
    ]


class AttentionOp(ctypes.Structure):
    """struct vlm_attention in _clip_kernels.c: one layer's attention in one graph."""

    _fields_ = [
        ("get_data", ctypes.c_void_p),
        ("qkv", ctypes.c_void_p),
        ("seqs", ctypes.c_void_p),
        ("n_seqs", ctypes.c_int64),
        ("d", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("causal", ctypes.c_int32),
        ("queries", ctypes.c_void_p),
        ("n_queries", ctypes.c_int64),
        ("int16", ctypes.c_int32),
        ("next_item", ctypes.c_int64),  # the C side's, for handing out work to threads: 0 here
        ("finished", ctypes.c_int32),
    ]


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, int]:
    """(the kernels' library, the CPU_* flags of what runs here), or (None, 0) where it was not built."""
    try:
        lib = ctypes.CDLL(str(Path(__file__).with_name(LIBRARY)))
        features = int(lib.vlm_clip_kernels_cpu())
    except (OSError, AttributeError):  # not built here (no compiler at install): ggml's ops do the work
        return None, 0
    return lib, features


def available(form: str) -> bool:
    """Whether a form of the kernels (a key of FORMS) was built and this CPU runs it."""
    needs = FORMS[form].needs
    return (_library()[1] & needs) == needs


def attention_available() -> bool:
    """Whether the attention op runs here (AVX2: wherever any form does)."""
    return (_library()[1] & CPU_AVX2) != 0


def _op(name: str) -> int:
    """The address of a C op (the caller checked that the CPU runs it)."""
    lib = _library()[0]
    if lib is None:
        raise RuntimeError(f"vlm's CLIP kernel {name} is not available on this machine")
    address = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    assert address is not None
    return address


@functools.cache
def _get_data() -> int:
    address = ctypes.cast(ggml.lib().cdll.ggml_get_data, ctypes.c_void_p).value
    assert address is not None
    return address


def fits(form: str, k: int, n: int) -> bool:
    """Whether a k -> n weight can be packed for a form (CLIP's widths are multiples of 64)."""
    spec = FORMS[form]
    return k > 0 and n > 0 and k % spec.k_multiple == 0 and n % spec.panel == 0


@dataclass(frozen=True)
class PackedWeight:
    """A k -> n weight packed for a form: bf16 [n / 32][k / 2][32][2] (BF16 bits, uint16), i16 [n / 16]
    [k / 2][16][2] (int16) with scales [n / 16][blocks of 128 k][16] (float32)."""

    data: np.ndarray
    k: int
    n: int
    form: str  # a key of FORMS: the op linear() runs it with
    scales: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    def stacked(self, *others: PackedWeight) -> PackedWeight:
        """This weight's outputs followed by the others' (same k): panels are whole, so they stack."""
        parts = (self, *others)
        scales = None
        if self.scales is not None:
            scales = np.concatenate([o.scales for o in parts if o.scales is not None])
        return PackedWeight(np.concatenate([o.data for o in parts]), self.k, sum(o.n for o in parts), self.form, scales)


def pack(rows: np.ndarray, form: str) -> PackedWeight:
    """A weight (n, k) in numpy order (HF's nn.Linear layout) -> the form's layout: its float16 / float32
    values (rounded as the kernel rounds its activations), or for bf16 also its BF16 bits (uint16)."""
    n, k = rows.shape
    if not fits(form, k, n):
        raise ValueError(f"a {k} -> {n} weight does not fit the {form} kernel")
    if FORMS[form].packing == "i16":
        return _pack_i16(rows, form)
    if rows.dtype != np.uint16:
        return _pack_bf16_values(rows)
    panel = FORMS[form].panel  # BF16 bits: a pair of k as one item, a faster copy
    pairs = rows.view(np.uint32).reshape(n // panel, panel, k // 2).transpose(0, 2, 1)
    return PackedWeight(np.ascontiguousarray(pairs).view(np.uint16).reshape(n // panel, k // 2, panel, 2), k, n, form)


def _c_pack(packing: str, rows: np.ndarray, *out: np.ndarray) -> bool:
    """vlm_<packing>_pack: F16 or F32 values (n, k) into the kernel's layout in one pass, from F16 without a
    copy in F32. False (nothing written) where it cannot run here."""
    lib = _library()[0]
    if lib is None or not available(PACKINGS[packing].name) or rows.dtype not in (np.float16, np.float32):
        return False
    rows = np.ascontiguousarray(rows)
    n, k = rows.shape
    getattr(lib, f"vlm_{packing}_pack")(
        ctypes.c_void_p(rows.ctypes.data),
        ctypes.c_int32(rows.dtype == np.float16),
        ctypes.c_int64(n),
        ctypes.c_int64(k),
        *(ctypes.c_void_p(o.ctypes.data) for o in out),
    )
    return True


def _pack_bf16_values(rows: np.ndarray) -> PackedWeight:
    """F16 or F32 values (n, k) -> BF16, rounded to nearest even (as the kernel rounds x), in C. Only where
    the bf16 kernels run (elsewhere pass bits)."""
    n, k = rows.shape
    panel = FORMS["bf16"].panel
    data = np.empty((n // panel, k // 2, panel, 2), np.uint16)
    if not _c_pack("bf16", rows, data):
        raise ValueError(f"BF16 packing from {rows.dtype} values needs vlm's bf16 kernels (AVX512_BF16)")
    return PackedWeight(data, k, n, "bf16")


def quantize_i16(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) float32 -> int16 values (n, k) and scales (n, blocks): each block of I16_BLOCK values of k
    scaled so its largest |value| is I16_MAX, rounded to nearest even, as the kernel does x and
    vlm_i16_pack does w (bit for bit, tested)."""
    n, k = rows.shape
    blocks = -(-k // I16_BLOCK)
    padded = np.zeros((n, blocks * I16_BLOCK), np.float32)
    padded[:, :k] = rows
    peak = np.abs(padded.reshape(n, blocks, I16_BLOCK)).max(axis=2)
    scales = (peak / np.float32(I16_MAX)).astype(np.float32)
    inv = np.divide(np.float32(I16_MAX), peak, out=np.zeros_like(peak), where=peak > 0)
    q = np.rint(padded.reshape(n, blocks, I16_BLOCK) * inv[:, :, None]).astype(np.int16)
    return q.reshape(n, -1)[:, :k], scales


def _pack_i16(rows: np.ndarray, form: str) -> PackedWeight:
    """F32 or F16 values (n, k) -> i16, in C where the kernels run (far faster), else in numpy."""
    n, k = rows.shape
    panel, blocks = FORMS[form].panel, -(-k // I16_BLOCK)
    data, scales = np.empty((n // panel, k // 2, panel, 2), np.int16), np.empty((n // panel, blocks, panel), np.float32)
    return PackedWeight(data, k, n, form, scales) if _c_pack("i16", rows, data, scales) else pack_i16_numpy(rows, form)


def pack_i16_numpy(rows: np.ndarray, form: str = "i16-avx2") -> PackedWeight:
    """The i16 packing in numpy: the same bits as vlm_i16_pack (tested)."""
    n, k = rows.shape
    panel, blocks = FORMS[form].panel, -(-k // I16_BLOCK)
    q, s = quantize_i16(np.asarray(rows, np.float32))
    return PackedWeight(
        np.ascontiguousarray(q.reshape(n // panel, panel, k // 2, 2).transpose(0, 2, 1, 3)),
        k,
        n,
        form,
        np.ascontiguousarray(s.reshape(n // panel, panel, blocks).transpose(0, 2, 1)),
    )


def unpack(w: PackedWeight) -> np.ndarray:
    """The (n, k) BF16 bits back, for i16 the int16 values (for tests)."""
    panel = FORMS[w.form].panel
    return w.data.reshape(w.n // panel, w.k // 2, panel, 2).transpose(0, 2, 1, 3).reshape(w.n, w.k)


@dataclass(frozen=True)
class Norm:
    """A LayerNorm of each row: (x - mean) / sqrt(variance + eps) * w + b (w, b F32 of the row's width)."""

    w: Tensor
    b: Tensor
    eps: float


NORM_MULTIPLE = 8  # a kernel layer-norms rows of a multiple of 8 floats (CLIP's widths are multiples of 64)


def linear(
    g: Graph,
    x: Tensor,
    w: PackedWeight,
    bias: Tensor | None = None,
    act: str | None = None,
    norm: Norm | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """act(norm(x) @ w.T + bias) + residual for x [k, ...] F32 contiguous -> [n, ...], on every thread
    of the graph: the norm is applied to each row of x as the kernel reads it, bias, act and the
    residual as results leave the registers (no passes of their own over memory); w's form picks the op."""
    if not available(w.form):
        raise RuntimeError(f"vlm's {w.form} kernel does not run on this machine (it needs {FORMS[w.form].isa})")
    fun = _op(FORMS[w.form].matmul_op)
    if x.type != ggml.F32 or not x.is_contiguous() or x.ne[0] != w.k:
        raise ValueError(f"the {w.form} kernel needs contiguous F32 rows of {w.k}, got {x.shape}")
    if bias is not None and (bias.type != ggml.F32 or bias.n_elements != w.n or not bias.is_contiguous()):
        raise ValueError(f"the {w.form} kernel needs an F32 bias of {w.n}, got {bias.shape}")
    shape = (w.n, *x.ne[1:])
    if norm is not None and (
        w.k % NORM_MULTIPLE
        or any(t.type != ggml.F32 or t.n_elements != w.k or not t.is_contiguous() for t in (norm.w, norm.b))
    ):
        raise ValueError(
            f"the {w.form} kernel layer-norms rows of a multiple of {NORM_MULTIPLE} with F32 weights "
            f"of their width, got rows of {w.k}, weights {norm.w.shape} and {norm.b.shape}"
        )
    if residual is not None and (
        residual.type != ggml.F32 or not residual.is_contiguous() or residual.n_elements != math.prod(shape)
    ):
        raise ValueError(
            f"the {w.form} kernel adds an F32 residual of the output's shape {shape}, got {residual.shape}"
        )
    op = MatmulOp(
        get_data=_get_data(),
        x=x.ptr,
        bias=bias.ptr if bias is not None else None,
        w=w.data.ctypes.data,
        m=x.n_elements // w.k,
        k=w.k,
        n=w.n,
        act=ACTIVATIONS[act],
        w_scales=w.scales.ctypes.data if w.scales is not None else None,
        ln_w=norm.w.ptr if norm else None,
        ln_b=norm.b.ptr if norm else None,
        ln_eps=norm.eps if norm else 0.0,
        residual=residual.ptr if residual is not None else None,
    )
    op.weight = w  # the C side holds only the address of its data
    sources = [t for t in (x, bias, norm.w if norm else None, norm.b if norm else None, residual) if t is not None]
    return g.custom(shape, sources, fun, op)


def attention_fits(d: int, n_heads: int) -> bool:
    """Whether the attention op takes d = n_heads heads of hd floats."""
    hd = d // n_heads if n_heads > 0 else 0
    return hd > 0 and d == hd * n_heads and hd % HEAD_MULTIPLE == 0 and hd <= MAX_HEAD


def attention(
    g: Graph,
    qkv: Tensor,
    seqs: np.ndarray,
    n_heads: int,
    causal: bool,
    queries: np.ndarray | None = None,
    int16: bool = False,
) -> Tensor:
    """Multi-head attention over sequences packed one after another: qkv [3 d, m] F32 holds each token's
    q, k and v (as one linear layer of 3 d outputs gives them); seqs (n, 2) int32 rows of (first token,
    length) tile the m tokens. Returns [d, m], each token's heads side by side (for the out projection);
    with queries ((sequence, token within it) rows) only theirs, [d, len(queries)]. int16: long
    non-causal sequences take both products in the i16 matmul's number format (an i16 form's model)."""
    if not attention_available():
        raise RuntimeError("vlm's attention op does not run on this machine (it needs AVX2)")
    fun = _op("vlm_attention_op")
    d, m = qkv.ne[0] // 3, qkv.n_elements // qkv.ne[0]
    if qkv.type != ggml.F32 or not qkv.is_contiguous() or qkv.ne[0] != 3 * d or not attention_fits(d, n_heads):
        raise ValueError(f"the attention op needs contiguous F32 q, k, v of {n_heads} heads, got {qkv.shape}")
    seqs = np.ascontiguousarray(seqs, dtype=np.int32)
    if seqs.ndim != 2 or seqs.shape[1] != 2 or seqs[:, 1].min(initial=1) < 1 or (seqs.sum(axis=1) > m).any():
        raise ValueError(f"sequences {seqs.tolist()} do not fit {m} tokens")
    shape: tuple[int, ...] = (d, *qkv.ne[1:])
    if queries is not None:
        queries = np.ascontiguousarray(queries, dtype=np.int32)
        shaped = queries.ndim == 2 and queries.shape[1] == 2 and len(queries) > 0
        if (
            not shaped
            or queries.min() < 0
            or (queries[:, 0] >= len(seqs)).any()
            or (queries[:, 1] >= seqs[queries[:, 0], 1]).any()
        ):
            raise ValueError(f"queries {queries.tolist()} are not tokens of sequences {seqs.tolist()}")
        shape = (d, len(queries))
    op = AttentionOp(
        get_data=_get_data(),
        qkv=qkv.ptr,
        seqs=seqs.ctypes.data,
        n_seqs=len(seqs),
        d=d,
        n_heads=n_heads,
        scale=1.0 / math.sqrt(d // n_heads),
        causal=int(causal),
        queries=queries.ctypes.data if queries is not None else None,
        n_queries=len(queries) if queries is not None else 0,
        int16=int(int16),
    )
    op.arrays = (seqs, queries)  # the C side holds only their addresses
    return g.custom(shape, [qkv], fun, op)
