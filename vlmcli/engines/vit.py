"""One ViT runner for CLIP's towers and SmolVLM2's SigLIP encoder: pre-LN transformer blocks as ggml graphs.

A block's matmuls run through ggml's mul_mat on weights as stored, or through vlm's kernels
(engines/clip_kernels.py) on weights packed at load, which also do the block's layer norms, biases,
GELU and residual adds within the matmul's passes over memory; attention is ggml's ops, or one op
over sequences packed one after another. engines/clip_graphs.py (CLIP's two towers) and
engines/siglip.py (SmolVLM2's vision encoder and connector) build their graphs from these parts.
Shapes in comments are ggml order (innermost first): x [D, T, N] is N sequences of T tokens of width D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from vlmcli.engines import clip_kernels
from vlmcli.engines.clip_kernels import Norm, PackedWeight
from vlmcli.engines.ggml import Graph, Tensor

# att @ v sums over the T key positions; ggml's CPU mul_mat runs it through tinyBLAS only when T is a
# multiple of the SIMD width in floats (16 with AVX-512), else one vec_dot call per element, several
# times slower: so T is padded with zeros up to a multiple.
ATTENTION_SUM_MULTIPLE = 16  # (ggml's attention ops only)

Weight = Tensor | PackedWeight  # a matmul weight: a ggml tensor, or packed for vlm's kernels


@dataclass
class Block:
    """One transformer block's weights."""

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


def tensor(w: Mapping[str, Weight], name: str) -> Tensor:
    """A weight that is always a ggml tensor (a norm, a bias, an embedding)."""
    t = w[name]
    assert isinstance(t, Tensor), name
    return t


def optional_tensor(w: Mapping[str, Weight], name: str) -> Tensor | None:
    return tensor(w, name) if name in w else None


def block_weights(w: Mapping[str, Weight], b: str) -> Block:
    """The weights of block b ("v.blk.3") from a model's tensors."""
    qkv = w.get(f"{b}.attn_qkv.weight")
    assert qkv is None or isinstance(qkv, PackedWeight)
    return Block(
        ln1_w=tensor(w, f"{b}.ln1.weight"),
        ln1_b=tensor(w, f"{b}.ln1.bias"),
        q_w=w.get(f"{b}.attn_q.weight"),
        q_b=optional_tensor(w, f"{b}.attn_q.bias"),
        k_w=w.get(f"{b}.attn_k.weight"),
        k_b=optional_tensor(w, f"{b}.attn_k.bias"),
        v_w=w.get(f"{b}.attn_v.weight"),
        v_b=optional_tensor(w, f"{b}.attn_v.bias"),
        qkv_w=qkv,
        qkv_b=optional_tensor(w, f"{b}.attn_qkv.bias"),
        out_w=w[f"{b}.attn_out.weight"],
        out_b=tensor(w, f"{b}.attn_out.bias"),
        ln2_w=tensor(w, f"{b}.ln2.weight"),
        ln2_b=tensor(w, f"{b}.ln2.bias"),
        fc1_w=w[f"{b}.ffn_down.weight"],
        fc1_b=tensor(w, f"{b}.ffn_down.bias"),
        fc2_w=w[f"{b}.ffn_up.weight"],
        fc2_b=tensor(w, f"{b}.ffn_up.bias"),
    )


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
        if act is None or act == fused:
            return y
        y = getattr(g, act)(y)
    else:
        h = layer_norm(g, x, norm) if norm is not None else x
        y = g.mul_mat(w, h)  # w is [in, out] in ggml order, i.e. HF's [out, in]
        y = g.add(y, b) if b is not None else y
        y = getattr(g, act)(y) if act else y
    return g.add(y, residual) if residual is not None else y


def attention(g: Graph, x: Tensor, p: Block, norm: Norm, n_heads: int, mask: Tensor | None) -> Tensor:
    """Multi-head self-attention in ggml ops on norm(x) [D, T, N]; mask [T, T] (causal) or None -> [D, T, N]."""
    assert p.q_w is not None and p.k_w is not None and p.v_w is not None, "q, k and v packed as one"
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
    p: Block,
    norm: Norm,
    n_heads: int,
    seqs: np.ndarray,
    causal: bool,
    queries: np.ndarray | None = None,
    int16: bool = False,
) -> Tensor:
    """The same with vlm's kernels on x [D, M] (or [D, T, N]): q, k, v from one matmul, then one op over
    the sequences seqs ((first token, length) rows) packed into the M tokens; queries ((sequence, token
    within it) rows): only their outputs, [D, len(queries)]; int16 as for clip_kernels.attention."""
    assert p.qkv_w is not None
    qkv = linear(g, x, p.qkv_w, p.qkv_b, norm=norm)
    return clip_kernels.attention(g, qkv, seqs, n_heads, causal, queries, int16)


Attend = Callable[[Tensor, Block, Norm], Tensor]  # (x, block, norm) -> attention(norm(x)), one of the two above


def block(
    g: Graph, x: Tensor, p: Block, eps: float, act: str, attend: Attend, pool: Callable[[Tensor], Tensor] | None = None
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
    blocks: list[Block],
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
