"""CLIP's two towers as a numpy forward pass, for the CPU: matmuls through numpy's BLAS (OpenBLAS sgemm).

Why it exists: on the CPU, OpenBLAS's sgemm runs CLIP's matmuls two to three times faster than ggml's
mul_mat (see README, "Measured here"), so ClipModel runs this on the CPU backend and keeps the ggml
graphs for GPU devices (VLM_CLIP_PATH=ggml|blas overrides the choice). Semantics are the ggml graph's
(engines/clip.py): pre-LN blocks, quick_gelu or erf gelu as the file says, a causal mask for text,
pooling at the class token / the end-of-text token, the final layer norm and projection, no L2 norm.

Weights are dequantized once at load to float32 from the file's F32/F16/Q8_0/... bytes (exact for F16
and the Q formats: the same values ggml multiplies with), stored (in, out) so that `x @ w` is one sgemm.
The token embedding stays in its stored type when it is F32 or F16 (gathered rows are widened exactly).

Batch independence (a vector's bits never depend on its batch companions): OpenBLAS picks kernels and
summation orders by the whole matrix's shape and a row's position in it (its Haswell kernels do), so
every matmul runs per sequence (`np.matmul` on (N, T, D) calls sgemm once per sequence, with T rows),
texts run at their own length, and every elementwise op works row by row. The final projections run
one row at a time (gemv) for the same reason. The sequences of a batch are shared between n_threads
Python threads, each with a one-thread BLAS: numpy releases the GIL in BLAS calls and large ufuncs,
and there is no per-op barrier to spin at when the cores are shared.

Shapes are numpy order here: x (N, T, D) is N sequences of T tokens of width D.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

QUICK_GELU_ALPHA = 1.702


# --- weights ---------------------------------------------------------------------------------------


@dataclass
class Layer:
    ln1_w: np.ndarray
    ln1_b: np.ndarray
    qkv_w: np.ndarray  # (D, 3D): q, k, v side by side, q already scaled by 1/sqrt(head_dim)
    qkv_b: np.ndarray
    out_w: np.ndarray  # (D, D)
    out_b: np.ndarray
    ln2_w: np.ndarray
    ln2_b: np.ndarray
    fc1_w: np.ndarray  # (D, ffn); the file's ffn_down
    fc1_b: np.ndarray
    fc2_w: np.ndarray  # (ffn, D); the file's ffn_up
    fc2_b: np.ndarray


@dataclass
class Tower:
    layers: list[Layer]
    heads: int
    eps: float
    post_ln_w: np.ndarray
    post_ln_b: np.ndarray
    projection: np.ndarray  # (D, projection_dim)

    @property
    def width(self) -> int:
        return self.projection.shape[0]

    def flops_per_token(self) -> int:
        d, ffn = self.width, self.layers[0].fc1_w.shape[1] if self.layers else 0
        return 2 * len(self.layers) * (4 * d * d + 2 * d * ffn)


def _in_out(w: np.ndarray) -> np.ndarray:
    """An (out, in) weight as a C-ordered float32 (in, out): sgemm runs x @ w without a transpose flag,
    which is faster with OpenBLAS here; widening and transposing in one pass keeps loading quick."""
    return w.T.astype(np.float32, order="C")


def _tower(
    get: Callable[[str], np.ndarray], prefix: str, n_layers: int, heads: int, eps: float, projection: str
) -> Tower:
    """get(name) -> the tensor as float32 or float16 in numpy orientation (a matmul weight is (out, in))."""

    def f32(name: str) -> np.ndarray:
        return get(name).astype(np.float32)

    layers = []
    for i in range(n_layers):
        b = f"{prefix}.blk.{i}"
        q = get(f"{b}.attn_q.weight")
        d = q.shape[0]
        scale = np.float32(1.0 / math.sqrt(d // heads))  # folded into q (exact for 64-wide heads)
        qkv_w = _in_out(np.concatenate([q, get(f"{b}.attn_k.weight"), get(f"{b}.attn_v.weight")]))
        qkv_w[:, :d] *= scale
        qkv_b = np.concatenate([f32(f"{b}.attn_q.bias") * scale, f32(f"{b}.attn_k.bias"), f32(f"{b}.attn_v.bias")])
        layers.append(
            Layer(
                ln1_w=f32(f"{b}.ln1.weight"),
                ln1_b=f32(f"{b}.ln1.bias"),
                qkv_w=qkv_w,
                qkv_b=qkv_b,
                out_w=_in_out(get(f"{b}.attn_out.weight")),
                out_b=f32(f"{b}.attn_out.bias"),
                ln2_w=f32(f"{b}.ln2.weight"),
                ln2_b=f32(f"{b}.ln2.bias"),
                fc1_w=_in_out(get(f"{b}.ffn_down.weight")),
                fc1_b=f32(f"{b}.ffn_down.bias"),
                fc2_w=_in_out(get(f"{b}.ffn_up.weight")),
                fc2_b=f32(f"{b}.ffn_up.bias"),
            )
        )
    return Tower(
        layers=layers,
        heads=heads,
        eps=eps,
        post_ln_w=f32(f"{prefix}.post_ln.weight"),
        post_ln_b=f32(f"{prefix}.post_ln.bias"),
        projection=_in_out(get(projection)),
    )


# --- the pieces (row-wise, in place where the input is not needed again) -----------------------------


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    h = x - x.mean(-1, keepdims=True)
    var = np.square(h).mean(-1, keepdims=True)
    var += eps
    h *= 1.0 / np.sqrt(var)
    h *= w
    h += b
    return h


def quick_gelu_(x: np.ndarray) -> None:
    """x * sigmoid(1.702 x), in place."""
    t = np.multiply(x, -QUICK_GELU_ALPHA, dtype=np.float32)
    np.exp(t, out=t)
    t += 1.0
    x /= t


def _erf(x: np.ndarray) -> np.ndarray:
    """erf within 1.5e-7 (Abramowitz & Stegun 7.1.26): numpy has no erf and scipy is no dependency."""
    a = np.abs(x)
    t = 1.0 + 0.3275911 * a
    np.reciprocal(t, out=t)
    poly = t * 1.061405429
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += c
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a
    np.subtract(1.0, poly, out=poly)
    return np.copysign(poly, x, out=poly)


def gelu_erf_(x: np.ndarray) -> None:
    """0.5 x (1 + erf(x / sqrt 2)), in place."""
    e = _erf(x * np.float32(1.0 / math.sqrt(2.0)))
    e += 1.0
    e *= 0.5
    x *= e


def softmax_(s: np.ndarray) -> None:
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)


def block(
    x: np.ndarray, p: Layer, heads: int, eps: float, act: Callable[[np.ndarray], None], mask: np.ndarray | None
) -> None:
    """A pre-LN transformer block on x (N, T, D), in place; mask (T, T) added to the scores, or None."""
    n, t, d = x.shape
    hd = d // heads
    qkv = np.matmul(layer_norm(x, p.ln1_w, p.ln1_b, eps), p.qkv_w)  # (N, T, 3D), one sgemm per sequence
    qkv += p.qkv_b
    qkv = qkv.reshape(n, t, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # (3, N, H, T, hd), a view
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = np.matmul(q, k.transpose(0, 1, 3, 2))  # (N, H, T, T); q carries the 1/sqrt(hd)
    if mask is not None:
        scores += mask
    softmax_(scores)
    y = np.matmul(scores, v).transpose(0, 2, 1, 3).reshape(n, t, d)  # heads side by side again
    o = np.matmul(y, p.out_w)
    o += p.out_b
    x += o

    h = np.matmul(layer_norm(x, p.ln2_w, p.ln2_b, eps), p.fc1_w)
    h += p.fc1_b
    act(h)
    o = np.matmul(h, p.fc2_w)
    o += p.fc2_b
    x += o


def project(pooled: np.ndarray, tower: Tower) -> np.ndarray:
    """(N, D) pooled states -> (N, projection_dim): layer norm, then one gemv per row (see the module doc)."""
    h = layer_norm(pooled, tower.post_ln_w, tower.post_ln_b, tower.eps)
    return np.matmul(h[:, None, :], tower.projection)[:, 0]


# --- BLAS threads ---------------------------------------------------------------------------------


class _BlasThreads:
    """numpy's OpenBLAS thread count through its own exported setter (numpy offers no API for it and
    OPENBLAS_NUM_THREADS is read only when the library loads). Does nothing for another BLAS."""

    _SETTERS = (
        "scipy_openblas_set_num_threads64_",
        "scipy_openblas_set_num_threads",
        "openblas_set_num_threads64_",
        "openblas_set_num_threads",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users, self.before = 0, 1
        self.lib, self.set, self.get, self.corename = None, None, None, None
        for path in self._candidates():
            try:
                lib = ctypes.CDLL(path)  # already loaded by numpy: the same copy
            except OSError:
                continue
            for name in self._SETTERS:
                if hasattr(lib, name):
                    self.lib, self.set = lib, getattr(lib, name)
                    self.set.argtypes, self.set.restype = [ctypes.c_int], None
                    getter = name.replace("set_", "get_")
                    self.get = getattr(lib, getter) if hasattr(lib, getter) else None
                    if self.get is not None:
                        self.get.argtypes, self.get.restype = [], ctypes.c_int
                    core = name.replace("set_num_threads", "get_corename")
                    self.corename = getattr(lib, core) if hasattr(lib, core) else None
                    if self.corename is not None:
                        self.corename.argtypes, self.corename.restype = [], ctypes.c_char_p
                    return

    @staticmethod
    def _candidates() -> list[str]:
        """numpy's OpenBLAS: bundled in the wheel, else whichever copy this process has mapped."""
        here = os.path.dirname(np.__file__)
        found = (
            glob.glob(os.path.join(here, "..", "numpy.libs", "*openblas*"))  # Linux and Windows wheels
            + glob.glob(os.path.join(here, ".dylibs", "*openblas*"))
        )  # macOS wheels
        try:
            with open("/proc/self/maps") as f:  # a distribution's numpy links the system library
                found += sorted({line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1]})
        except OSError:
            pass
        return found

    @property
    def controllable(self) -> bool:
        return self.set is not None and self.get is not None

    def describe(self) -> str:
        if self.corename is None:
            return "numpy's BLAS"
        return f"OpenBLAS ({self.corename().decode(errors='replace')} kernels)"

    @contextlib.contextmanager
    def one_thread(self) -> Iterator[None]:
        """A one-thread BLAS while any caller (in any thread) is inside; the count from before is
        restored when the last one leaves."""
        if not self.controllable:
            yield
            return
        with self.lock:
            if self.users == 0:
                self.before = self.get()
                self.set(1)
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    self.set(self.before)


_blas: _BlasThreads | None = None


def blas_threads() -> _BlasThreads:
    global _blas
    if _blas is None:
        _blas = _BlasThreads()
    return _blas


# --- the model -------------------------------------------------------------------------------------


@dataclass
class NumpyClip:
    """CLIP's towers as float32 numpy arrays. Build with `NumpyClip.from_tensors`."""

    vision: Tower
    text: Tower
    patch_size: int
    image_size: int
    patch_w: np.ndarray  # (3 P P, D) in the conv weight's (channel, y, x) order
    class_embd: np.ndarray  # (D,)
    vision_pos: np.ndarray  # (1 + patches, D)
    pre_ln_w: np.ndarray
    pre_ln_b: np.ndarray
    token_embd: np.ndarray  # (vocab, D), float32 or float16
    text_pos: np.ndarray  # (context_length, D)
    use_gelu: bool
    n_threads: int = 1  # of the current call (at most max_threads)
    max_threads: int = 1
    min_parallel_flops: float = 50e6  # below this a batch runs on the calling thread
    _pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_tensors(cls, get: Callable[[str], np.ndarray], cfg, n_threads: int) -> NumpyClip:
        """get(name) -> a tensor's exact values as float32 or float16 in numpy orientation (the file's
        F16 stays F16 until widened here); cfg: the ClipConfig."""
        d, p = cfg.vision_width, cfg.patch_size
        token_embd = get("t.token_embd.weight")  # rows are widened when gathered: F16 keeps half the memory
        token_embd = token_embd.astype(np.float16 if token_embd.dtype == np.float16 else np.float32)  # a copy
        return cls(
            vision=_tower(get, "v", cfg.vision_layers, cfg.vision_heads, cfg.vision_eps, "visual_projection.weight"),
            text=_tower(get, "t", cfg.text_layers, cfg.text_heads, cfg.text_eps, "text_projection.weight"),
            patch_size=p,
            image_size=cfg.image_size,
            patch_w=_in_out(get("v.patch_embd.weight").reshape(d, 3 * p * p)),
            class_embd=get("v.class_embd").astype(np.float32).reshape(d),
            vision_pos=get("v.position_embd.weight").astype(np.float32),
            pre_ln_w=get("v.pre_ln.weight").astype(np.float32),
            pre_ln_b=get("v.pre_ln.bias").astype(np.float32),
            token_embd=token_embd,
            text_pos=get("t.position_embd.weight").astype(np.float32),
            use_gelu=cfg.use_gelu,
            n_threads=max(1, int(n_threads)),
            max_threads=max(1, int(n_threads)),
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in _arrays(self))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _act(self) -> Callable[[np.ndarray], None]:
        return gelu_erf_ if self.use_gelu else quick_gelu_

    def _map(self, fn: Callable[[np.ndarray], np.ndarray], parts: list[np.ndarray], flops: float) -> list[np.ndarray]:
        """fn over the parts, on n_threads threads when the work is worth it; BLAS on one thread."""
        blas = blas_threads()
        with blas.one_thread():
            if self.n_threads == 1 or len(parts) == 1 or flops < self.min_parallel_flops or not blas.controllable:
                return [fn(part) for part in parts]
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_threads, thread_name_prefix="vlm-clip")
            return list(self._pool.map(fn, parts))

    def _shares(self, n: int) -> list[slice]:
        """n sequences in n_threads contiguous shares (fewer for small n)."""
        k = max(1, min(self.n_threads, self.max_threads, n))
        bounds = [round(i * n / k) for i in range(k + 1)]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

    # --- vision
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 pixels -> (N, projection_dim)."""
        t = (self.image_size // self.patch_size) ** 2 + 1
        parts = [pixels[s] for s in self._shares(len(pixels))]
        flops = len(pixels) * t * self.vision.flops_per_token()
        return np.concatenate(self._map(self._vision, parts, flops))

    def _vision(self, pixels: np.ndarray) -> np.ndarray:
        n, p, grid = len(pixels), self.patch_size, self.image_size // self.patch_size
        tw = self.vision
        # the stride-P convolution is a reshape plus a matmul (per image, as every matmul here)
        patches = np.ascontiguousarray(
            pixels.reshape(n, 3, grid, p, grid, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, 3 * p * p)
        )
        x = np.empty((n, grid * grid + 1, tw.width), np.float32)
        x[:, 0] = self.class_embd
        np.matmul(patches, self.patch_w, out=x[:, 1:])
        x += self.vision_pos
        x = layer_norm(x, self.pre_ln_w, self.pre_ln_b, tw.eps)
        act = self._act()
        for layer in tw.layers:
            block(x, layer, tw.heads, tw.eps, act, None)
        return project(x[:, 0], tw)

    # --- text
    def encode_texts(self, tokens: np.ndarray) -> np.ndarray:
        """(N, T) int32 ids, each row's end-of-text token (its highest id) inside -> (N, projection_dim).
        A text runs at its own length (up to its EOT): attention is causal, so later positions cannot
        change its pooled state, and texts of one length run together."""
        n_tokens = tokens.argmax(axis=1) + 1
        out = np.zeros((len(tokens), self.text.projection.shape[1]), np.float32)
        jobs = []
        for t in np.unique(n_tokens):
            rows = np.flatnonzero(n_tokens == t)
            jobs += [rows[s] for s in self._shares(len(rows))]
        flops = int(n_tokens.sum()) * self.text.flops_per_token()
        results = self._map(lambda rows: self._text(tokens[rows, : n_tokens[rows[0]]]), jobs, flops)
        for rows, res in zip(jobs, results):
            out[rows] = res
        return out

    def _text(self, ids: np.ndarray) -> np.ndarray:
        """(N, T) ids with every EOT at position T - 1."""
        n, t = ids.shape
        tw = self.text
        x = self.token_embd[ids].astype(np.float32)
        x += self.text_pos[:t]
        causal = np.triu(np.full((t, t), -np.inf, np.float32), k=1)  # row = query, column = key
        act = self._act()
        for layer in tw.layers:
            block(x, layer, tw.heads, tw.eps, act, causal)
        return project(x[:, t - 1], tw)


def _arrays(m: NumpyClip) -> Iterator[np.ndarray]:
    for tower in (m.vision, m.text):
        for layer in tower.layers:
            yield from vars(layer).values()
        yield from (tower.post_ln_w, tower.post_ln_b, tower.projection)
    yield from (m.patch_w, m.class_embd, m.vision_pos, m.pre_ln_w, m.pre_ln_b, m.token_embd, m.text_pos)
