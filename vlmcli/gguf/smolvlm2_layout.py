"""SmolVLM2's two GGUF files as llama.cpp's converter writes them: the language model (arch `llama`) and the
vision projector (arch `clip`, projector `idefics3`). Sources are the Hugging Face names: the text model's
relative to its prefix (model.text_model.), the vision tower's and connector's in full."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from vlmcli.gguf.ggml_types import CONV_TYPES, FLOAT_TYPES, LLAMA_MATMUL_TYPES, NORM_TYPES
from vlmcli.gguf.layout import GgufTensor

F32 = ("F32",)


@dataclass(frozen=True)
class LlamaDims:
    """Per-layer lists hold one entry per block (llama.cpp allows a count per layer)."""

    n_embd: int
    n_vocab: int
    n_layer: int
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    head_k: int
    head_v: int


def llama_tensors(d: LlamaDims, fused_qkv: Collection[int] = ()) -> Iterator[GgufTensor]:
    """The language model's tensors; the blocks in `fused_qkv` hold q, k and v as one attn_qkv (other
    converters write it so; no checkpoint tensor maps to it)."""
    mm = LLAMA_MATMUL_TYPES
    yield GgufTensor("token_embd.weight", "embed_tokens.weight", ((d.n_embd, d.n_vocab),), mm)
    yield GgufTensor("output_norm.weight", "norm.weight", ((d.n_embd,),), NORM_TYPES)
    # absent where the output shares the token embedding (tie_word_embeddings)
    yield GgufTensor("output.weight", "lm_head.weight", ((d.n_embd, d.n_vocab),), mm, required=False)
    for i in range(d.n_layer):
        b, hf = f"blk.{i}", f"layers.{i}"
        q, k, v = d.head_k * d.heads[i], d.head_k * d.kv_heads[i], d.head_v * d.kv_heads[i]
        yield GgufTensor(f"{b}.attn_norm.weight", f"{hf}.input_layernorm.weight", ((d.n_embd,),), NORM_TYPES)
        if i in fused_qkv:
            yield GgufTensor(f"{b}.attn_qkv.weight", None, ((d.n_embd, q + k + v),), mm)
        else:
            yield GgufTensor(f"{b}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", ((d.n_embd, q),), mm)
            yield GgufTensor(f"{b}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", ((d.n_embd, k),), mm)
            yield GgufTensor(f"{b}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", ((d.n_embd, v),), mm)
        yield GgufTensor(
            f"{b}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", ((d.head_v * d.heads[i], d.n_embd),), mm
        )
        yield GgufTensor(f"{b}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", ((d.n_embd,),), NORM_TYPES)
        yield GgufTensor(f"{b}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", ((d.n_embd, d.ffn[i]),), mm)
        yield GgufTensor(f"{b}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", ((d.n_embd, d.ffn[i]),), mm)
        yield GgufTensor(f"{b}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", ((d.ffn[i], d.n_embd),), mm)


@dataclass(frozen=True)
class Idefics3Dims:
    width: int
    ffn: int
    layers: int
    image_size: int
    patch_size: int
    scale_factor: int
    projection_dim: int  # the language model's width
    channels: int = 3  # clip.cpp takes RGB


def idefics3_tensors(d: Idefics3Dims) -> Iterator[GgufTensor]:
    """The projector's tensors. Biases and the final norm are optional to loaders (clip.cpp runs without
    them); a SmolVLM2 checkpoint has them all."""
    vm, w, ffn, p = "model.vision_model", d.width, d.ffn, d.patch_size
    mm = LLAMA_MATMUL_TYPES
    yield GgufTensor(
        "v.patch_embd.weight", f"{vm}.embeddings.patch_embedding.weight", ((p, p, d.channels, w),), CONV_TYPES
    )
    yield GgufTensor("v.patch_embd.bias", f"{vm}.embeddings.patch_embedding.bias", ((w,),), F32, required=False)
    n_pos = (d.image_size // p) ** 2
    yield GgufTensor("v.position_embd.weight", f"{vm}.embeddings.position_embedding.weight", ((w, n_pos),), FLOAT_TYPES)
    for i in range(d.layers):
        b, hf = f"v.blk.{i}", f"{vm}.encoder.layers.{i}"
        for part, hf_part in (
            ("attn_q", "q_proj"),
            ("attn_k", "k_proj"),
            ("attn_v", "v_proj"),
            ("attn_out", "out_proj"),
        ):
            yield GgufTensor(f"{b}.{part}.weight", f"{hf}.self_attn.{hf_part}.weight", ((w, w),), mm)
            yield GgufTensor(f"{b}.{part}.bias", f"{hf}.self_attn.{hf_part}.bias", ((w,),), F32, required=False)
        for part, hf_part in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
            yield GgufTensor(f"{b}.{part}.weight", f"{hf}.{hf_part}.weight", ((w,),), NORM_TYPES)
            yield GgufTensor(f"{b}.{part}.bias", f"{hf}.{hf_part}.bias", ((w,),), NORM_TYPES, required=False)
        # clip.cpp swaps up/down when a file has them the legacy way round (ffn_down's rows = width)
        yield GgufTensor(f"{b}.ffn_up.weight", f"{hf}.mlp.fc1.weight", ((w, ffn), (ffn, w)), mm)
        yield GgufTensor(f"{b}.ffn_up.bias", f"{hf}.mlp.fc1.bias", ((ffn,), (w,)), F32, required=False)
        yield GgufTensor(f"{b}.ffn_down.weight", f"{hf}.mlp.fc2.weight", ((ffn, w), (w, ffn)), mm)
        yield GgufTensor(f"{b}.ffn_down.bias", f"{hf}.mlp.fc2.bias", ((w,), (ffn,)), F32, required=False)
    yield GgufTensor("v.post_ln.weight", f"{vm}.post_layernorm.weight", ((w,),), NORM_TYPES, required=False)
    yield GgufTensor("v.post_ln.bias", f"{vm}.post_layernorm.bias", ((w,),), NORM_TYPES, required=False)
    fc_in = w * d.scale_factor * d.scale_factor  # the pixel shuffle folds scale^2 patches into one
    yield GgufTensor(
        "mm.model.fc.weight", "model.connector.modality_projection.proj.weight", ((fc_in, d.projection_dim),), mm
    )
