"""SmolVLM2's vision encoder (SigLIP) and connector on vlm's CPU kernels, from the mmproj GGUF as it is.

mtmd's graph for an idefics3 projector (llama.cpp tools/mtmd/models/siglip.cpp), on the ViT runner's
blocks (engines/vit.py) that CLIP's towers use: the patch embedding (a stride = kernel convolution,
so a matmul), learned position embeddings, pre-LN blocks with GELU in its tanh form, the post layer
norm, then the connector: the pixel shuffle (scale_factor^2 neighbouring patches folded into one
token) and the projection to the language model's width. Every matmul runs on the packed weights of
one kernel form (engines/vision_path.py picks it), attention on the packed-sequence op.

SiglipEncoder.encode takes the tiles mtmd's preprocessor made (normalised RGB, rows of pixels) and
returns the embeddings mtmd_encode_chunk would: (tokens, projection_dim) float32 per tile.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from threading import Event

import numpy as np

from vlmcli.engines import clip_kernels, ggml
from vlmcli.engines.clip_kernels import Norm, PackedWeight
from vlmcli.engines.ggml import Backend, Graph, Tensor
from vlmcli.engines.native import NativeResource
from vlmcli.engines.vit import Attend, Block, Weight, block, block_weights, layer_norm, linear, packed_attention, tensor
from vlmcli.errors import VlmError
from vlmcli.gguf.reader import GgufInfo, TensorInfo
from vlmcli.gguf.smolvlm2_layout import Idefics3Dims, idefics3_tensors

PACKED_FROM = ("F16", "F32", "BF16", "Q8_0")  # stored matmul types whose values the kernels take exactly
PATCH = "v.patch_embd.weight"
PROJECTION = "mm.model.fc.weight"


@dataclass(frozen=True)
class SiglipConfig:
    """The projector's hyper-parameters (clip.vision.* keys, checked by gguf.rules)."""

    width: int
    ffn: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    scale_factor: int
    projection_dim: int
    eps: float

    @classmethod
    def from_gguf(cls, meta: Mapping[str, object]) -> SiglipConfig:
        def num(key: str, default: int | None = None) -> int:
            value = meta.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool):
                raise VlmError(f"the projector lacks {key}")
            return value

        eps = meta.get("clip.vision.attention.layer_norm_epsilon", 1e-6)
        return cls(
            width=num("clip.vision.embedding_length"),
            ffn=num("clip.vision.feed_forward_length"),
            layers=num("clip.vision.block_count"),
            heads=num("clip.vision.attention.head_count"),
            image_size=num("clip.vision.image_size"),
            patch_size=num("clip.vision.patch_size"),
            scale_factor=num("clip.vision.projector.scale_factor", 1),
            projection_dim=num("clip.vision.projection_dim"),
            eps=float(eps) if isinstance(eps, (int, float)) else 1e-6,
        )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def tokens_per_tile(self) -> int:
        return self.n_patches // self.scale_factor**2

    def dims(self) -> Idefics3Dims:
        return Idefics3Dims(
            self.width,
            self.ffn,
            self.layers,
            self.image_size,
            self.patch_size,
            self.scale_factor,
            self.projection_dim,
        )


def unsupported(info: GgufInfo, form: str) -> str | None:
    """Why vlm's kernels cannot run this projector in this form (mtmd's encoder then does), or None."""
    meta = info.metadata
    if meta.get("clip.projector_type") != "idefics3":
        return f"projector {meta.get('clip.projector_type')!r} (vlm's encoder runs idefics3's)"
    if not meta.get("clip.use_gelu"):
        return "an activation other than GELU"
    try:
        cfg = SiglipConfig.from_gguf(meta)
    except VlmError as e:
        return str(e)
    if cfg.image_size % cfg.patch_size or cfg.grid % cfg.scale_factor:
        return "tiles that do not divide into whole patches and merged tokens"
    if not clip_kernels.attention_fits(cfg.width, cfg.heads):
        return f"{cfg.heads} heads of width {cfg.width} (the attention op takes heads of 8 to 128 floats)"
    stored = {t.name: t for t in info.tensors}
    d = cfg.width
    k_patch = 3 * cfg.patch_size**2
    for spec in idefics3_tensors(cfg.dims()):
        st = stored.get(spec.name)
        if st is None:
            return f"no tensor {spec.name}"
        if spec.name.endswith(".weight") and st.type not in PACKED_FROM and len(spec.shapes[0]) > 1:
            return f"{spec.name} stored as {st.type}"
    shapes = [
        (k_patch, d),
        (d, 3 * d),
        (d, d),
        (d, cfg.ffn),
        (cfg.ffn, d),
        (d * cfg.scale_factor**2, cfg.projection_dim),
    ]
    if not all(clip_kernels.fits(form, k, n) for k, n in shapes):
        return f"widths the {form} kernel does not take"
    if d % clip_kernels.NORM_MULTIPLE:
        return f"width {d} (the kernels layer-norm rows of a multiple of {clip_kernels.NORM_MULTIPLE})"
    return None


def _values(data: np.ndarray, st: TensorInfo) -> np.ndarray:
    """A stored tensor's values as float16 or float32 (flat), exactly."""
    raw = data[st.offset : st.offset + st.n_bytes]
    if st.type == "F16":
        return raw.view(np.float16)
    if st.type == "F32":
        return raw.view(np.float32)
    if st.type == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return ggml.dequantize(raw, st.type).reshape(-1)


@dataclass(frozen=True)
class PackedSiglip:
    """A projector's weights read off its file and packed for one kernel form, with no native state yet:
    they can be packed in a thread while llama.cpp loads the language model (siglip_chunks)."""

    config: SiglipConfig
    form: str
    matmuls: dict[str, PackedWeight]
    small: dict[str, np.ndarray]  # F32 tensors for the backend: norms, biases, position embeddings

    @classmethod
    def read(
        cls, path: str | os.PathLike[str], info: GgufInfo, form: str, workers: int = 1, stop: Event | None = None
    ) -> PackedSiglip:
        """The weights packed by `workers` threads (the packer runs in C, outside the GIL), each weight read
        (dequantized, for Q8_0 and BF16 files) just before it is packed. Once `stop` is set the weights
        not yet packed are skipped and VlmError is raised."""
        cfg = SiglipConfig.from_gguf(info.metadata)
        d = cfg.width
        stored = {t.name: t for t in info.tensors}
        data = np.memmap(path, dtype=np.uint8, mode="r")

        def values(name: str) -> np.ndarray:
            return _values(data, stored[name])

        def rows(name: str, k: int) -> np.ndarray:  # ggml [k, n] = numpy (n, k): HF's nn.Linear layout
            return values(name).reshape(-1, k)

        jobs: dict[str, tuple[str, int]] = {PATCH: (PATCH, 3 * cfg.patch_size**2)}  # packed name -> (stored, k)
        small = {x: values(x) for x in ("v.patch_embd.bias", "v.position_embd.weight")}
        for i in range(cfg.layers):
            b = f"v.blk.{i}"
            for x in ("q", "k", "v", "out"):
                jobs[f"{b}.attn_{x}.weight"] = (f"{b}.attn_{x}.weight", d)
            small[f"{b}.attn_qkv.bias"] = np.concatenate([values(f"{b}.attn_{x}.bias") for x in "qkv"])
            # fc1 takes the width in, fc2 gives it back; mtmd accepts ffn_up / ffn_down either way round
            up_rows_in = int(stored[f"{b}.ffn_up.weight"].shape[0])
            fc1, fc2 = ("ffn_up", "ffn_down") if up_rows_in == d else ("ffn_down", "ffn_up")
            # vit.block_weights names fc1 "ffn_down" and fc2 "ffn_up" (CLIP's legacy files)
            jobs[f"{b}.ffn_down.weight"] = (f"{b}.{fc1}.weight", d)
            jobs[f"{b}.ffn_up.weight"] = (f"{b}.{fc2}.weight", cfg.ffn)
            small[f"{b}.ffn_down.bias"] = values(f"{b}.{fc1}.bias")
            small[f"{b}.ffn_up.bias"] = values(f"{b}.{fc2}.bias")
            small[f"{b}.attn_out.bias"] = values(f"{b}.attn_out.bias")
            for part in ("ln1", "ln2"):
                for x in ("weight", "bias"):
                    small[f"{b}.{part}.{x}"] = values(f"{b}.{part}.{x}")
        for x in ("weight", "bias"):
            small[f"v.post_ln.{x}"] = values(f"v.post_ln.{x}")
        jobs[PROJECTION] = (PROJECTION, d * cfg.scale_factor**2)

        def pack(job: tuple[str, int]) -> PackedWeight | None:
            return None if stop is not None and stop.is_set() else clip_kernels.pack(rows(*job), form)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            done = dict(zip(jobs, pool.map(pack, jobs.values())))
        packed = {name: w for name, w in done.items() if w is not None}
        if len(packed) < len(done):
            raise VlmError("the vision encoder's packing was stopped", path)
        for i in range(cfg.layers):
            q, k, v = (packed.pop(f"v.blk.{i}.attn_{x}.weight") for x in "qkv")
            packed[f"v.blk.{i}.attn_qkv.weight"] = q.stacked(k, v)
        small = {name: np.array(a, np.float32) for name, a in small.items()}  # copies: the file can close
        return cls(cfg, form, packed, small)


class SiglipEncoder(NativeResource):
    """An idefics3 mmproj's vision encoder and connector, packed for one form of vlm's kernels (CPU)."""

    def __init__(self, path: Path, config: SiglipConfig, form: str, backend: Backend, weights: Graph):
        self.path = path
        self.config = config
        self.form = form
        self.backend = backend
        self._weights = weights
        self._t: dict[str, Weight] = {}
        self.blocks: list[Block] = []

    @classmethod
    def load(cls, path: str | os.PathLike[str], info: GgufInfo, form: str, n_threads: int) -> SiglipEncoder:
        """The projector's weights packed for form (unsupported(info, form) is None: the caller checked)."""
        return cls.from_packed(path, PackedSiglip.read(path, info, form, n_threads), n_threads)

    @classmethod
    def from_packed(cls, path: str | os.PathLike[str], packed: PackedSiglip, n_threads: int) -> SiglipEncoder:
        """The encoder on packed weights: its F32 tensors go to a ggml backend of n_threads."""
        cfg = packed.config
        model = cls(Path(path), cfg, packed.form, Backend(n_threads=n_threads), Graph(max_tensors=16 * cfg.layers + 16))
        try:
            model._attach(packed)
        except BaseException:
            model.close()
            raise
        return model

    def _attach(self, packed: PackedSiglip) -> None:
        tensors = {name: self._weights.new_tensor("F32", (a.size,), name) for name, a in packed.small.items()}
        self.backend.alloc_tensors(self._weights)
        for name, a in packed.small.items():
            self.backend.set(tensors[name], a)
        self._t.update(packed.matmuls)
        self._t.update(tensors)
        self.blocks = [block_weights(self._t, f"v.blk.{i}") for i in range(self.config.layers)]

    def close(self) -> None:
        if getattr(self, "backend", None) is not None:
            self.backend.close()
            self._weights.close()
            self.backend = None  # type: ignore[assignment]

    def encode(self, tiles: np.ndarray, n_threads: int | None = None) -> np.ndarray:
        """(N, S, S, 3) normalised float32 tiles (rows of RGB pixels, as mtmd's preprocessor writes
        them) -> (N, tokens_per_tile, projection_dim) embeddings."""
        if self.backend is None:
            raise VlmError("the vision encoder is closed", self.path)
        cfg = self.config
        s = cfg.image_size
        if tiles.ndim != 4 or tiles.shape[1:] != (s, s, 3):
            raise VlmError(f"tiles must have shape (N, {s}, {s}, 3), got {tiles.shape}")
        if n_threads:
            self.backend.set_threads(n_threads)
        n = len(tiles)
        with Graph(max_tensors=48 * cfg.layers + 64, graph_size=64 * cfg.layers + 128) as g:
            patches_in, out = self._graph(g, n)
            self.backend.allocate(g)
            self.backend.set(patches_in, _patches(np.asarray(tiles, np.float32), cfg.patch_size))
            self.backend.compute(g)
            return self.backend.get(out, 3)

    def _graph(self, g: Graph, n: int) -> tuple[Tensor, Tensor]:
        cfg, t = self.config, self._t
        d, p, grid, sf = cfg.width, cfg.patch_size, cfg.grid, cfg.scale_factor
        patches_in = g.input("F32", (3 * p * p, cfg.n_patches, n), "patches")
        patch_w = t[PATCH]
        assert isinstance(patch_w, PackedWeight)
        x = linear(g, patches_in, patch_w, tensor(t, "v.patch_embd.bias"))  # [D, P, N]
        x = g.add(x, g.reshape(tensor(t, "v.position_embd.weight"), d, cfg.n_patches))
        seqs = np.stack([np.arange(n) * cfg.n_patches, np.full(n, cfg.n_patches)], axis=1)
        int16 = clip_kernels.FORMS[self.form].packing == "i16"  # the attention in the matmuls' number format

        def attend(x: Tensor, b: Block, norm: Norm) -> Tensor:
            return packed_attention(g, x, b, norm, cfg.heads, seqs, causal=False, int16=int16)

        every: Attend = attend
        for blk in self.blocks:
            x = block(g, x, blk, cfg.eps, "gelu", every)
        x = layer_norm(g, x, Norm(tensor(t, "v.post_ln.weight"), tensor(t, "v.post_ln.bias"), cfg.eps))
        # the pixel shuffle as mtmd does it (build_patch_merge_permute), per tile: [D, W, H] ->
        # [D sf sf, W / sf, H / sf], sf x sf neighbouring patches side by side in each token
        x = g.reshape(x, d * sf, grid // sf, grid, n)
        x = g.cont(g.permute(x, 0, 2, 1, 3))  # [D sf, H, W / sf, N]
        x = g.reshape(x, d * sf * sf, grid // sf, grid // sf, n)
        x = g.cont(g.permute(x, 0, 2, 1, 3))  # [D sf sf, W / sf, H / sf, N]
        x = g.reshape(x, d * sf * sf, cfg.tokens_per_tile, n)
        projection = t[PROJECTION]
        assert isinstance(projection, PackedWeight)
        return patches_in, g.output(linear(g, x, projection))


def _patches(tiles: np.ndarray, p: int) -> np.ndarray:
    """(N, S, S, 3) pixels -> (N, patches, 3 p p): each patch's values in the conv weight's (channel, y,
    x) order, patches row by row (the convolution has stride = kernel, so it is this and a matmul)."""
    n, s = len(tiles), tiles.shape[1]
    grid = s // p
    return np.ascontiguousarray(
        tiles.reshape(n, grid, p, grid, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(n, grid * grid, 3 * p * p)
    )
