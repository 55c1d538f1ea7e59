"""CLIP's two towers as ggml graphs, nanoGPT-like: a layer norm, a linear, one block for both towers.

Where the weights are packed for vlm's kernels (engines/clip_kernels.py: custom ops in the same graphs,
see engines/clip_path.py) the matmuls also do the block's layer norms, biases, quick GELU and
residual adds; texts run packed one after another, each at its own length; and a tower's last block
runs only for the token it pools. Elsewhere the graphs are ggml's ops alone.

vision_graph and text_graph build one batch's graph and say what to feed it; ClipModel runs them.
Shapes in comments are ggml order (innermost first): x [D, T, N] is N sequences of T tokens of width D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from vlmcli.engines import clip_kernels
from vlmcli.engines.clip_config import ClipConfig
from vlmcli.engines.clip_kernels import Norm, PackedWeight
from vlmcli.engines.ggml import Graph, Tensor
from vlmcli.gguf.clip_layout import PATCH_EMBEDDING

# att @ v sums over the T key positions; ggml's CPU mul_mat runs it through tinyBLAS only when T is a
# multiple of the SIMD width in floats (16 with AVX-512), else one vec_dot call per element, several
# times slower: so T is padded with zeros up to a multiple.
ATTENTION_SUM_MULTIPLE = 16  # (ggml's attention ops only, as TEXT_LENGTH_STEP)
TEXT_LENGTH_STEP = 8  # a text runs at a multiple of this many positions (or context_length), see text_lengths

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


def _optional_tensor(w: Mapping[str, Weight], name: str) -> Tensor | None:
    return tensor(w, name) if name in w else None


def block_weights(w: Mapping[str, Weight], b: str) -> Block:
    """The weights of block b ("v.blk.3") from a model's tensors."""
    qkv = w.get(f"{b}.attn_qkv.weight")
    assert qkv is None or isinstance(qkv, PackedWeight)
    return Block(
        ln1_w=tensor(w, f"{b}.ln1.weight"),
        ln1_b=tensor(w, f"{b}.ln1.bias"),
        q_w=w.get(f"{b}.attn_q.weight"),
        q_b=_optional_tensor(w, f"{b}.attn_q.bias"),
        k_w=w.get(f"{b}.attn_k.weight"),
        k_b=_optional_tensor(w, f"{b}.attn_k.bias"),
        v_w=w.get(f"{b}.attn_v.weight"),
        v_b=_optional_tensor(w, f"{b}.attn_v.bias"),
        qkv_w=qkv,
        qkv_b=_optional_tensor(w, f"{b}.attn_qkv.bias"),
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
) -> Tensor:
    """The same with vlm's kernels on x [D, M] (or [D, T, N]): q, k, v from one matmul, then one op over
    the sequences seqs ((first token, length) rows) packed into the M tokens; queries ((sequence, token
    within it) rows): only their outputs, [D, len(queries)]."""
    assert p.qkv_w is not None
    return clip_kernels.attention(g, linear(g, x, p.qkv_w, p.qkv_b, norm=norm), seqs, n_heads, causal, queries)


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


# --- the two towers' graphs --------------------------------------------------------------------------


@dataclass
class TowerGraph:
    """A batch's graph: its output (N, projection_dim) and what to set its inputs to before computing."""

    out: Tensor
    inputs: list[tuple[Tensor, np.ndarray]]
    n_tokens: int  # the tokens its blocks run (for the thread count)


def _act(cfg: ClipConfig) -> str:
    return "gelu_erf" if cfg.use_gelu else "gelu_quick"


def _ggml_attend(g: Graph, heads: int, mask: Tensor | None) -> Attend:
    def attend(x: Tensor, b: Block, norm: Norm) -> Tensor:
        return attention(g, x, b, norm, heads, mask)

    return attend


def _packed_attends(
    g: Graph, heads: int, seqs: np.ndarray, causal: bool, queries: np.ndarray
) -> tuple[Attend, Attend | None]:
    """(attention for every token, attention for the pooled queries only) on vlm's kernels."""

    def attend(x: Tensor, b: Block, norm: Norm) -> Tensor:
        return packed_attention(g, x, b, norm, heads, seqs, causal)

    def pooled_attend(x: Tensor, b: Block, norm: Norm) -> Tensor:
        return packed_attention(g, x, b, norm, heads, seqs, causal, queries)

    return attend, pooled_attend


def vision_graph(
    g: Graph, cfg: ClipConfig, w: Mapping[str, Weight], blocks: list[Block], packed: bool, pixels: np.ndarray
) -> TowerGraph:
    """The image tower on (N, 3, S, S) pixels; packed: its attention runs on vlm's kernels."""
    n, p, grid = len(pixels), cfg.patch_size, cfg.image_size // cfg.patch_size
    d, t = cfg.vision_width, cfg.n_patches + 1
    # The patch-embedding convolution has stride = kernel, so it is a reshape plus a matmul; the
    # values of a patch go in the conv weight's (channel, y, x) order.
    patches = pixels.reshape(n, 3, grid, p, grid, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, 3 * p * p)
    pool_at = at_least_two(np.arange(n, dtype=np.int32) * t)
    patches_in = g.input("F32", (3 * p * p, grid * grid, n), "patches")
    class_rows = g.input("I32", (len(pool_at),), "class_rows")

    patch_w = w[PATCH_EMBEDDING]
    if isinstance(patch_w, PackedWeight):
        x = linear(g, patches_in, patch_w)  # [D, P, N]
    else:
        x = g.mul_mat(g.reshape(patch_w, 3 * p * p, d), patches_in)
    x = g.concat(g.repeat(tensor(w, "v.class_embd"), d, 1, n), x, 1)  # class token first: [D, T, N]
    x = g.add(x, tensor(w, "v.position_embd.weight"))
    x = layer_norm(g, x, Norm(tensor(w, "v.pre_ln.weight"), tensor(w, "v.pre_ln.bias"), cfg.vision_eps))
    heads = cfg.vision_heads

    def pool(x: Tensor) -> Tensor:  # the class tokens: [D, N]
        return g.get_rows(g.reshape(x, d, t * n), class_rows)

    if packed:  # each image a sequence of t tokens; the last block only for the class tokens
        seqs = np.stack([np.arange(n) * t, np.full(n, t)], axis=1)
        queries = np.stack([pool_at // t, np.zeros_like(pool_at)], axis=1)  # (image, its class token)
        attend, pooled_attend = _packed_attends(g, heads, seqs, False, queries)
    else:
        attend, pooled_attend = _ggml_attend(g, heads, None), None
    pooled = tower(g, x, blocks, cfg.vision_eps, _act(cfg), attend, pool, pooled_attend)
    post_ln = Norm(tensor(w, "v.post_ln.weight"), tensor(w, "v.post_ln.bias"), cfg.vision_eps)
    out = g.output(linear(g, pooled, w["visual_projection.weight"], norm=post_ln))
    return TowerGraph(out, [(patches_in, patches), (class_rows, pool_at)], n * t)


def text_graph(
    g: Graph, cfg: ClipConfig, w: Mapping[str, Weight], blocks: list[Block], packed: bool, tokens: np.ndarray
) -> TowerGraph:
    """The text tower on (N, T) ids, every EOT within T: attention is causal, so the positions after a
    row's EOT cannot change its pooled state (usually far fewer than 77 positions are run). packed
    (vlm's kernels): each text runs up to its EOT, the texts one after another in one sequence."""
    n, d, heads = len(tokens), cfg.text_width, cfg.text_heads
    eot = tokens.argmax(axis=1)
    extra: np.ndarray
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
    ids = g.input("I32", (m,), "token_ids")
    eot_rows = g.input("I32", (len(pool_at),), "eot_rows")
    token_embd, position_embd = tensor(w, "t.token_embd.weight"), tensor(w, "t.position_embd.weight")
    if packed:
        extra_in = g.input("I32", (m,), "positions")
        x = g.add(g.get_rows(token_embd, ids), g.get_rows(position_embd, extra_in))
        texts = at_least_two(np.arange(n))
        queries = np.stack([texts, eot[texts]], axis=1)  # (text, its EOT token): the last block only for them
        attend, pooled_attend = _packed_attends(g, heads, np.stack([firsts, lengths], axis=1), True, queries)
    else:
        extra_in = g.input("F32", (t, t), "causal_mask")
        x = g.reshape(g.get_rows(token_embd, ids), d, t, n)  # [D, T, N]
        x = g.add(x, g.view_rows(position_embd, t))
        attend, pooled_attend = _ggml_attend(g, heads, extra_in), None

    def pool(x: Tensor) -> Tensor:  # [D, N]
        return g.get_rows(g.reshape(x, d, m), eot_rows)

    pooled = tower(g, x, blocks, cfg.text_eps, _act(cfg), attend, pool, pooled_attend)
    # final_layer_norm works per token, so pooling first gives the same result
    post_ln = Norm(tensor(w, "t.post_ln.weight"), tensor(w, "t.post_ln.bias"), cfg.text_eps)
    out = g.output(linear(g, pooled, w["text_projection.weight"], norm=post_ln))
    return TowerGraph(out, [(ids, ids_in.astype(np.int32)), (extra_in, extra), (eot_rows, pool_at)], m)
