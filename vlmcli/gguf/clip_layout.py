"""vlm's two-tower CLIP GGUF (clip.cpp's legacy layout): every tensor, in the order the converter writes them.

Note the legacy naming quirk, kept for clip.cpp readers: Hugging Face `mlp.fc1` (the widening layer)
is stored as `ffn_down` and `mlp.fc2` as `ffn_up`.
"""

from __future__ import annotations

from typing import Protocol

from vlmcli.gguf.ggml_types import (
    CLIP_EMBEDDING_TYPES,
    CLIP_MATMUL_TYPES,
    CLIP_POSITION_EMBEDDING_TYPES,
    CLIP_TOKEN_EMBEDDING_TYPES,
)
from vlmcli.gguf.layout import GgufTensor, Shape

F32 = ("F32",)
PATCH_EMBEDDING = "v.patch_embd.weight"  # a stride-p convolution, run as a matmul of p * p * 3 -> width


class ClipDims(Protocol):
    """The hyper-parameters the tensor shapes follow from (the loader's ClipConfig, the converter's)."""

    @property
    def text_width(self) -> int: ...
    @property
    def text_ffn(self) -> int: ...
    @property
    def text_layers(self) -> int: ...
    @property
    def vision_width(self) -> int: ...
    @property
    def vision_ffn(self) -> int: ...
    @property
    def vision_layers(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    @property
    def patch_size(self) -> int: ...
    @property
    def n_patches(self) -> int: ...
    @property
    def projection_dim(self) -> int: ...


def _blocks(hf_prefix: str, prefix: str, d: int, ffn: int, layers: int) -> list[GgufTensor]:
    # (HF part, GGUF part, weight shape, weight types, bias shape), HF's order within a block
    parts: tuple[tuple[str, str, Shape, tuple[str, ...], Shape], ...] = (
        ("self_attn.q_proj", "attn_q", (d, d), CLIP_MATMUL_TYPES, (d,)),
        ("self_attn.k_proj", "attn_k", (d, d), CLIP_MATMUL_TYPES, (d,)),
        ("self_attn.v_proj", "attn_v", (d, d), CLIP_MATMUL_TYPES, (d,)),
        ("self_attn.out_proj", "attn_out", (d, d), CLIP_MATMUL_TYPES, (d,)),
        ("layer_norm1", "ln1", (d,), F32, (d,)),
        ("layer_norm2", "ln2", (d,), F32, (d,)),
        ("mlp.fc1", "ffn_down", (d, ffn), CLIP_MATMUL_TYPES, (ffn,)),  # d -> ffn
        ("mlp.fc2", "ffn_up", (ffn, d), CLIP_MATMUL_TYPES, (d,)),  # ffn -> d
    )
    out = []
    for i in range(layers):
        for hf_part, part, w_shape, w_types, b_shape in parts:
            hf, gg = f"{hf_prefix}.encoder.layers.{i}.{hf_part}", f"{prefix}.blk.{i}.{part}"
            out.append(GgufTensor(f"{gg}.weight", f"{hf}.weight", (w_shape,), w_types))
            out.append(GgufTensor(f"{gg}.bias", f"{hf}.bias", (b_shape,), F32))
    return out


def _norm(name: str, source: str, d: int) -> list[GgufTensor]:
    return [GgufTensor(f"{name}.{p}", f"{source}.{p}", ((d,),), F32) for p in ("weight", "bias")]


def clip_tensors(c: ClipDims) -> list[GgufTensor]:
    """Every tensor of the file, text tower first."""
    dt, dv, p = c.text_width, c.vision_width, c.patch_size
    te, ve = "text_model.embeddings", "vision_model.embeddings"
    return [
        GgufTensor(
            "t.token_embd.weight", f"{te}.token_embedding.weight", ((dt, c.vocab_size),), CLIP_TOKEN_EMBEDDING_TYPES
        ),
        GgufTensor(
            "t.position_embd.weight",
            f"{te}.position_embedding.weight",
            ((dt, c.context_length),),
            CLIP_POSITION_EMBEDDING_TYPES,
        ),
        *_blocks("text_model", "t", dt, c.text_ffn, c.text_layers),
        *_norm("t.post_ln", "text_model.final_layer_norm", dt),
        GgufTensor("v.class_embd", f"{ve}.class_embedding", ((dv,),), F32),
        GgufTensor(PATCH_EMBEDDING, f"{ve}.patch_embedding.weight", ((p, p, 3, dv),), CLIP_EMBEDDING_TYPES),
        GgufTensor(
            "v.position_embd.weight",
            f"{ve}.position_embedding.weight",
            ((dv, c.n_patches + 1),),
            CLIP_POSITION_EMBEDDING_TYPES,
        ),
        *_norm("v.pre_ln", "vision_model.pre_layrnorm", dv),
        *_blocks("vision_model", "v", dv, c.vision_ffn, c.vision_layers),
        *_norm("v.post_ln", "vision_model.post_layernorm", dv),
        GgufTensor("text_projection.weight", "text_projection.weight", ((dt, c.projection_dim),), CLIP_MATMUL_TYPES),
        GgufTensor(
            "visual_projection.weight", "visual_projection.weight", ((dv, c.projection_dim),), CLIP_MATMUL_TYPES
        ),
    ]


def tensor_specs(c: ClipDims) -> dict[str, tuple[Shape, tuple[str, ...]]]:
    """The loader's view of clip_tensors: name -> (ggml shape, allowed types)."""
    return {t.name: (t.shape, t.types) for t in clip_tensors(c)}
