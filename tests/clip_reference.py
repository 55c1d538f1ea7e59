"""A plain numpy forward pass of a two-tower CLIP GGUF: the yardstick for the ggml engine.

Written from Hugging Face's CLIPModel (modeling_clip.py) semantics, independently of
vlmcli.engines.clip: numpy shapes (HF orientation), float64 arithmetic (float32 on request, for the
benchmark's baseline), weights dequantized with gguf.quants.dequantize, the patch embedding as a real
strided convolution, the full 77-token causal text sequence, and final_layer_norm applied before
pooling, as HF does.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class _Reader(GGUFReader):
    """GGUFReader on a plain ndarray view of its memmap: same data, much faster on 98k vocabulary strings."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)


class ReferenceClip:
    def __init__(self, gguf_path: str | Path, dtype: type = np.float64):
        self.dtype = dtype
        reader = _Reader(gguf_path, "r")

        def field(key: str):
            f = reader.fields[key]
            return f.contents()

        self.use_gelu = bool(field("clip.use_gelu"))
        self.patch = int(field("clip.vision.patch_size"))
        self.image_size = int(field("clip.vision.image_size"))
        self.v_heads = int(field("clip.vision.attention.head_count"))
        self.t_heads = int(field("clip.text.attention.head_count"))
        self.v_eps = float(field("clip.vision.attention.layer_norm_epsilon"))
        self.t_eps = float(field("clip.text.attention.layer_norm_epsilon"))
        self.v_layers = int(field("clip.vision.block_count"))
        self.t_layers = int(field("clip.text.block_count"))
        # Every tensor as float64 in numpy (HF) orientation.
        self.w: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            np_shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            values = dequantize(np.asarray(t.data), t.tensor_type)
            self.w[t.name] = np.asarray(values, dtype=dtype).reshape(np_shape)

    # --- pieces
    @staticmethod
    def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w + b

    def activation(self, x: np.ndarray) -> np.ndarray:
        if self.use_gelu:
            return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
        return x / (1.0 + np.exp(-1.702 * x))  # quick_gelu: x * sigmoid(1.702 x)

    def linear(self, x: np.ndarray, name: str, bias: bool = True) -> np.ndarray:
        w = self.w[f"{name}.weight"]
        # one 2-D product (a single BLAS call) rather than numpy's per-sequence batched matmul
        y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])
        return y + self.w[f"{name}.bias"] if bias else y

    def encoder_layer(self, x: np.ndarray, prefix: str, heads: int, eps: float, causal: bool) -> np.ndarray:
        n, t, d = x.shape
        hd = d // heads
        h = self.layer_norm(x, self.w[f"{prefix}.ln1.weight"], self.w[f"{prefix}.ln1.bias"], eps)

        def split(y: np.ndarray) -> np.ndarray:  # (N, T, D) -> (N, H, T, hd)
            return y.reshape(n, t, heads, hd).transpose(0, 2, 1, 3)

        q = split(self.linear(h, f"{prefix}.attn_q")) * hd**-0.5
        k = split(self.linear(h, f"{prefix}.attn_k"))
        v = split(self.linear(h, f"{prefix}.attn_v"))
        scores = q @ k.transpose(0, 1, 3, 2)  # (N, H, T, T)
        if causal:
            scores = scores + np.triu(np.full((t, t), -np.inf, dtype=self.dtype), k=1)
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
        x = x + self.linear(attn, f"{prefix}.attn_out")

        h = self.layer_norm(x, self.w[f"{prefix}.ln2.weight"], self.w[f"{prefix}.ln2.bias"], eps)
        h = self.activation(self.linear(h, f"{prefix}.ffn_down"))  # HF mlp.fc1 (stored as ffn_down)
        return x + self.linear(h, f"{prefix}.ffn_up")  # HF mlp.fc2 (stored as ffn_up)

    # --- towers
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        px = np.asarray(pixels, dtype=self.dtype)
        n, p = px.shape[0], self.patch
        g = self.image_size // p
        kernel = self.w["v.patch_embd.weight"]  # (D, 3, P, P)
        # Conv2d with stride = kernel size: each output position sees one P x P patch.
        windows = px.reshape(n, 3, g, p, g, p)
        patches = np.einsum("ncyixj,dcij->nyxd", windows, kernel, optimize=True).reshape(n, g * g, -1)
        cls = np.broadcast_to(self.w["v.class_embd"], (n, 1, patches.shape[-1]))
        x = np.concatenate([cls, patches], axis=1) + self.w["v.position_embd.weight"]
        x = self.layer_norm(x, self.w["v.pre_ln.weight"], self.w["v.pre_ln.bias"], self.v_eps)
        for i in range(self.v_layers):
            x = self.encoder_layer(x, f"v.blk.{i}", self.v_heads, self.v_eps, causal=False)
        pooled = self.layer_norm(x[:, 0], self.w["v.post_ln.weight"], self.w["v.post_ln.bias"], self.v_eps)
        return (pooled @ self.w["visual_projection.weight"].T).astype(np.float32)

    def encode_texts(self, tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)
        n, t = ids.shape
        x = self.w["t.token_embd.weight"][ids] + self.w["t.position_embd.weight"][:t]
        for i in range(self.t_layers):
            x = self.encoder_layer(x, f"t.blk.{i}", self.t_heads, self.t_eps, causal=True)
        x = self.layer_norm(x, self.w["t.post_ln.weight"], self.w["t.post_ln.bias"], self.t_eps)
        pooled = x[np.arange(n), ids.argmax(axis=1)]  # the end-of-text token has the highest id
        return (pooled @ self.w["text_projection.weight"].T).astype(np.float32)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1e-7 (Abramowitz & Stegun 7.1.26); numpy has none and scipy is not a dependency."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


@lru_cache(maxsize=8)
def reference_model(gguf_path: str) -> ReferenceClip:
    return ReferenceClip(gguf_path)


def reference_encode_images(gguf_path: str | Path, pixels: np.ndarray) -> np.ndarray:
    return reference_model(str(gguf_path)).encode_images(pixels)


def reference_encode_texts(gguf_path: str | Path, tokens: np.ndarray) -> np.ndarray:
    return reference_model(str(gguf_path)).encode_texts(tokens)


# --- inputs for engine tests -----------------------------------------------------------------------

BOS, EOS = 49406, 49407


def images(n: int, seed: int = 0) -> np.ndarray:
    """n random pixel tensors (already normalised), 224 x 224."""
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)


def texts(lengths: list[int], seed: int = 0) -> np.ndarray:
    """bos, random word ids, eos, zero padding: one row per length (number of word tokens)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), 77), np.int32)
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, 1 : n + 1] = rng.integers(256, 49000, n)
        ids[row, n + 1] = EOS
    return ids


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def one_by_one(encode, inputs: np.ndarray) -> np.ndarray:
    return np.concatenate([encode(inputs[i : i + 1]) for i in range(len(inputs))])


def check_batch_independence(model, encode, inputs: np.ndarray, monkeypatch) -> np.ndarray:
    """The same bits for each input alone, in one batch, reversed, repeated and in chunks of 3 (the
    model's batch_size set through monkeypatch, restored after); returns the one-by-one results."""
    alone = one_by_one(encode, inputs)
    assert np.array_equal(encode(inputs), alone)
    assert np.array_equal(encode(inputs[::-1]), alone[::-1])
    assert np.array_equal(encode(np.concatenate([inputs] * 6)), np.concatenate([alone] * 6))
    size = model.batch_size
    monkeypatch.setattr(model, "batch_size", 3)
    assert np.array_equal(encode(inputs), alone)
    monkeypatch.setattr(model, "batch_size", size)
    return alone
