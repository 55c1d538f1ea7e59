"""CLIP's two towers (ViT image encoder, causal text encoder) on ggml: ClipModel.

ClipModel.load reads a two-tower CLIP GGUF (clip.cpp's legacy layout, vlmcli/gguf/clip_layout.py,
written by scripts/convert/clip.py or by clip.cpp's own tools): its hyper-parameters (clip_config.py),
which code runs its matmuls on this device (clip_path.py: ggml's ops, or vlm's kernels in the form the
CPU runs best), and its weights, copied or packed once into a ggml backend buffer (clip_load.py). Each
call then builds a small graph for a batch of images or texts (clip_graphs.py); the graph allocator's
buffer is reused across calls. Results never depend on the batch: ggml picks kernels by shape, so no
shape comes from a batch-mate, and vlm's kernels sum every output in one fixed order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlmcli.engines.clip_config import ClipConfig
from vlmcli.engines.clip_graphs import TowerGraph, text_graph, text_lengths, vision_graph
from vlmcli.engines.clip_load import check_tensors, load_weights, matmul_weights
from vlmcli.engines.clip_path import GGML, ClipPath, choose_path
from vlmcli.engines.cores import CoreShare
from vlmcli.engines.ggml import Backend, Graph
from vlmcli.engines.native import NativeResource
from vlmcli.engines.vit import Weight, block_weights
from vlmcli.errors import VlmError
from vlmcli.gguf.clip_layout import tensor_specs
from vlmcli.gguf.validate import require_kind

__all__ = ["ClipConfig", "ClipModel", "text_lengths"]

SMALL_GRAPH_FLOPS = 50e6  # below this a batch runs on one thread (see ClipModel._use_threads_for)


class ClipModel(NativeResource):
    """A loaded two-tower CLIP GGUF. Use `ClipModel.load(path)`; close() (or `with`) frees it."""

    def __init__(
        self,
        path: Path,
        config: ClipConfig,
        backend: Backend,
        weights: Graph,
        tensors: dict[str, Weight],
        batch_size: int,
        cores: CoreShare | None = None,
    ):
        self.path = path
        self.config = config
        self.backend = backend
        self._weights = weights
        self._t = tensors
        self.batch_size = batch_size
        self.weights_bytes = 0
        self.weights_type = config.file_type  # the matmul weights' type in memory (clip_load.load_weights)
        self.kernels: ClipPath = GGML  # what runs the matmuls (clip_path.choose_path)
        self.packs_sequences: set[str] = set()  # towers ("t", "v") whose attention runs on vlm's kernels
        self.cores = cores or CoreShare(backend.n_threads)
        self.n_threads = self.cores.most  # of the current batch (see _sharing_cores)
        self._blocks = {
            prefix: [block_weights(tensors, f"{prefix}.blk.{i}") for i in range(n)]
            for prefix, n in (("t", config.text_layers), ("v", config.vision_layers))
        }

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        device: str | None = None,
        batch_size: int = 32,
    ) -> ClipModel:
        """Load a two-tower CLIP GGUF. n_gpu_layers != 0 (-1 = all, as for llama.cpp) puts the whole model
        on the first GPU device (CLIP is small: all or nothing); device names a ggml device ("CPU",
        "CUDA0", "Vulkan0", ...). On the CPU, VLM_CLIP_KERNELS overrides what runs (clip_path.py)."""
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
        check_tensors(p, specs, stored)
        matmuls = matmul_weights(specs)
        # The label from the matmul weights alone (the patch embedding is F16 in every file clip.cpp reads).
        matmul_types = sorted({stored[name].type for name in matmuls})
        config.file_type = "+".join(matmul_types) or config.file_type

        cores = CoreShare(n_threads)
        backend = Backend(device=device, gpu=n_gpu_layers != 0, n_threads=cores.most)
        try:
            loaded = load_weights(p, config, specs, stored, matmuls, choose_path(backend.is_cpu, matmul_types), backend)
        except BaseException:
            backend.close()
            raise
        model = cls(p, config, backend, loaded.graph, loaded.tensors, batch_size, cores=cores)
        model.weights_bytes = loaded.nbytes
        model.weights_type = loaded.weights_type
        model.kernels = loaded.kernels
        model.packs_sequences = loaded.packs_sequences
        return model

    def close(self) -> None:
        if getattr(self, "backend", None) is not None:
            self.backend.close()
            self._weights.close()
            self.backend = None  # type: ignore[assignment]

    def _check_open(self) -> None:
        if self.backend is None:
            raise VlmError("the CLIP model is closed", self.path)

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
            yield

    def _new_graph(self, n_layers: int) -> Graph:
        return Graph(max_tensors=48 * n_layers + 64, graph_size=64 * n_layers + 128)

    def _run(self, g: Graph, graph: TowerGraph, width: int, ffn: int, n_layers: int, n: int) -> np.ndarray:
        """Computes a built graph: its first n output rows, (n, projection_dim)."""
        self.backend.allocate(g)
        self._use_threads_for(graph.n_tokens, width, ffn, n_layers)
        for tensor, values in graph.inputs:
            self.backend.set(tensor, values)
        self.backend.compute(g)
        return self.backend.get(graph.out, 2)[:n]

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
        cfg = self.config
        with self._new_graph(cfg.vision_layers) as g:
            graph = vision_graph(g, cfg, self._t, self._blocks["v"], "v" in self.packs_sequences, pixels)
            return self._run(g, graph, cfg.vision_width, cfg.vision_ffn, cfg.vision_layers, len(pixels))

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
        cfg = self.config
        with self._new_graph(cfg.text_layers) as g:
            graph = text_graph(g, cfg, self._t, self._blocks["t"], packed, tokens)
            return self._run(g, graph, cfg.text_width, cfg.text_ffn, cfg.text_layers, len(tokens))
