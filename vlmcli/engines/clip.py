"""CLIP's two towers (ViT image encoder, causal text encoder) as ggml graphs.

The GGUF layout is clip.cpp's legacy two-tower one (written by scripts/convert/clip.py): note
that HF `mlp.fc1` is stored as `ffn_down` and `fc2` as `ffn_up` (vlmcli/gguf/clip_layout.py). Weights are located
by vlmcli.gguf's header reader, copied once from a memory map into a ggml backend buffer, and every call builds a small
graph for a batch of images or texts; the graph allocator's buffer is reused across calls.

Files written by clip.cpp itself (its converter and quantizer) load too: their F16 or quantized
position embeddings are widened to F32 when loaded, a missing logit scale falls back to trained CLIP's
100 and missing BPE merges to the CLIP merges vlm ships (only for a vocabulary that is exactly CLIP's);
each fallback is recorded in ClipConfig.notes for the front end to show.

On x86 CPUs the linear layers and the attention run on vlm's own kernels instead of ggml's mul_mat and
attention ops (engines/clip_kernels.py, custom ops in the same graphs; BF16 with AVX512_BF16, 16-bit
integers with AVX2 or AVX512_VNNI, or F16 weights in F32 arithmetic, VLM_CLIP_WEIGHTS=vlm-f16; from F16,
F32 or Q8_0 files), 1.3-2.7x faster. The matmuls then also do the block's layer norms, biases, quick
GELU and residual adds; texts run packed one after another, each at its own length; and a tower's last
block runs only for the token it pools. Elsewhere, or with VLM_CLIP_WEIGHTS=stored|bf16, the graphs
are ggml's alone.

The same forward pass also runs in numpy (engines/clip_numpy.py, the "blas" path, VLM_CLIP_PATH=blas): it
holds up when other processes share the cores (nothing spins), but on an idle machine ggml's kernels were
faster, so ggml is the default; GPU devices always keep the graphs (choose_compute_path).

Shapes in comments are ggml order (innermost first): x [D, T, N] is N sequences of T tokens of width D.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmcli.engines import clip_kernels, ggml
from vlmcli.engines.clip_kernels import Norm, PackedWeight
from vlmcli.engines.clip_numpy import NumpyClip
from vlmcli.engines.clip_tokenizer import (
    BOS_TOKEN,
    DEFAULT_MERGES_FILE,
    EOS_TOKEN,
    read_merges_file,
    vocabulary_from_merges,
)
from vlmcli.engines.cores import CoreShare
from vlmcli.engines.ggml import Backend, Graph, Tensor
from vlmcli.engines.native import NativeResource
from vlmcli.errors import ModelError, VlmError
from vlmcli.gguf.clip_layout import PATCH_EMBEDDING, tensor_specs
from vlmcli.gguf.ggml_types import CLIP_MATMUL_TYPES
from vlmcli.gguf.validate import require_kind

LOADED_AS_F32 = ("t.position_embd.weight", "v.position_embd.weight")
# CLIP's training clamps the logit scale at 100; files written by clip.cpp's converter do not store it.
TRAINED_LOGIT_SCALE = 100.0
SMALL_GRAPH_FLOPS = 50e6  # below this a batch runs on one thread (see ClipModel._use_threads_for)
# att @ v sums over the T key positions; ggml's CPU mul_mat runs it through tinyBLAS only when T is a
# multiple of the SIMD width in floats (16 with AVX-512), else one vec_dot call per element, several
# times slower (a seventh of a ViT-B/32 pass, T = 50): so T is padded with zeros up to a multiple.
ATTENTION_SUM_MULTIPLE = 16  # (ggml's attention ops only, as TEXT_LENGTH_STEP)
TEXT_LENGTH_STEP = 8  # a text runs at a multiple of this many positions (or context_length), see text_lengths
# How the towers run: "ggml" graphs on the backend, or "blas" (numpy, engines/clip_numpy.py) on the CPU;
# "auto" is ggml on both CPU kinds measured idle (README, "Measured here"): an AVX-512 EPYC ran ggml F16 at 25
# images/s and 257 texts/s against blas 22-24 and 117-140; an AVX2-only EPYC ran ggml 9.5 images/s and 80
# texts/s against blas 8.8 and 62. Under load blas kept 10-21 images/s where ggml fell to 6-8 (cores.py now
# keeps vlm's own processes from colliding). The environment variable overrides.
COMPUTE_PATHS = ("auto", "ggml", "blas")
COMPUTE_PATH_ENV = "VLM_CLIP_PATH"
# How F16 / F32 matmul weights are held on the ggml CPU path (VLM_CLIP_WEIGHTS): "stored" as in the file,
# "bf16" as BF16 ggml tensors for ggml's mul_mat, "vlm-bf16" / "vlm-f16" / "vlm-i16" as BF16 / F16 / 16-bit
# integers packed for vlm's own kernels (engines/clip_kernels.py; AVX512_BF16 / AVX2 / AVX2, with an AVX512_VNNI
# form of i16). "auto" takes the first this machine runs of vlm-bf16, vlm-i16 (see weights_layout), bf16 (where
# ggml has AVX512_BF16: vlm built without a C compiler) and stored: BF16 dot products (VDPBF16PS) and 16-bit
# integer ones (VPMADDWD) do twice the multiply-adds of an F32 FMA per instruction (cosine to F32 on ViT-B/32:
# BF16 0.99998, I16 0.999995+), and vlm's kernels beat ggml's (README, "Measured here"). Q8_0 weights go to
# vlm's kernels too (PACKED_FROM): a Q8_0 value is an 8-bit integer times an F16 scale, which BF16, F16 and
# I16 hold to within their own rounding, and ggml's Q8_0 mul_mat ran at half their speed; other quantized
# types (chosen for size: 16-bit packing would undo it) stay with ggml.
WEIGHTS_TYPES = ("auto", "stored", "bf16", "vlm-bf16", "vlm-f16", "vlm-i16")
# (held type, kernel kind); "I16" is vlm's own (16-bit integers with a scale per 128 k, clip_kernels.pack)
LAYOUTS = {
    "stored": (None, None),
    "bf16": ("BF16", None),
    "vlm-bf16": ("BF16", "bf16"),
    "vlm-f16": ("F16", "f16"),
    "vlm-i16": ("I16", "i16"),
}
WEIGHTS_TYPE_ENV = "VLM_CLIP_WEIGHTS"
PACKED_FROM = ("F16", "F32", "Q8_0")  # the file types vlm's kernels take (see above)
PACKED_AS_VALUES = ("I16", "BF16")  # held types packed in C straight from the file's F16 / F32 values


@dataclass
class ClipConfig:
    name: str
    image_size: int
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    context_length: int
    vocab_size: int
    projection_dim: int
    logit_scale: float  # already exp()-ed
    use_gelu: bool  # True: exact (erf) gelu; False: quick_gelu
    text_width: int
    text_layers: int
    text_heads: int
    text_ffn: int
    text_eps: float
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    vision_eps: float
    tokens: list[str] = field(repr=False)
    merges: list[str] = field(repr=False)
    bos_id: int = 49406
    eos_id: int = 49407
    file_type: str | None = None
    # What the loader filled in for keys the file lacks (e.g. a file from clip.cpp's converter), one
    # sentence each, for the front end to show; the engine itself prints nothing.
    notes: list[str] = field(default_factory=list)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], path: Path, file_type: str | None = None) -> ClipConfig:
        def get(key: str, kind: type, default: Any = None) -> Any:
            value = metadata.get(key)
            if value is None:
                if default is not None:
                    return default
                raise ModelError(f"CLIP GGUF lacks {key}", path)
            try:
                if kind is tuple:
                    value = tuple(float(v) for v in value)
                    if len(value) != 3:
                        raise ValueError
                    return value
                if kind is list:
                    return list(value)
                return kind(value)
            except (TypeError, ValueError):
                raise ModelError(f"CLIP GGUF has a bad {key}: {value!r}", path) from None

        notes: list[str] = []
        tokens = get("tokenizer.ggml.tokens", list, [])
        merges = get("tokenizer.ggml.merges", list, [])
        if tokens and not merges:  # clip.cpp's converter stores the vocabulary only
            merges = _shipped_merges_for(tokens, path)
            notes.append(
                "the file has no BPE merges (tokenizer.ggml.merges); its vocabulary is CLIP's, "
                "so the CLIP merges shipped with vlm are used"
            )
        if metadata.get("clip.logit_scale") is None:  # clip.cpp's converter leaves it out
            log_scale = math.log(TRAINED_LOGIT_SCALE)
            notes.append(
                f"the file has no logit scale (clip.logit_scale); using trained CLIP's "
                f"{TRAINED_LOGIT_SCALE:g} (classify scores depend on it, embeddings do not)"
            )
        else:
            log_scale = get("clip.logit_scale", float)
        cfg = cls(
            name=get("general.name", str, path.stem) or path.stem,
            image_size=get("clip.vision.image_size", int),
            patch_size=get("clip.vision.patch_size", int),
            image_mean=get("clip.vision.image_mean", tuple),
            image_std=get("clip.vision.image_std", tuple),
            context_length=get("clip.text.context_length", int),
            vocab_size=len(tokens),  # checked against the token embedding below
            projection_dim=get("clip.vision.projection_dim", int),
            logit_scale=_exp_logit_scale(log_scale, path),
            use_gelu=get("clip.use_gelu", bool, False),
            text_width=get("clip.text.embedding_length", int),
            text_layers=get("clip.text.block_count", int),
            text_heads=get("clip.text.attention.head_count", int),
            text_ffn=get("clip.text.feed_forward_length", int),
            text_eps=get("clip.text.attention.layer_norm_epsilon", float),
            vision_width=get("clip.vision.embedding_length", int),
            vision_layers=get("clip.vision.block_count", int),
            vision_heads=get("clip.vision.attention.head_count", int),
            vision_ffn=get("clip.vision.feed_forward_length", int),
            vision_eps=get("clip.vision.attention.layer_norm_epsilon", float),
            tokens=tokens,
            merges=merges,
            bos_id=get("tokenizer.ggml.bos_token_id", int, _token_id(tokens, BOS_TOKEN, 49406)),
            eos_id=get("tokenizer.ggml.eos_token_id", int, _token_id(tokens, EOS_TOKEN, 49407)),
            file_type=file_type,
            notes=notes,
        )
        text_proj = get("clip.text.projection_dim", int, cfg.projection_dim)
        cfg._validate(path, text_proj)
        return cfg

    def _validate(self, path: Path, text_projection_dim: int) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ModelError(f"inconsistent CLIP GGUF: {what}", path)

        positive = (
            "image_size",
            "patch_size",
            "context_length",
            "projection_dim",
            "text_width",
            "text_layers",
            "text_heads",
            "text_ffn",
            "vision_width",
            "vision_layers",
            "vision_heads",
            "vision_ffn",
        )
        for key in positive:
            need(getattr(self, key) > 0, f"{key} = {getattr(self, key)}")
        need(self.image_size % self.patch_size == 0, "image_size is not a multiple of patch_size")
        need(self.text_width % self.text_heads == 0, "text width is not a multiple of the head count")
        need(self.vision_width % self.vision_heads == 0, "vision width is not a multiple of the head count")
        need(text_projection_dim == self.projection_dim, "text and vision projection sizes differ")
        need(self.text_eps > 0 and self.vision_eps > 0, "layer norm epsilon must be positive")
        need(all(s > 0 for s in self.image_std), "image_std must be positive")


@functools.lru_cache(maxsize=1)
def _shipped_clip_tokenizer() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(merges, the vocabulary they generate) of the CLIP merges file vlm ships."""
    merges = read_merges_file(DEFAULT_MERGES_FILE)
    return tuple(merges), tuple(vocabulary_from_merges(merges))


def _shipped_merges_for(tokens: list[str], path: Path) -> list[str]:
    """The shipped CLIP merges, for a file whose vocabulary is exactly CLIP's (same tokens, same ids)."""
    merges, vocab = _shipped_clip_tokenizer()
    if tuple(tokens) != vocab:
        if len(tokens) != len(vocab):
            why = f"{len(tokens)} tokens, CLIP has {len(vocab)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(tokens, vocab)) if a != b)
            why = f"token {i} is {tokens[i]!r}, CLIP's is {vocab[i]!r}"
        raise ModelError(
            "CLIP GGUF has no BPE merges (tokenizer.ggml.merges) and its vocabulary is not "
            f"CLIP's ({why}), so its texts cannot be tokenized",
            path,
        )
    return list(merges)


def _token_id(tokens: list[str], token: str, default: int) -> int:
    """The id of a special token in the vocabulary, for files without tokenizer.ggml.bos/eos_token_id."""
    try:
        return tokens.index(token)
    except ValueError:
        return default


def _exp_logit_scale(log_scale: float, path: Path) -> float:
    # trained CLIPs store ln(100) ~ 4.6; refuse values whose exp() is meaningless or overflows
    if not math.isfinite(log_scale) or abs(log_scale) > 20:
        raise ModelError(f"CLIP GGUF has a bad clip.logit_scale: {log_scale!r}", path)
    return math.exp(log_scale)


def choose_compute_path(requested: str | None, on_cpu: bool) -> str:
    """ "ggml" or "blas" for a request (None/"auto": VLM_CLIP_PATH, else ggml); GPU devices always run ggml."""
    choice = (requested or "auto").lower()
    if choice == "auto":
        choice = (os.environ.get(COMPUTE_PATH_ENV) or "auto").strip().lower()
    if choice not in COMPUTE_PATHS:
        raise VlmError(
            f"unknown CLIP compute path {choice!r} (from {COMPUTE_PATH_ENV} or compute=); "
            f"use one of {', '.join(COMPUTE_PATHS)}"
        )
    return "blas" if choice == "blas" and on_cpu else "ggml"


def weights_layout(on_cpu: bool) -> str:
    """How F16 / F32 matmul weights are held: one of LAYOUTS (VLM_CLIP_WEIGHTS, see WEIGHTS_TYPES);
    decided once per load. GPU devices keep the file's types."""
    choice = (os.environ.get(WEIGHTS_TYPE_ENV) or "auto").strip().lower()
    if choice not in WEIGHTS_TYPES:
        raise VlmError(f"unknown {WEIGHTS_TYPE_ENV} {choice!r}; use one of {', '.join(WEIGHTS_TYPES)}")
    if not on_cpu:
        return "stored"
    kind = LAYOUTS.get(choice, (None, None))[1]
    if kind and not clip_kernels.available(kind):
        needs = "AVX512_BF16" if kind == "bf16" else "AVX2, FMA and F16C"
        raise VlmError(
            f"{WEIGHTS_TYPE_ENV}={choice} needs vlm's {kind} kernels, which this machine lacks "
            f"(an x86 CPU with {needs}, and a C compiler when vlm was installed)"
        )
    if choice == "auto":
        if clip_kernels.available("bf16"):
            return "vlm-bf16"
        # vlm's i16 kernels next, before f16 and before ggml's AVX-512 ones: VPMADDWD (or VNNI's VPDPWSSD)
        # does twice an FMA's multiply-adds per instruction. On a Zen 4 held to AVX2 they ran 1.5x the f16
        # kernels' images/s; on its AVX-512 (the VNNI form) 39 images/s against ggml F16's 17 (README,
        # "Measured here"). Where a CPU issues one VPMADDWD per cycle (Zen 2, Haswell) i16 and f16 are even.
        if clip_kernels.available("i16"):
            return "vlm-i16"
        return "bf16" if ggml.lib().ggml_cpu_has_avx512_bf16() else "stored"
    return choice


CPU_KERNELS = {
    "vlm-bf16": "vlm's BF16 kernels",
    "vlm-f16": "vlm's F16 kernels",
    "vlm-i16": "vlm's I16 kernels",
    "bf16": "ggml, F16/F32 weights held as BF16",
    "stored": "ggml, weights as stored",
    "blas": "numpy + BLAS (VLM_CLIP_PATH=blas)",
}


def cpu_kernels() -> str:
    """What runs a CLIP F16 file on the CPU here by default (vlm doctor)."""
    if choose_compute_path(None, on_cpu=True) == "blas":
        return CPU_KERNELS["blas"]
    layout = weights_layout(on_cpu=True)
    kind = LAYOUTS[layout][1]
    return f"{CPU_KERNELS[layout]} ({clip_kernels.isa(kind)})" if kind else CPU_KERNELS[layout]


def _to_f16(raw: np.ndarray, type_name: str, name: str, path: Path) -> np.ndarray:
    """F16 / F32 bytes -> F16 bytes (F32 rounded to nearest even; a value past F16's range is refused)."""
    if type_name == "F16":
        return raw
    f16 = np.ascontiguousarray(raw).view(np.float32).astype(np.float16)
    if not np.isfinite(f16).all():
        raise ModelError(f"tensor {name} has values beyond F16's range; set {WEIGHTS_TYPE_ENV}=stored", path)
    return f16.view(np.uint8)


def _to_bf16(raw: np.ndarray, type_name: str) -> np.ndarray:
    """F16 / F32 bytes -> BF16 bytes, by ggml-cpu's own (vectorised) conversions."""
    L = ggml.lib()
    if type_name == "F16":
        f32 = np.empty(raw.size // 2, np.float32)
        L.ggml_cpu_fp16_to_fp32(np.ascontiguousarray(raw).ctypes.data, f32.ctypes.data, f32.size)
    else:
        f32 = np.ascontiguousarray(raw).view(np.float32)
    out = np.empty(f32.size, np.uint16)
    L.ggml_cpu_fp32_to_bf16(f32.ctypes.data, out.ctypes.data, f32.size)
    return out.view(np.uint8)


def _to_f32(raw: np.ndarray, type_name: str, ne: tuple[int, ...]) -> np.ndarray:
    """Stored bytes of an F16 or quantized tensor (ggml shape ne) -> its float32 values."""
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32)
    return ggml.dequantize(raw, type_name).reshape(int(np.prod(ne[1:], dtype=np.int64)), -1)


Weight = Tensor | PackedWeight  # a matmul weight: a ggml tensor, or packed for vlm's kernels


@dataclass
class _Block:
    ln1_w: Tensor
    ln1_b: Tensor
    q_w: Weight | None  # None where q, k and v are one packed weight (qkv_w, for vlm's kernels)
    q_b: Tensor | None
    k_w: Weight | None
    k_b: Tensor | None
    v_w: Weight | None
    v_b: Tensor | None
    qkv_w: PackedWeight | None
    qkv_b: Tensor | None
    out_w: Weight
    out_b: Tensor
    ln2_w: Tensor
    ln2_b: Tensor
    fc1_w: Weight  # stored as ffn_down
    fc1_b: Tensor
    fc2_w: Weight  # stored as ffn_up
    fc2_b: Tensor


# --- the graphs (nanoGPT-like: a layer norm, a linear, one block shared by both towers) ------------


def layer_norm(g: Graph, x: Tensor, norm: Norm) -> Tensor:
    return g.add(g.mul(g.norm(x, norm.eps), norm.w), norm.b)


def linear(
    g: Graph,
    x: Tensor,
    w: Tensor | PackedWeight,
    b: Tensor | None = None,
    act: str | None = None,
    norm: Norm | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """act(norm(x) @ w + b) + residual; act names a Graph method ("gelu_quick", "gelu_erf"). A packed
    weight runs through vlm's kernels, which do all of it but an erf GELU within the matmul's own passes
    over memory (the norm as each row is read, the rest as results leave the registers)."""
    if isinstance(w, PackedWeight):
        fused = act if act in clip_kernels.ACTIVATIONS else None
        if norm is not None and w.k % clip_kernels.NORM_MULTIPLE:
            x, norm = layer_norm(g, x, norm), None
        y = clip_kernels.linear(g, x, w, b, fused, norm=norm, residual=residual if act == fused else None)
        if act == fused:
            return y
        y = getattr(g, act)(y)
    else:
        h = layer_norm(g, x, norm) if norm is not None else x
        y = g.mul_mat(w, h)  # w is [in, out] in ggml order, i.e. HF's [out, in]
        y = g.add(y, b) if b is not None else y
        y = getattr(g, act)(y) if act else y
    return g.add(y, residual) if residual is not None else y


def attention(g: Graph, x: Tensor, p: _Block, norm: Norm, n_heads: int, mask: Tensor | None) -> Tensor:
    """Multi-head self-attention in ggml ops on norm(x) [D, T, N]; mask [T, T] (causal) or None -> [D, T, N]."""
    h = layer_norm(g, x, norm)
    d, t, n = h.ne[0], h.ne[1], h.ne[2]
    hd = d // n_heads
    q = g.permute(g.reshape(linear(g, h, p.q_w, p.q_b), hd, n_heads, t, n), 0, 2, 1, 3)  # [hd, T, H, N]
    k = g.permute(g.reshape(linear(g, h, p.k_w, p.k_b), hd, n_heads, t, n), 0, 2, 1, 3)  # [hd, T, H, N]
    v = g.cont(g.permute(g.reshape(linear(g, h, p.v_w, p.v_b), hd, n_heads, t, n), 1, 2, 0, 3))  # [T, hd, H, N]
    att = g.soft_max_ext(g.mul_mat(k, q), mask, 1.0 / math.sqrt(hd))  # [T_k, T_q, H, N]
    if pad := -t % ATTENTION_SUM_MULTIPLE:  # zero weights on zero values: the same sum, through tinyBLAS
        att, v = g.pad(att, pad), g.pad(v, pad)
    y = g.mul_mat(v, att)  # [hd, T_q, H, N]
    return g.reshape(g.cont(g.permute(y, 0, 2, 1, 3)), d, t, n)  # heads back side by side: [D, T, N]


def packed_attention(
    g: Graph,
    x: Tensor,
    p: _Block,
    norm: Norm,
    n_heads: int,
    seqs: np.ndarray,
    causal: bool,
    queries: np.ndarray | None = None,
) -> Tensor:
    """The same with vlm's kernels on x [D, M] (or [D, T, N]): q, k, v from one matmul, then one op over
    the sequences seqs ((first token, length) rows) packed into the M tokens; queries ((sequence, token
    within it) rows): only their outputs, [D, len(queries)]."""
    assert p.qkv_w is not None
    return clip_kernels.attention(g, linear(g, x, p.qkv_w, p.qkv_b, norm=norm), seqs, n_heads, causal, queries)


Attend = Callable[[Tensor, _Block, Norm], Tensor]  # (x, block, norm) -> attention(norm(x)), one of the two above


def block(
    g: Graph, x: Tensor, p: _Block, eps: float, act: str, attend: Attend, pool: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """A pre-LN transformer block on x [D, ...]; act as for linear. With pool (x -> the rows a tower
    pools, as attend gives only theirs), only those rows go on past the attention: every later op works
    per token, so in a tower's last block the other tokens' work would be thrown away (that block's MLP
    and out projection for all but the pooled tokens are 6% of a ViT-B/32's multiply-adds)."""
    a = attend(x, p, Norm(p.ln1_w, p.ln1_b, eps))
    x = linear(g, a, p.out_w, p.out_b, residual=pool(x) if pool else x)
    h = linear(g, x, p.fc1_w, p.fc1_b, act, norm=Norm(p.ln2_w, p.ln2_b, eps))
    return linear(g, h, p.fc2_w, p.fc2_b, residual=x)


def tower(
    g: Graph,
    x: Tensor,
    blocks: list[_Block],
    eps: float,
    act: str,
    attend: Attend,
    pool: Callable[[Tensor], Tensor],
    pooled_attend: Attend | None = None,
) -> Tensor:
    """A tower's blocks on x, then the rows it pools. With pooled_attend (vlm's kernels: attention for
    the pooled tokens only, see block) the last block runs for those rows alone."""
    for blk in blocks[:-1] if pooled_attend else blocks:
        x = block(g, x, blk, eps, act, attend)
    return block(g, x, blocks[-1], eps, act, pooled_attend, pool) if pooled_attend else pool(x)


# --- batch independence: ggml picks kernels by shape, so no shape may come from a batch-mate ------


def text_lengths(n_tokens: np.ndarray, context_length: int) -> np.ndarray:
    """The graph length each text runs at: its tokens up to EOT rounded up to TEXT_LENGTH_STEP (at
    most context_length). It comes from the text alone: att @ v sums over T, with tinyBLAS when T is
    a multiple of the SIMD width and vec_dot otherwise, so a batch-wide T changes a text's bits."""
    return np.minimum(-(-n_tokens // TEXT_LENGTH_STEP) * TEXT_LENGTH_STEP, context_length)


def at_least_two(rows: np.ndarray) -> np.ndarray:
    """Pooled rows for the final projection, a lone one repeated: ggml's CPU mul_mat runs a one-column
    product through vec_dot and wider ones through tinyBLAS, which sum in another order."""
    return rows if len(rows) > 1 else np.repeat(rows, 2)


def _fused_qkv_biases(cfg: ClipConfig, packed: set[str], kind: str | None) -> dict[str, int]:
    """{name of a block's q, k, v bias as one tensor: its length} for each tower whose q, k and v
    weights are all packed and whose heads fit vlm's attention op."""
    out: dict[str, int] = {}
    if kind is None:
        return out
    for prefix, d, heads, layers in (
        ("t", cfg.text_width, cfg.text_heads, cfg.text_layers),
        ("v", cfg.vision_width, cfg.vision_heads, cfg.vision_layers),
    ):
        blocks = [f"{prefix}.blk.{i}" for i in range(layers)]
        if clip_kernels.attention_fits(d, heads) and all(
            f"{b}.attn_{x}.weight" in packed for b in blocks for x in "qkv"
        ):
            out.update({f"{b}.attn_qkv.bias": 3 * d for b in blocks})
    return out


def _f32_values(data: np.ndarray, st: Any) -> np.ndarray:
    """An F32 tensor's values from the mapped file."""
    return data[st.offset : st.offset + st.n_bytes].view(np.float32)


def _load_numpy(
    path: Path,
    config: ClipConfig,
    stored: dict[str, Any],
    specs: dict[str, tuple[tuple[int, ...], tuple[str, ...]]],
    n_threads: int,
) -> NumpyClip:
    """The towers as float32 numpy arrays, dequantized once from the file (the blas path). Tensors are
    read one at a time rather than mapped, so the file's pages do not add to the process's peak RSS."""
    with open(path, "rb") as f:

        def get(name: str) -> np.ndarray:
            st, ne = stored[name], specs[name][0]
            f.seek(st.offset)
            raw = np.fromfile(f, dtype=np.uint8, count=st.n_bytes)
            if raw.size != st.n_bytes:
                raise ModelError(f"tensor {name} is cut short", path)
            if st.type in ("F32", "F16"):  # widened where NumpyClip copies it anyway
                values = raw.view(np.float32 if st.type == "F32" else np.float16)
            else:
                values = _to_f32(raw, st.type, ne)
            return values.reshape(tuple(reversed(ne)))

        return NumpyClip.from_tensors(get, config, n_threads)


class ClipModel(NativeResource):
    """A loaded two-tower CLIP GGUF. Use `ClipModel.load(path)`; close() (or `with`) frees it."""

    def __init__(
        self,
        path: Path,
        config: ClipConfig,
        backend: Backend,
        weights: Graph | None,
        tensors: dict[str, Tensor],
        batch_size: int,
        numpy_model: NumpyClip | None = None,
        cores: CoreShare | None = None,
    ):
        self.path = path
        self.config = config
        self.backend = backend
        self._weights = weights
        self._t = tensors
        self._numpy = numpy_model  # set: the towers run in numpy (the "blas" path), the backend holds no weights
        self.compute_path = "blas" if numpy_model is not None else "ggml"
        self.batch_size = batch_size
        self.weights_bytes = 0
        self.weights_type = config.file_type  # the matmul weights' type in memory (weights_layout)
        self.matmul_kernel = (
            "numpy" if numpy_model is not None else "ggml"
        )  # or "vlm bf16" / "vlm f16" (clip_kernels.py)
        self.packs_sequences: set[str] = set()  # towers ("t", "v") whose attention runs on vlm's kernels
        self.cores = cores or CoreShare(backend.n_threads)
        self.n_threads = self.cores.most  # of the current batch (see _sharing_cores)
        self._blocks = {
            prefix: [self._block_tensors(f"{prefix}.blk.{i}") for i in range(n)] if tensors else []
            for prefix, n in (("t", config.text_layers), ("v", config.vision_layers))
        }

    def _block_tensors(self, b: str) -> _Block:
        t = self._t
        return _Block(
            ln1_w=t[f"{b}.ln1.weight"],
            ln1_b=t[f"{b}.ln1.bias"],
            q_w=t.get(f"{b}.attn_q.weight"),
            q_b=t.get(f"{b}.attn_q.bias"),  # type: ignore[arg-type]
            k_w=t.get(f"{b}.attn_k.weight"),
            k_b=t.get(f"{b}.attn_k.bias"),  # type: ignore[arg-type]
            v_w=t.get(f"{b}.attn_v.weight"),
            v_b=t.get(f"{b}.attn_v.bias"),  # type: ignore[arg-type]
            qkv_w=t.get(f"{b}.attn_qkv.weight"),
            qkv_b=t.get(f"{b}.attn_qkv.bias"),  # type: ignore[arg-type]
            out_w=t[f"{b}.attn_out.weight"],
            out_b=t[f"{b}.attn_out.bias"],
            ln2_w=t[f"{b}.ln2.weight"],
            ln2_b=t[f"{b}.ln2.bias"],
            fc1_w=t[f"{b}.ffn_down.weight"],
            fc1_b=t[f"{b}.ffn_down.bias"],
            fc2_w=t[f"{b}.ffn_up.weight"],
            fc2_b=t[f"{b}.ffn_up.bias"],
        )

    # --- loading
    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        device: str | None = None,
        batch_size: int = 32,
        compute: str | None = None,
    ) -> ClipModel:
        """Load a two-tower CLIP GGUF. n_gpu_layers != 0 (-1 = all, as for llama.cpp) puts the whole model on the first GPU device
        (CLIP is small: all or nothing); device names a ggml device ("CPU", "CUDA0", "Vulkan0", ...).
        compute: "ggml", "blas" or None/"auto" (see COMPUTE_PATHS and choose_compute_path)."""
        p = Path(path)
        # Header checks (refuses LM / mmproj files), with the vocabulary and merges for the tokenizer.
        info = require_kind(p, "clip", keep_string_arrays=True)
        if batch_size < 1:
            raise VlmError(f"batch_size must be at least 1, got {batch_size}")
        config = ClipConfig.from_gguf(info.metadata, p, info.file_type)
        stored = {t.name: t for t in info.tensors}
        if not config.tokens and "t.token_embd.weight" in stored:  # a file without a vocabulary
            config.vocab_size = int(stored["t.token_embd.weight"].shape[1])
        specs = tensor_specs(config)
        for name, (ne, types) in specs.items():
            st = stored.get(name)
            if st is None:
                raise ModelError(f"CLIP GGUF lacks tensor {name}", p)
            got = tuple(int(n) for n in st.shape)
            if got + (1,) * (len(ne) - len(got)) != ne:
                raise ModelError(f"tensor {name} has shape {got}, expected {ne}", p)
            tname = st.type
            if tname not in types:
                raise ModelError(f"tensor {name} has type {tname}, expected one of {', '.join(types)}", p)
            if ne[0] % ggml.block_size(tname):
                raise ModelError(f"tensor {name}: rows of {ne[0]} do not fit {tname} blocks", p)
        # The label from the matmul weights alone (the patch embedding is F16 in every file clip.cpp reads).
        matmul_types = sorted({stored[name].type for name, (_, types) in specs.items() if types is CLIP_MATMUL_TYPES})
        config.file_type = "+".join(matmul_types) or config.file_type

        cores = CoreShare(n_threads)
        backend = Backend(device=device, gpu=n_gpu_layers != 0, n_threads=cores.most)
        try:
            path_kind = choose_compute_path(compute, backend.is_cpu)
            if path_kind == "blas":
                numpy_model = _load_numpy(p, config, stored, specs, backend.n_threads)
        except BaseException:
            backend.close()
            raise
        if path_kind == "blas":
            model = cls(p, config, backend, None, {}, batch_size, numpy_model, cores)
            model.weights_bytes = numpy_model.nbytes
            return model
        weights = Graph(max_tensors=len(specs) + config.text_layers + config.vision_layers + 8)
        try:
            held_type, kind = LAYOUTS[weights_layout(backend.is_cpu)]
            held = {
                name: "F32"
                if name in LOADED_AS_F32
                else held_type
                if held_type and types is CLIP_MATMUL_TYPES and stored[name].type in ("F16", "F32")
                else stored[name].type
                for name, (_, types) in specs.items()
            }
            packed = {
                name
                for name, (ne, types) in specs.items()
                if kind
                and types is CLIP_MATMUL_TYPES
                and stored[name].type in PACKED_FROM
                and clip_kernels.fits(kind, *ne)
            }
            held.update({name: held_type for name in packed})
            held.update(
                {name: "F32" for name, t in held.items() if t == "I16" and name not in packed}
            )  # ggml has no I16
            patch_ne = specs[PATCH_EMBEDDING][0]  # a matmul too (see _encode_image_batch), packed with the others
            if (
                packed
                and stored[PATCH_EMBEDDING].type in ("F16", "F32")
                and clip_kernels.fits(kind, math.prod(patch_ne[:-1]), patch_ne[-1])
            ):
                held[PATCH_EMBEDDING] = held_type
                packed.add(PATCH_EMBEDDING)
            qkv_biases = _fused_qkv_biases(config, packed, kind)  # towers whose attention runs on vlm's kernels
            fused = {f"{b.removesuffix('.attn_qkv.bias')}.attn_{x}.bias" for b in qkv_biases for x in "qkv"}
            tensors: dict[str, Weight] = {
                name: weights.new_tensor(held[name], ne, name)
                for name, (ne, _) in specs.items()
                if name not in packed | fused
            }
            tensors.update({name: weights.new_tensor("F32", (n,), name) for name, n in qkv_biases.items()})
            size = backend.alloc_tensors(weights)
            data = np.memmap(p, dtype=np.uint8, mode="r")
            for name, (ne, _) in specs.items():
                if name in fused:  # read once, into the block's q, k, v bias below
                    continue
                st = stored[name]
                raw, file_type = data[st.offset : st.offset + st.n_bytes], st.type
                if file_type not in ("F16", "F32") and name in packed:  # Q8_0: its values, exactly, as F32
                    raw, file_type = _to_f32(raw, file_type, ne), "F32"
                if name in packed and held[name] in PACKED_AS_VALUES:
                    raw = raw.view(np.float16 if file_type == "F16" else np.float32)
                elif held[name] != file_type:
                    raw = (
                        _to_f32(raw, file_type, ne)
                        if held[name] == "F32"
                        else _to_bf16(raw, file_type)
                        if held[name] == "BF16"
                        else _to_f16(raw, file_type, name, p)
                    )
                if name in packed:  # ggml shape [k, n] ([p, p, 3, n] for the patches): n rows of k values
                    values = raw if held[name] in PACKED_AS_VALUES else raw.view(np.uint16)  # values, or F16 bits
                    tensors[name] = clip_kernels.pack(values.reshape(ne[-1], -1), kind)
                    size += tensors[name].nbytes
                else:
                    backend.set(tensors[name], raw)  # copies from the mapped file
            for bias in qkv_biases:  # q, k and v as one weight
                blk = bias.removesuffix(".attn_qkv.bias")
                parts = [f"{blk}.attn_{x}" for x in "qkv"]
                q, k, v = (tensors.pop(f"{part}.weight") for part in parts)
                tensors[f"{blk}.attn_qkv.weight"] = q.stacked(k, v)  # type: ignore[union-attr,arg-type]
                backend.set(
                    tensors[bias], np.concatenate([_f32_values(data, stored[f"{part}.bias"]) for part in parts])
                )
            del data
        except BaseException:
            weights.close()
            backend.close()
            raise
        model = cls(p, config, backend, weights, tensors, batch_size, cores=cores)
        model.weights_bytes = size
        model.weights_type = "+".join(
            sorted({held[n] for n, (_, types) in specs.items() if types is CLIP_MATMUL_TYPES})
        )
        model.matmul_kernel = f"vlm {kind}" if packed else "ggml"
        model.packs_sequences = {prefix for prefix in "tv" if f"{prefix}.blk.0.attn_qkv.bias" in qkv_biases}
        return model

    def close(self) -> None:
        if getattr(self, "backend", None) is not None:
            self.backend.close()
            if self._weights is not None:
                self._weights.close()
            if self._numpy is not None:
                self._numpy.close()
                self._numpy = None
            self.backend = None  # type: ignore[assignment]

    def _check_open(self) -> None:
        if self.backend is None:
            raise VlmError("the CLIP model is closed", self.path)

    def _act(self) -> str:
        return "gelu_erf" if self.config.use_gelu else "gelu_quick"

    def _use_threads_for(self, n_tokens: int, width: int, ffn: int, n_layers: int) -> None:
        """One thread for tiny graphs: ggml's threads meet at a spinning barrier after every op, which
        costs more than it saves below a few tens of MFLOP and stalls badly on a busy machine."""
        flops = 2 * n_tokens * n_layers * (4 * width * width + 2 * width * ffn)
        self.backend.set_threads(1 if flops < SMALL_GRAPH_FLOPS else self.n_threads)

    @contextlib.contextmanager
    def _sharing_cores(self) -> Iterator[None]:
        """One call (its batches) on this process's share of the cores (cores.py)."""
        with self.cores.running() as n:
            self.n_threads = n
            if self._numpy is not None:
                self._numpy.n_threads = n
            yield

    def _new_graph(self, n_layers: int) -> Graph:
        return Graph(max_tensors=48 * n_layers + 64, graph_size=64 * n_layers + 128)

    # --- vision
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) normalised float32 pixels -> (N, projection_dim) image embeddings (not L2-normalised)."""
        self._check_open()
        cfg = self.config
        s = cfg.image_size
        if not isinstance(pixels, np.ndarray) or pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            shape = getattr(pixels, "shape", type(pixels).__name__)
            raise VlmError(f"pixels must have shape (N, 3, {s}, {s}), got {shape}")
        if not np.issubdtype(pixels.dtype, np.floating):
            raise VlmError(f"pixels must be floating point, got {pixels.dtype}")
        pixels = np.asarray(pixels, dtype=np.float32)
        if not np.isfinite(pixels).all():
            raise VlmError("pixels contain NaN or infinity")
        with self._sharing_cores():
            chunks = [
                self._encode_image_batch(pixels[i : i + self.batch_size])
                for i in range(0, len(pixels), self.batch_size)
            ]
        return np.concatenate(chunks) if chunks else np.zeros((0, cfg.projection_dim), np.float32)

    def _encode_image_batch(self, pixels: np.ndarray) -> np.ndarray:
        if self._numpy is not None:
            return self._numpy.encode_images(pixels)
        cfg, w = self.config, self._t
        n, p, grid = len(pixels), cfg.patch_size, cfg.image_size // cfg.patch_size
        d, t = cfg.vision_width, cfg.n_patches + 1
        # The patch-embedding convolution has stride = kernel, so it is a reshape plus a matmul; the
        # values of a patch go in the conv weight's (channel, y, x) order.
        patches = pixels.reshape(n, 3, grid, p, grid, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, 3 * p * p)
        pool_at = at_least_two(np.arange(n, dtype=np.int32) * t)
        with self._new_graph(cfg.vision_layers) as g:
            patches_in = g.input("F32", (3 * p * p, grid * grid, n), "patches")
            class_rows = g.input("I32", (len(pool_at),), "class_rows")

            patch_w = w[PATCH_EMBEDDING]
            if isinstance(patch_w, PackedWeight):
                x = linear(g, patches_in, patch_w)  # [D, P, N]
            else:
                x = g.mul_mat(g.reshape(patch_w, 3 * p * p, d), patches_in)
            x = g.concat(g.repeat(w["v.class_embd"], d, 1, n), x, 1)  # class token first: [D, T, N]
            x = g.add(x, w["v.position_embd.weight"])
            x = layer_norm(g, x, Norm(w["v.pre_ln.weight"], w["v.pre_ln.bias"], cfg.vision_eps))
            heads = cfg.vision_heads
            pool = lambda x: g.get_rows(g.reshape(x, d, t * n), class_rows)  # noqa: E731  the class tokens: [D, N]
            pooled_attend: Attend | None = None
            if (
                "v" in self.packs_sequences
            ):  # each image a sequence of t tokens; the last block only for the class tokens
                seqs = np.stack([np.arange(n) * t, np.full(n, t)], axis=1)
                queries = np.stack([pool_at // t, np.zeros_like(pool_at)], axis=1)  # (image, its class token)
                attend: Attend = lambda x, p, norm: packed_attention(g, x, p, norm, heads, seqs, causal=False)  # noqa: E731
                pooled_attend = lambda x, p, norm: packed_attention(g, x, p, norm, heads, seqs, False, queries)  # noqa: E731
            else:
                attend = lambda x, p, norm: attention(g, x, p, norm, heads, None)  # noqa: E731
            pooled = tower(g, x, self._blocks["v"], cfg.vision_eps, self._act(), attend, pool, pooled_attend)
            post_ln = Norm(w["v.post_ln.weight"], w["v.post_ln.bias"], cfg.vision_eps)
            out = g.output(linear(g, pooled, w["visual_projection.weight"], norm=post_ln))

            self.backend.allocate(g)
            self._use_threads_for(n * t, d, cfg.vision_ffn, cfg.vision_layers)
            self.backend.set(patches_in, patches)
            self.backend.set(class_rows, pool_at)
            self.backend.compute(g)
            return self.backend.get(out, 2)[:n]  # (N, projection_dim)

    # --- text
    def encode_texts(self, tokens: np.ndarray) -> np.ndarray:
        """(N, context_length) int token ids -> (N, projection_dim) text embeddings (not L2-normalised),
        pooled at each row's highest token id (the end-of-text token)."""
        self._check_open()
        cfg = self.config
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 2 or not 1 <= tokens.shape[1] <= cfg.context_length:
            shape = getattr(tokens, "shape", type(tokens).__name__)
            raise VlmError(f"tokens must have shape (N, {cfg.context_length}), got {shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise VlmError(f"tokens must be integers, got {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            raise VlmError(f"token ids must be in [0, {cfg.vocab_size}), got {tokens.min()}..{tokens.max()}")
        tokens = np.pad(tokens.astype(np.int32), ((0, 0), (0, cfg.context_length - tokens.shape[1])))
        with self._sharing_cores():
            return self._encode_texts(tokens)

    def _encode_texts(self, tokens: np.ndarray) -> np.ndarray:
        cfg = self.config
        if self._numpy is not None:  # runs each text at its own length (no graph shapes to share)
            chunks = [
                self._numpy.encode_texts(tokens[i : i + self.batch_size])
                for i in range(0, len(tokens), self.batch_size)
            ]
            return np.concatenate(chunks) if chunks else np.zeros((0, cfg.projection_dim), np.float32)
        if "t" in self.packs_sequences:  # vlm's kernels: texts of any lengths share a batch, each at its own
            chunks = [
                self._encode_text_batch(tokens[i : i + self.batch_size], packed=True)
                for i in range(0, len(tokens), self.batch_size)
            ]
            return np.concatenate(chunks) if chunks else np.zeros((0, cfg.projection_dim), np.float32)
        lengths = text_lengths(tokens.argmax(axis=1) + 1, cfg.context_length)
        out = np.zeros((len(tokens), cfg.projection_dim), np.float32)
        for t in np.unique(lengths):  # texts of one length are batched together, results put back in order
            rows = np.flatnonzero(lengths == t)
            for i in range(0, len(rows), self.batch_size):
                chunk = rows[i : i + self.batch_size]
                out[chunk] = self._encode_text_batch(tokens[chunk, :t])
        return out

    def _encode_text_batch(self, tokens: np.ndarray, packed: bool = False) -> np.ndarray:
        """(N, T) ids, every EOT within T: attention is causal, so the positions after a row's EOT
        cannot change its pooled state (usually far fewer than 77 positions are run). packed (vlm's
        kernels): each text runs up to its EOT, the texts one after another in one sequence of tokens."""
        cfg, w = self.config, self._t
        n, d, heads = len(tokens), cfg.text_width, cfg.text_heads
        eot = tokens.argmax(axis=1)
        if packed:  # the ids up to each EOT, one text after another, and each token's position in its text
            lengths = eot + 1
            firsts = np.cumsum(lengths) - lengths
            ids_in = np.concatenate([row[:length] for row, length in zip(tokens, lengths)])
            extra = np.concatenate([np.arange(length, dtype=np.int32) for length in lengths])
        else:  # the ids as they are, and a causal mask (row = query, column = key)
            t = tokens.shape[1]
            firsts, ids_in = np.arange(n) * t, tokens.reshape(-1)
            extra = np.triu(np.full((t, t), -np.inf, dtype=np.float32), k=1)
        m = len(ids_in)
        pool_at = at_least_two((firsts + eot).astype(np.int32))
        with self._new_graph(cfg.text_layers) as g:
            ids = g.input("I32", (m,), "token_ids")
            eot_rows = g.input("I32", (len(pool_at),), "eot_rows")
            pooled_attend: Attend | None = None
            if packed:
                extra_in = g.input("I32", (m,), "positions")
                x = g.add(g.get_rows(w["t.token_embd.weight"], ids), g.get_rows(w["t.position_embd.weight"], extra_in))
                seqs = np.stack([firsts, lengths], axis=1)
                texts = at_least_two(np.arange(n))
                queries = np.stack([texts, eot[texts]], axis=1)  # (text, its EOT token): the last block only for them
                attend: Attend = lambda x, p, norm: packed_attention(g, x, p, norm, heads, seqs, causal=True)  # noqa: E731
                pooled_attend = lambda x, p, norm: packed_attention(g, x, p, norm, heads, seqs, True, queries)  # noqa: E731
            else:
                extra_in = g.input("F32", (t, t), "causal_mask")
                x = g.reshape(g.get_rows(w["t.token_embd.weight"], ids), d, t, n)  # [D, T, N]
                x = g.add(x, g.view_rows(w["t.position_embd.weight"], t))
                attend = lambda x, p, norm: attention(g, x, p, norm, heads, extra_in)  # noqa: E731
            pool = lambda x: g.get_rows(g.reshape(x, d, m), eot_rows)  # noqa: E731  [D, N]
            pooled = tower(g, x, self._blocks["t"], cfg.text_eps, self._act(), attend, pool, pooled_attend)
            # final_layer_norm works per token, so pooling first gives the same result
            post_ln = Norm(w["t.post_ln.weight"], w["t.post_ln.bias"], cfg.text_eps)
            out = g.output(linear(g, pooled, w["text_projection.weight"], norm=post_ln))

            self.backend.allocate(g)
            self._use_threads_for(m, d, cfg.text_ffn, cfg.text_layers)
            self.backend.set(ids, ids_in.astype(np.int32))
            self.backend.set(extra_in, extra)
            self.backend.set(eot_rows, pool_at)
            self.backend.compute(g)
            return self.backend.get(out, 2)[:n]  # (N, projection_dim)
