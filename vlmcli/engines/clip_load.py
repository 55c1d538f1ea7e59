"""A CLIP GGUF's weights onto a ggml backend, held for the path engines/clip_path.py chose.

The tensors are located by vlmcli.gguf's header reader and checked against the layout table
(vlmcli/gguf/clip_layout.py). With ggml's ops they are copied once from a memory map into a backend
buffer as the file stores them (F16 or quantized position embeddings widened to F32: they are added in
F32). With vlm's kernels every matmul weight the kernels take (and the patch embedding, a matmul too) is
packed from its values in one pass instead, and each block's q, k and v become one weight, so a
tower's attention is one matmul and one op.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmcli.engines import clip_kernels, ggml
from vlmcli.engines.clip_config import ClipConfig
from vlmcli.engines.clip_path import GGML, PACKED_FROM, ClipPath
from vlmcli.engines.ggml import Backend, Graph
from vlmcli.engines.vit import Weight
from vlmcli.errors import ModelError
from vlmcli.gguf.clip_layout import PATCH_EMBEDDING
from vlmcli.gguf.ggml_types import CLIP_MATMUL_TYPES
from vlmcli.gguf.layout import Shape
from vlmcli.gguf.reader import TensorInfo

LOADED_AS_F32 = ("t.position_embd.weight", "v.position_embd.weight")
Specs = Mapping[str, tuple[Shape, tuple[str, ...]]]  # name -> (ggml shape, allowed types): the layout table


@dataclass
class LoadedWeights:
    graph: Graph  # the ggml context of the backend's tensors (closed with the model)
    tensors: dict[str, Weight]
    nbytes: int
    weights_type: str  # the matmul weights' types in memory ("F16", "I16", "Q4_0+F16", ...)
    kernels: ClipPath  # what runs them: ggml where nothing was packed
    packs_sequences: set[str] = field(default_factory=set)  # towers ("t", "v") whose attention is vlm's op


def matmul_weights(specs: Specs) -> frozenset[str]:
    """The names of the matmul weights (the patch embedding aside: it is a convolution in the file)."""
    return frozenset(name for name, (_, types) in specs.items() if types is CLIP_MATMUL_TYPES)


def check_tensors(path: Path, specs: Specs, stored: Mapping[str, TensorInfo]) -> None:
    """Every tensor the layout names is in the file, with its shape and one of its types."""
    for name, (ne, types) in specs.items():
        st = stored.get(name)
        if st is None:
            raise ModelError(f"CLIP GGUF lacks tensor {name}", path)
        got = tuple(int(n) for n in st.shape)
        if got + (1,) * (len(ne) - len(got)) != ne:
            raise ModelError(f"tensor {name} has shape {got}, expected {ne}", path)
        if st.type not in types:
            raise ModelError(f"tensor {name} has type {st.type}, expected one of {', '.join(types)}", path)
        if ne[0] % ggml.block_size(st.type):
            raise ModelError(f"tensor {name}: rows of {ne[0]} do not fit {st.type} blocks", path)


def load_weights(
    path: Path,
    config: ClipConfig,
    specs: Specs,
    stored: Mapping[str, TensorInfo],
    matmuls: Set[str],
    kernels: ClipPath,
    backend: Backend,
) -> LoadedWeights:
    """The weights of specs (checked) on the backend; matmuls: the names of the matmul weights."""
    form = kernels.form
    packed: set[str] = set()
    if form is not None:
        packed = {n for n in matmuls if stored[n].type in PACKED_FROM and clip_kernels.fits(form, *specs[n][0])}
        patch_ne = specs[PATCH_EMBEDDING][0]  # a matmul too (see clip_graphs.vision_graph), packed with the others
        if packed and stored[PATCH_EMBEDDING].type in ("F16", "F32"):
            if clip_kernels.fits(form, math.prod(patch_ne[:-1]), patch_ne[-1]):
                packed.add(PATCH_EMBEDDING)
    if not packed:
        form, kernels = None, GGML
    held = {name: "F32" if name in LOADED_AS_F32 else stored[name].type for name in specs}
    if form is not None:
        held.update({name: clip_kernels.FORMS[form].packing.upper() for name in packed})
    qkv_biases = _fused_qkv_biases(config, packed)  # towers whose attention runs on vlm's kernels
    fused = {f"{b.removesuffix('.attn_qkv.bias')}.attn_{x}.bias" for b in qkv_biases for x in "qkv"}
    weights = Graph(max_tensors=len(specs) + config.text_layers + config.vision_layers + 8)
    try:
        tensors: dict[str, Weight] = {
            name: weights.new_tensor(held[name], ne, name)
            for name, (ne, _) in specs.items()
            if name not in packed | fused
        }
        biases = {name: weights.new_tensor("F32", (n,), name) for name, n in qkv_biases.items()}
        size = backend.alloc_tensors(weights)
        data = np.memmap(path, dtype=np.uint8, mode="r")
        for name, (ne, _) in specs.items():
            if name in fused:  # read once, into the block's q, k, v bias below
                continue
            st = stored[name]
            raw = data[st.offset : st.offset + st.n_bytes]
            if form is not None and name in packed:  # ggml shape [k, n] ([p, p, 3, n] for the patches): n rows of k
                values = raw.view(np.float16 if st.type == "F16" else np.float32) if st.type in ("F16", "F32") else None
                if values is None:  # Q8_0: its values, exactly, as F32
                    values = _to_f32(raw, st.type, ne)
                tensors[name] = weight = clip_kernels.pack(values.reshape(ne[-1], -1), form)
                size += weight.nbytes
            else:
                target = tensors[name]
                assert isinstance(target, ggml.Tensor)
                backend.set(target, _to_f32(raw, st.type, ne) if held[name] != st.type else raw)  # copies the bytes
        for bias, tensor in biases.items():  # q, k and v as one weight
            blk = bias.removesuffix(".attn_qkv.bias")
            parts = [f"{blk}.attn_{x}" for x in "qkv"]
            q, k, v = (tensors.pop(f"{part}.weight") for part in parts)
            assert isinstance(q, clip_kernels.PackedWeight) and isinstance(k, clip_kernels.PackedWeight)
            assert isinstance(v, clip_kernels.PackedWeight)
            tensors[f"{blk}.attn_qkv.weight"] = q.stacked(k, v)
            tensors[bias] = tensor
            backend.set(tensor, np.concatenate([_f32_values(data, stored[f"{part}.bias"]) for part in parts]))
        del data
    except BaseException:
        weights.close()
        raise
    return LoadedWeights(
        weights,
        tensors,
        size,
        "+".join(sorted({held[name] for name in matmuls})),
        kernels,
        {prefix for prefix in "tv" if f"{prefix}.blk.0.attn_qkv.bias" in qkv_biases},
    )


def _to_f32(raw: np.ndarray, type_name: str, ne: Shape) -> np.ndarray:
    """Stored bytes of an F16 or quantized tensor (ggml shape ne) -> its float32 values."""
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32)
    return ggml.dequantize(raw, type_name).reshape(int(np.prod(ne[1:], dtype=np.int64)), -1)


def _f32_values(data: np.ndarray, st: TensorInfo) -> np.ndarray:
    """An F32 tensor's values from the mapped file."""
    return data[st.offset : st.offset + st.n_bytes].view(np.float32)


def _fused_qkv_biases(cfg: ClipConfig, packed: Set[str]) -> dict[str, int]:
    """{name of a block's q, k, v bias as one tensor: its length} for each tower whose q, k and v
    weights are all packed and whose heads fit vlm's attention op."""
    out: dict[str, int] = {}
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
