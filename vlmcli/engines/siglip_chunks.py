"""Encoding one of mtmd's image chunks into the embeddings the language model reads: the engine's one seam.

mtmd tokenizes a prompt with its image (resize, tiles, the overview) into chunks; each image chunk is
one tile, whose embeddings (tokens x the model's width, float32) llama.cpp then decodes. Two encoders
give them: MtmdEncoder (mtmd_encode_chunk, llama.cpp's clip.cpp) and VlmEncoder (engines/siglip.py on
vlm's kernels), which encodes the very pixels mtmd's preprocessor made for the chunk.

mtmd's C API does not hand those pixels out, so VlmEncoder reads them from the chunk's image tokens in
the layout of the pinned llama.cpp (tools/mtmd: mtmd_image_tokens, clip_image_f32_batch,
clip_image_f32), checked against what the public API reports (the token grid, the tile's size and
values); a chunk that fails the check is encoded by mtmd's encoder instead.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from threading import Event
from typing import Protocol

import numpy as np

from vlmcli.engines.llama_native import mtmd
from vlmcli.engines.siglip import PackedSiglip, SiglipEncoder
from vlmcli.engines.vision_path import choose_vision_path
from vlmcli.errors import VlmError
from vlmcli.gguf.reader import GgufInfo

# Byte offsets in the pinned llama.cpp's structs (x86-64, LP64): std::vector is (begin, end, capacity).
_TOKENS_NX, _TOKENS_NY, _TOKENS_ENTRIES = 0, 4, 24  # mtmd_image_tokens: nx, ny, batch_f32.entries
_F32_IMAGE_SIZE, _F32_BUF, _F32_NX, _F32_NY = 56, 24, 48, 52  # clip_image_f32: sizeof, buf, nx_, ny_


class ChunkEncoder(Protocol):
    """Encodes an image chunk of an mtmd context: (n_tokens, width) float32 embeddings."""

    name: str  # "mtmd" or "vlm"

    def encode(self, ctx: object, chunk: object, n_tokens: int, width: int, n_threads: int) -> np.ndarray: ...

    def close(self) -> None: ...


class MtmdEncoder:
    """mtmd's own encoder (clip.cpp on ggml), on whatever device the mtmd context runs."""

    name = "mtmd"

    def encode(self, ctx: object, chunk: object, n_tokens: int, width: int, n_threads: int) -> np.ndarray:
        rc = mtmd.mtmd_encode_chunk(ctx, chunk)
        if rc != 0:
            raise VlmError(f"the vision encoder failed (code {rc})")
        out = mtmd.mtmd_get_output_embd(ctx)
        return np.ctypeslib.as_array(out, shape=(n_tokens * width,)).reshape(n_tokens, width).copy()

    def close(self) -> None:
        pass


def chunk_tiles(chunk: object, tile_size: int) -> np.ndarray | None:
    """The normalised pixels (N, tile, tile, 3) mtmd prepared for an image chunk, or None where the
    chunk does not look as the pinned layout says (then mtmd's encoder runs)."""
    tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
    address = ctypes.cast(tokens, ctypes.c_void_p).value
    if not address:
        return None
    nx, ny = (ctypes.c_uint32.from_address(address + at).value for at in (_TOKENS_NX, _TOKENS_NY))
    if (nx, ny) != (mtmd.mtmd_image_tokens_get_nx(tokens), mtmd.mtmd_image_tokens_get_ny(tokens)):
        return None
    begin, end = (ctypes.c_size_t.from_address(address + _TOKENS_ENTRIES + at).value for at in (0, 8))
    count, rest = divmod(end - begin, _F32_IMAGE_SIZE)
    if rest or count < 1 or nx * ny * count != mtmd.mtmd_image_tokens_get_n_tokens(tokens):
        return None
    tiles = np.empty((count, tile_size, tile_size, 3), np.float32)
    for i in range(count):
        entry = begin + i * _F32_IMAGE_SIZE
        buf, buf_end = (ctypes.c_size_t.from_address(entry + _F32_BUF + at).value for at in (0, 8))
        size = (ctypes.c_int32.from_address(entry + _F32_NX).value, ctypes.c_int32.from_address(entry + _F32_NY).value)
        if size != (tile_size, tile_size) or buf_end - buf != tiles[i].nbytes:
            return None
        ctypes.memmove(tiles[i].ctypes.data, buf, tiles[i].nbytes)
    if not np.isfinite(tiles).all():
        return None
    return tiles


class VlmEncoder:
    """SmolVLM2's SigLIP encoder and connector on vlm's kernels (engines/siglip.py), on the CPU."""

    name = "vlm"

    def __init__(self, siglip: SiglipEncoder, fallback: MtmdEncoder):
        self.siglip = siglip
        self.fallback = fallback

    @classmethod
    def load(cls, path: Path, info: GgufInfo, form: str, n_threads: int) -> VlmEncoder:
        return cls(SiglipEncoder.load(path, info, form, n_threads), MtmdEncoder())

    def encode(self, ctx: object, chunk: object, n_tokens: int, width: int, n_threads: int) -> np.ndarray:
        cfg = self.siglip.config
        tiles = chunk_tiles(chunk, cfg.image_size)
        if tiles is None or len(tiles) * cfg.tokens_per_tile != n_tokens or cfg.projection_dim != width:
            return self.fallback.encode(ctx, chunk, n_tokens, width, n_threads)
        return self.siglip.encode(tiles, n_threads).reshape(n_tokens, width)

    def close(self) -> None:
        self.siglip.close()


class PendingEncoder:
    """An encoder being made: for vlm's kernels its weights are packed in a background thread meanwhile
    (numpy and vlm's C packer only; the ggml backend is made by finish, on the caller's thread)."""

    def __init__(self, mmproj: Path, info: GgufInfo, form: str | None, n_threads: int):
        self._mmproj, self._n_threads = mmproj, n_threads
        self._stop = Event()
        self._packing: Future[PackedSiglip] | None = None
        if form is not None:
            pool = ThreadPoolExecutor(1, thread_name_prefix="vlm-pack")
            self._packing = pool.submit(PackedSiglip.read, mmproj, info, form, n_threads, self._stop)
            pool.shutdown(wait=False)

    def finish(self) -> ChunkEncoder:
        """The encoder, once its weights are packed (a packing error is raised here)."""
        if self._packing is None:
            return MtmdEncoder()
        siglip = SiglipEncoder.from_packed(self._mmproj, self._packing.result(), self._n_threads)
        return VlmEncoder(siglip, MtmdEncoder())

    def cancel(self) -> None:
        """Stop packing (the weights in hand are finished): the load it overlapped has failed."""
        self._stop.set()


def start_chunk_encoder(mmproj: Path, info: GgufInfo, on_cpu: bool, n_threads: int) -> PendingEncoder:
    """The encoder vision_path.choose_vision_path picks for this projector and device, its weights packed
    from now on while the caller loads the language model: PendingEncoder.finish gives it."""
    return PendingEncoder(mmproj, info, choose_vision_path(on_cpu, info).form, n_threads)
