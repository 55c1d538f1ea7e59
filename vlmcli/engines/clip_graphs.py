"""CLIP's two towers as ggml graphs, on the ViT runner's blocks (engines/vit.py), one block for both towers.

Where the weights are packed for vlm's kernels (engines/clip_kernels.py: custom ops in the same graphs,
see engines/clip_path.py) the matmuls also do the block's layer norms, biases, quick GELU and
residual adds; texts run packed one after another, each at its own length; and a tower's last block
runs only for the token it pools. Elsewhere the graphs are ggml's ops alone.

vision_graph and text_graph build one batch's graph and say what to feed it; ClipModel runs them.
Shapes in comments are ggml order (innermost first): x [D, T, N] is N sequences of T tokens of width D.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vlmcli.engines.clip_config import ClipConfig
from vlmcli.engines.clip_kernels import Norm, PackedWeight
from vlmcli.engines.ggml import Graph, Tensor
from vlmcli.engines.vit import Attend, Block, Weight, attention, layer_norm, linear, packed_attention, tensor, tower
from vlmcli.gguf.clip_layout import PATCH_EMBEDDING

TEXT_LENGTH_STEP = 8  # a text runs at a multiple of this many positions (or context_length), see text_lengths

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
