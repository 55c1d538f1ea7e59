"""SmolVLM2 on llama.cpp: the language model and its vision projector through llama-cpp-python.

The engine owns every llama.cpp and mtmd object. mtmd preprocesses the image (resize, tiling) and
expands it into the model's image tokens; the engine walks mtmd's chunks itself so that it can
time image encoding separately from prefill, keep an encoded image in the KV cache for several
questions, and offer lower detail levels (see `detail.py`).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

from vlmcli.defaults import DEFAULT_N_CTX
from vlmcli.engines import detail as detail_policy
from vlmcli.engines.cores import CoreShare
from vlmcli.engines.encoding_cache import EncodingCache, image_digest
from vlmcli.engines.llama_native import (
    build_id,
    clear_native_errors,
    extra_buffers_allowed,
    llama,
    mtmd,
    native_error,
    quiet_native_logs,
)
from vlmcli.engines.native import NativeResource
from vlmcli.engines.prompt import IMAGE_TOKEN, MAX_OUTPUT_CHARS, ChatPrompt, TemplateProblem, Turn, render_conversation
from vlmcli.errors import ContextOverflow, ImageError, InvalidOption, ModelError, VlmError
from vlmcli.gguf.reader import GgufInfo
from vlmcli.gguf.validate import require_kind
from vlmcli.text import check_text

# Called with each piece of generated text; returning False stops generation.
TokenCallback = Callable[[str], "bool | None"]
# Best-of streaming: called with (candidate index, piece of its text); False ends that candidate.
CandidateCallback = Callable[[int, str], "bool | None"]
# Called as the vision encoder works through an image: (passes done, passes in all).
EncodeProgress = Callable[[int, int], None]


# Bounds of the engine's settings, checked before anything is allocated (InvalidOption names the setting).
MAX_THREADS = 512  # GGML_MAX_N_THREADS
MAX_BATCH = 8192  # llama.cpp reserves compute buffers (logits included) for a whole batch
MAX_TILES = 1024  # far beyond any model's tiling; keeps mtmd's int32 token cap from overflowing
UINT32_MAX = 2**32 - 1  # llama_context_params.n_ctx is a uint32_t
MAX_SEQUENCES = 256  # LLAMA_MAX_SEQ


@dataclass
class EngineOptions:
    n_threads: int | None = None  # default: this process's share of its CPUs, decided per image (cores.py)
    n_gpu_layers: int = 0  # -1 = all layers on the GPU (when the build has one)
    n_ctx: int = DEFAULT_N_CTX  # tokens; 0 = the context the model was trained for
    n_batch: int = 512
    detail: str = "auto"  # low | high | auto
    max_tiles: int | None = None  # exact cap on tiles; overrides `detail`
    native_logs: bool = False  # let llama.cpp print its own logs
    n_seq_max: int = 1  # sequences decoded together (best-of candidates share the prompt's KV cells)
    cache: EncodingCache | None = None  # image encodings on disk (encoding_cache.py); None: encode every time

    def validate(self) -> None:
        """Ranges that need no model file (see VlmEngine for the context against the model's)."""
        _need_int("n_ctx", self.n_ctx, 0, UINT32_MAX, "a context size in tokens (0 = the model's trained context)")
        if self.n_threads is not None:
            _need_int("n_threads", self.n_threads, 1, MAX_THREADS, "a thread count")
        _need_int("n_gpu_layers", self.n_gpu_layers, -1, 2**31 - 1, "a layer count (-1 = all)")
        _need_int("n_batch", self.n_batch, 1, MAX_BATCH, "a batch size in tokens")
        _need_int("n_seq_max", self.n_seq_max, 1, MAX_SEQUENCES, "a sequence count")
        if self.max_tiles is not None:
            _need_int("max_tiles", self.max_tiles, 0, MAX_TILES, "a tile count (0 = the overview only)")
        detail_policy.validate(self.detail, self.max_tiles)


def _need_int(option: str, value: object, lo: int, hi: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOption(option, f"{value!r} is not {what}")
    if not lo <= value <= hi:
        raise InvalidOption(option, f"{value} is out of range: {what} from {lo} to {hi}")


@dataclass
class GenerationOptions:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    n: int = 1  # candidates: n sequences from one prompt evaluation, decoded in one batch per step

    def validate(self) -> None:
        _need_int("max_tokens", self.max_tokens, 0, UINT32_MAX, "a token count")
        _need_int("seed", self.seed, -(2**63), 2**64 - 1, "a seed")
        for option, value, ok, what in (
            ("temperature", self.temperature, lambda v: v >= 0, "0 (greedy) or more"),
            ("top_p", self.top_p, lambda v: 0 < v <= 1, "more than 0 and at most 1"),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not ok(value)
            ):
                raise InvalidOption(option, f"{value!r} is out of range: it must be {what}")


@dataclass
class Timings:
    load_ms: float = 0.0
    image_encode_ms: float = 0.0
    prefill_ms: float = 0.0
    prefill_tokens: int = 0
    decode_ms: float = 0.0
    decode_tokens: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / (self.prefill_ms / 1000) if self.prefill_ms > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "load_ms": round(self.load_ms, 2),
            "image_encode_ms": round(self.image_encode_ms, 2),
            "prefill_ms": round(self.prefill_ms, 2),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_ms": round(self.decode_ms, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
        }


@dataclass
class ImageEncoding:
    """How an image went into the model."""

    width: int
    height: int
    detail: str  # the level used: low | high | tiles
    tiles: int  # slices the encoder saw besides the overview (0 for low)
    image_tokens: int
    encoder_passes: int  # passes run now: 0 when the image came from the encoding cache
    cached: str | None = None  # "kv": the whole prefix from the cache, "embd": the encoder's output from it


@dataclass
class Candidate:
    """One of n sampled continuations, with the model's log-probability of each of its tokens."""

    text: str
    tokens: list[int]
    logprobs: list[float]  # natural log, under the model's own distribution (temperature 1)
    stop_reason: str  # eos | length

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


@dataclass
class Generation:
    prompt: str
    text: str
    prompt_tokens: int
    generated_tokens: int
    stop_reason: str  # eos | length | stopped
    image: ImageEncoding
    timings: Timings = field(default_factory=Timings)
    candidates: list[Candidate] = field(default_factory=list)  # options.n > 1: all of them (text = the first's)


@dataclass
class _Chunk:
    """One piece of mtmd's tokenized prompt: text token ids, or an image of n_tokens."""

    kind: str  # text | image
    tokens: list[int]
    ptr: object = None  # the mtmd chunk, for images
    n_tokens: int = 0


class VlmEngine(NativeResource):
    """A loaded SmolVLM2: language model + vision projector. Not thread-safe; one call at a time."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        mmproj_path: str | os.PathLike[str],
        options: EngineOptions | None = None,
    ):
        self.options = options or EngineOptions()
        self.model_path = Path(model_path)
        self.mmproj_path = Path(mmproj_path)
        # Check both files before llama.cpp sees them: it aborts the process on some bad files.
        self.options.validate()
        self.model_info: GgufInfo = require_kind(self.model_path, "llm")
        self.mmproj_info: GgufInfo = require_kind(self.mmproj_path, "mmproj")
        self._check_pair()
        self.n_ctx_requested = self._check_context()  # before llama.cpp allocates the KV cache
        self.vision = detail_policy.VisionGeometry.from_mmproj(self.mmproj_info.metadata, self.mmproj_path)
        self.cores = CoreShare(self.options.n_threads)
        self.n_threads = self.cores.most  # the threads of the current unit of work (see _sharing_cores)
        self._model = None
        self._ctx = None
        # (image_max_tokens (-1 = model default), threads) -> mtmd context: both are fixed per context in mtmd
        self._mtmd: dict[tuple[int, int], object] = {}
        self._batch: llama.llama_batch | None = None
        t0 = time.perf_counter()
        if not self.options.native_logs:
            quiet_native_logs()
        self._load()
        self.load_ms = (time.perf_counter() - t0) * 1000

    # -- loading -------------------------------------------------------------------------------

    def _check_pair(self) -> None:
        """The projector must feed embeddings as wide as the model's (mtmd only says "failed")."""
        width = self.model_info.metadata.get(f"{self.model_info.arch}.embedding_length")
        proj = self.mmproj_info.metadata.get("clip.vision.projection_dim")
        if width and proj and width != proj:
            raise ModelError(
                f"this projector makes {proj}-wide embeddings but {self.model_path.name} takes {width}: "
                "they are not a pair (use the mmproj released with the model)",
                self.mmproj_path,
            )

    def _check_context(self) -> int:
        """The context to create: the requested one, refused above the model's trained context or
        when its KV cache alone would not fit in this machine's memory (llama.cpp would allocate it)."""
        meta, arch = self.model_info.metadata, self.model_info.arch
        trained = int(meta[f"{arch}.context_length"])  # present and in range: gguf_rules
        n_ctx = self.options.n_ctx or trained
        error = None
        if n_ctx > trained:
            error = InvalidOption(
                "n_ctx", f"a context of {n_ctx} tokens is more than the {trained} this model was trained for"
            )
        else:
            need = n_ctx * _kv_bytes_per_token(meta, arch)
            have = _physical_memory()
            if have and need > have:
                error = InvalidOption(
                    "n_ctx",
                    f"a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB for its KV cache, more than this "
                    f"machine's {have / 2**30:.1f} GiB of memory",
                )
        if error is not None:
            error.path = os.fspath(self.model_path)  # the limit is this model's
            raise error
        return n_ctx

    def _load(self) -> None:
        mparams = llama.llama_model_default_params()
        mparams.n_gpu_layers = self.options.n_gpu_layers if self.options.n_gpu_layers >= 0 else 999
        mparams.use_extra_bufts = extra_buffers_allowed()
        clear_native_errors()
        model = llama.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not model:
            raise ModelError(_with_native_reason("llama.cpp could not load this model file"), self.model_path)
        self._model = model
        self._vocab = llama.llama_model_get_vocab(model)
        self.n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_requested
        cparams.n_batch = self.options.n_batch
        cparams.n_ubatch = self.options.n_batch
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.n_seq_max = self.options.n_seq_max
        cparams.kv_unified = True  # candidates share the prompt's cells: one cache, not n_ctx / n_seq_max each
        clear_native_errors()
        ctx = llama.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelError(
                _with_native_reason(f"llama.cpp could not create a context of {self.n_ctx_requested} tokens"),
                self.model_path,
            )
        self._ctx = ctx
        self.n_ctx = llama.llama_n_ctx(ctx)
        self._batch = llama.llama_batch_init(self.options.n_batch, 0, 1)
        self.chat_template = _model_meta(model, "tokenizer.chat_template")
        # Rendered once, used for every image; a template that cannot render is a fault of the file.
        try:
            self.chat = ChatPrompt.from_template(self.chat_template)
        except TemplateProblem as e:
            raise ModelError(f"tokenizer.chat_template cannot be used: {e}", self.model_path) from None
        self.eos_ids = self._special_ids()
        # Open the projector now, so a bad mmproj fails at load, not at the first image; with the
        # token cap this engine's detail setting uses most (each cap costs a copy of its weights).
        self._mtmd_context(self._token_cap(self._usual_max_tiles()))

    def _usual_max_tiles(self) -> int | None:
        """The tile cap most images get under the configured detail (None = the model's full tiling)."""
        o = self.options
        if o.max_tiles is not None:
            return max(1, o.max_tiles)
        if o.detail == "low":
            return 1
        if o.detail == "high" or self.uses_gpu:
            return None
        return detail_policy.AUTO_CPU_MAX_TILES

    def _token_cap(self, max_tiles: int | None) -> int:
        return -1 if max_tiles is None else max_tiles * self.vision.tokens_per_tile

    def _mtmd_context(self, image_max_tokens: int) -> object:
        """mtmd contexts are created per token cap and thread count: both are context parameters in
        mtmd. Two thread counts are kept per cap (alone and shared), each a copy of the projector."""
        key = (image_max_tokens, self.n_threads)
        if key in self._mtmd:
            return self._mtmd[key]
        same_cap = [k for k in self._mtmd if k[0] == image_max_tokens]
        if len(same_cap) >= 2:
            mtmd.mtmd_free(self._mtmd.pop(same_cap[0]))
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = self.options.n_gpu_layers != 0
        params.n_threads = self.n_threads
        params.print_timings = False
        params.warmup = False
        params.image_max_tokens = image_max_tokens
        clear_native_errors()
        ctx = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self._model, params)
        if not ctx:
            raise ModelError(
                _with_native_reason("llama.cpp could not load this vision projector (does it match the model?)"),
                self.mmproj_path,
            )
        if not mtmd.mtmd_support_vision(ctx):
            mtmd.mtmd_free(ctx)
            raise ModelError("this projector has no vision encoder", self.mmproj_path)
        self._mtmd[key] = ctx
        return ctx

    @contextlib.contextmanager
    def _sharing_cores(self) -> Iterator[None]:
        """One unit of work (an image and its questions) on this process's share of the cores."""
        with self.cores.running() as n:
            if n != self.n_threads:
                llama.llama_set_n_threads(self._ctx, n, n)
                self.n_threads = n
            yield

    def _special_ids(self) -> set[int]:
        # llama.cpp's end-of-generation set comes from the GGUF; <end_of_utterance> is SmolVLM2's
        # turn end, so stop there even if a converted file forgot to mark it.
        end = self._token_id("<end_of_utterance>")
        return {end} if end is not None else set()

    def _token_id(self, text: str) -> int | None:
        toks = self.tokenize(text, special=True)
        return toks[0] if len(toks) == 1 else None

    @property
    def uses_gpu(self) -> bool:
        return self.options.n_gpu_layers != 0 and bool(llama.llama_supports_gpu_offload())

    def close(self) -> None:
        for ctx in self._mtmd.values():
            mtmd.mtmd_free(ctx)
        self._mtmd.clear()
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None

    # -- tokens --------------------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        check_text(text)
        data = text.encode("utf-8")
        buf = (llama.llama_token * (len(data) + 8))()
        n = llama.llama_tokenize(self._vocab, data, len(data), buf, len(buf), False, special)
        if n < 0:
            raise VlmError(f"prompt could not be tokenized ({-n} tokens)")
        toks = list(buf[:n])
        self._check_ids(toks)
        return toks

    def _check_ids(self, toks: list[int]) -> None:
        # An id outside the vocabulary (llama.cpp gives -1 for text it cannot encode) aborts the
        # process inside llama.cpp: refuse it here instead.
        bad = [t for t in toks if t < 0 or t >= self.n_vocab]
        if bad:
            raise ModelError(f"the model's vocabulary cannot encode this prompt (token id {bad[0]})", self.model_path)

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _token_batch(self) -> llama.llama_batch:
        """The batch of tokens each decode call fills (allocated with the context, freed by close)."""
        assert self._batch is not None, "the engine is closed"
        return self._batch

    # -- prompt evaluation ---------------------------------------------------------------------

    def _decode_tokens(self, tokens: list[int], n_past: int, logits_last: bool) -> int:
        b = self._token_batch()
        pos = _positions(b)
        step = self.options.n_batch
        for start in range(0, len(tokens), step):
            part = tokens[start : start + step]
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i] = tok
                pos[i] = n_past + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = False
            if logits_last and start + len(part) == len(tokens):
                b.logits[len(part) - 1] = True
            rc = llama.llama_decode(self._ctx, b)
            if rc != 0:
                raise VlmError(
                    f"llama.cpp failed to decode the prompt (code {rc}; the context holds {self.n_ctx} tokens)"
                )
        return n_past + len(tokens)

    def _tokenize_with_image(self, rgb: np.ndarray, prompt_text: str, max_tokens: int) -> tuple[object, list[_Chunk]]:
        ctx = self._mtmd_context(max_tokens)
        h, w = rgb.shape[:2]
        detail_policy.check_image_shape(w, h, self.vision, max_tokens)
        bitmap = mtmd.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks_ptr = mtmd.mtmd_input_chunks_init()
        data = prompt_text.encode("utf-8")
        text = mtmd.mtmd_input_text(text=data, text_len=len(data), add_special=False, parse_special=True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        clear_native_errors()
        rc = mtmd.mtmd_tokenize(ctx, chunks_ptr, ctypes.byref(text), bitmaps, 1)
        mtmd.mtmd_bitmap_free(bitmap)
        if rc != 0:
            mtmd.mtmd_input_chunks_free(chunks_ptr)
            if rc == 2:  # mtmd: preprocessing the image failed
                raise ImageError(_with_native_reason(f"mtmd could not preprocess this {w}x{h} image"))
            raise VlmError(_with_native_reason(f"mtmd could not tokenize the image prompt (code {rc})"))
        chunks: list[_Chunk] = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks_ptr)):
            c = mtmd.mtmd_input_chunks_get(chunks_ptr, i)
            kind = mtmd.mtmd_input_chunk_get_type(c)
            if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                arr = mtmd.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                toks = [arr[j] for j in range(n.value)]
                self._check_ids(toks)
                chunks.append(_Chunk("text", toks))
            elif kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                chunks.append(_Chunk("image", [], c, mtmd.mtmd_input_chunk_get_n_tokens(c)))
            else:
                raise VlmError("unexpected non-image media chunk")
        return chunks_ptr, chunks

    def _eval_image_prefix(
        self, image: Image.Image, prefix_text: str, timings: Timings, on_progress: EncodeProgress | None = None
    ) -> tuple[int, ImageEncoding]:
        """Evaluate the prompt up to (and including) the image; returns n_past and how the image went in."""
        level, max_tiles = detail_policy.choose(
            image.width, image.height, self.vision, self.options.detail, self.options.max_tiles, self.uses_gpu
        )
        cap = self._token_cap(max_tiles)
        if level == "low" and cap not in {c for c, _ in self._mtmd}:
            # Only the overview is used, and every context makes the same one: reuse an open context's cap.
            cap = next(iter(self._mtmd))[0]
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        keys = self._cache_keys(rgb, level, cap, prefix_text)
        restored = self._restore_prefix(keys["kv"]) if keys else None
        if restored is not None:
            return restored
        marker = mtmd.mtmd_default_marker().decode()
        chunks_ptr, chunks = self._tokenize_with_image(rgb, prefix_text + marker, cap)
        try:
            images = [c for c in chunks if c.kind == "image"]
            if level == "low":
                # The overview only, laid out as the model's unsplit image (as transformers writes
                # an image that is not split): <fake><global-img> 64 x <image> <fake>.
                overview = images[-1]
                before = prefix_text
                seq: list[_Chunk] = [
                    _Chunk("text", self.tokenize(before + "<fake_token_around_image><global-img>")),
                    overview,
                    _Chunk("text", self.tokenize("<fake_token_around_image>")),
                ]
                tiles = 0
            else:
                seq = chunks
                tiles = len(images) - 1
            used = [c for c in seq if c.kind == "image"]
            n_image_tokens = sum(c.n_tokens for c in used)
            n_total = sum(len(c.tokens) if c.kind == "text" else c.n_tokens for c in seq)
            if n_total + 8 > self.n_ctx:
                raise ContextOverflow(n_total, self.n_ctx, n_image_tokens)
            n_past = 0
            done = passes = 0
            if on_progress is not None:
                on_progress(0, len(used))
            for c in seq:
                if c.kind == "text":
                    t0 = time.perf_counter()
                    n_past = self._decode_tokens(c.tokens, n_past, logits_last=False)
                    timings.prefill_ms += (time.perf_counter() - t0) * 1000
                    timings.prefill_tokens += len(c.tokens)
                else:
                    key = {**keys["embd"], "chunk": done} if keys else None
                    n_past, encoded = self._eval_image_chunk(c, n_past, timings, cap, key)
                    passes += encoded
                    done += 1
                    if on_progress is not None:
                        on_progress(done, len(used))
            enc = ImageEncoding(
                width=image.width,
                height=image.height,
                detail=level,
                tiles=tiles,
                image_tokens=n_image_tokens,
                encoder_passes=passes,
                cached="embd" if passes < len(used) else None,
            )
            if keys:
                self._save_prefix(keys["kv"], n_past, enc)
            return n_past, enc
        finally:
            mtmd.mtmd_input_chunks_free(chunks_ptr)

    def _eval_image_chunk(
        self, chunk: _Chunk, n_past: int, timings: Timings, cap: int, key: dict[str, Any] | None
    ) -> tuple[int, int]:
        """Encode one image chunk (or take its embeddings from the cache) and decode it into the
        KV cache. Returns (n_past, encoder passes run: 0 or 1)."""
        ctx = self._mtmd_context(cap)
        t0 = time.perf_counter()
        width = int(self.model_info.metadata.get(f"{self.model_info.arch}.embedding_length") or 0)
        size = chunk.n_tokens * width * 4
        hit = self.options.cache.get(key) if key is not None and self.options.cache is not None else None
        if hit is not None and len(hit.payload) == size:
            cached = (ctypes.c_float * (size // 4)).from_buffer_copy(hit.payload)
            embd = ctypes.cast(cached, ctypes.POINTER(ctypes.c_float))
            passes = 0
        else:
            rc = mtmd.mtmd_encode_chunk(ctx, chunk.ptr)
            if rc != 0:
                raise VlmError(f"the vision encoder failed (code {rc})")
            embd = mtmd.mtmd_get_output_embd(ctx)
            passes = 1
            if key is not None and self.options.cache is not None and size:
                self.options.cache.put(key, {"tokens": chunk.n_tokens, "width": width}, ctypes.string_at(embd, size))
        t1 = time.perf_counter()
        new_n_past = llama.llama_pos(n_past)
        rc = mtmd.mtmd_helper_decode_image_chunk(
            ctx,
            self._ctx,
            chunk.ptr,
            embd,
            n_past,
            0,
            self.options.n_batch,
            ctypes.byref(new_n_past),
            _NO_CALLBACK,
            None,
        )
        if rc != 0:
            raise VlmError(f"llama.cpp failed to decode the image tokens (code {rc})")
        t2 = time.perf_counter()
        timings.image_encode_ms += (t1 - t0) * 1000
        timings.prefill_ms += (t2 - t1) * 1000
        timings.prefill_tokens += chunk.n_tokens
        return int(new_n_past.value), passes

    # -- the encoding cache ----------------------------------------------------------------------

    def _cache_keys(self, rgb: np.ndarray, level: str, cap: int, prefix_text: str) -> dict[str, dict[str, Any]] | None:
        """The cache keys of this image's prefix: "embd" (a chunk's key without its index) and "kv"."""
        cache = self.options.cache
        if cache is None:
            return None
        try:
            mmproj = cache.file_sha256(self.mmproj_path)
            model = cache.file_sha256(self.model_path)
        except OSError:
            return None
        h, w = rgb.shape[:2]
        # rgb.data: hashed in place (tobytes() would copy 36 MB for a 12 MP photo on every question)
        embd = {
            "v": 1,
            "kind": "embd",
            "image": image_digest(rgb.data, w, h),
            "mmproj": mmproj,
            "level": level,
            "cap": 0 if level == "low" else cap,
        }
        kv = {
            **embd,
            "kind": "kv",
            "model": model,
            "prefix": prefix_text,
            "llama_cpp": _LLAMA_CPP_VERSION,
            "gpu": self.uses_gpu,
        }
        return {"embd": embd, "kv": kv}

    def _restore_prefix(self, key: dict[str, Any]) -> tuple[int, ImageEncoding] | None:
        """The prompt prefix's KV cells from the cache into sequence 0, or None (then it is evaluated)."""
        assert self.options.cache is not None
        hit = self.options.cache.get(key)
        if hit is None:
            return None
        try:
            enc = ImageEncoding(**{**hit.meta["image"], "encoder_passes": 0, "cached": "kv"})
            n_past = int(hit.meta["n_past"])
        except (KeyError, TypeError, ValueError):
            return None
        if not 0 < n_past < self.n_ctx:
            return None
        buf = (ctypes.c_uint8 * len(hit.payload)).from_buffer_copy(hit.payload)
        if llama.llama_state_seq_set_data(self._ctx, buf, len(hit.payload), 0) != len(hit.payload):
            # llama.cpp refused it (another layout): start clean and evaluate the prefix
            llama.llama_memory_clear(llama.llama_get_memory(self._ctx), True)
            return None
        return n_past, enc

    def _save_prefix(self, key: dict[str, Any], n_past: int, enc: ImageEncoding) -> None:
        assert self.options.cache is not None
        size = llama.llama_state_seq_get_size(self._ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = llama.llama_state_seq_get_data(self._ctx, buf, size, 0)
        if written:
            image = {k: v for k, v in dataclasses.asdict(enc).items() if k not in ("encoder_passes", "cached")}
            self.options.cache.put(key, {"n_past": n_past, "image": image}, bytes(buf)[:written])

    # -- generation ----------------------------------------------------------------------------

    def ask(
        self,
        image: Image.Image,
        prompts: list[str],
        options: GenerationOptions | None = None,
        on_token: TokenCallback | None = None,
        on_progress: EncodeProgress | None = None,
        on_candidate_token: CandidateCallback | None = None,
    ) -> Iterator[Generation]:
        """Answer each prompt about one image. The image is encoded once; its KV cache is reused."""
        chat = self.chat
        suffixes = [(chat.after_image(p), chat.full(p)) for p in prompts]
        return self._answers(image, chat.before_image, suffixes, options, on_token, on_progress, on_candidate_token)

    def chat_turns(
        self,
        image: Image.Image,
        turns: list[Turn],
        options: GenerationOptions | None = None,
        on_token: TokenCallback | None = None,
        on_progress: EncodeProgress | None = None,
        on_candidate_token: CandidateCallback | None = None,
    ) -> Iterator[Generation]:
        """The next assistant turn of a conversation (system, user, assistant turns, one image
        somewhere in them), rendered whole by the model's chat template. One user turn with the
        image first is the same prompt, token for token, as `ask` with its text."""
        chars = sum(len(p) for t in turns for p in t.parts)
        pieces = len(turns) + sum(len(t.parts) for t in turns)
        if chars > MAX_OUTPUT_CHARS // 2 or pieces > self.n_ctx:
            # Past the template render's bounds (prompt.py), and far past any context: the input's fault,
            # not the template's.
            raise InvalidOption(
                "messages",
                f"{len(turns)} messages, {pieces - len(turns)} parts, {chars:,} characters of text: "
                f"far more than a context of {self.n_ctx} tokens holds",
            )
        try:
            before, after = render_conversation(self.chat_template, list(turns))
        except ValueError as e:
            raise InvalidOption("messages", str(e)) from None
        except TemplateProblem as e:
            raise ModelError(f"tokenizer.chat_template cannot render this conversation: {e}", self.model_path) from None
        return self._answers(
            image, before, [(after, before + IMAGE_TOKEN + after)], options, on_token, on_progress, on_candidate_token
        )

    def _answers(
        self,
        image: Image.Image,
        before_image: str,
        suffixes: list[tuple[str, str]],  # (the text after the image, the whole prompt for the record)
        options: GenerationOptions | None,
        on_token: TokenCallback | None,
        on_progress: EncodeProgress | None,
        on_candidate_token: CandidateCallback | None,
    ) -> Iterator[Generation]:
        with self._sharing_cores():
            yield from self._answer_all(
                image, before_image, suffixes, options, on_token, on_progress, on_candidate_token
            )

    def _answer_all(
        self,
        image: Image.Image,
        before_image: str,
        suffixes: list[tuple[str, str]],
        options: GenerationOptions | None,
        on_token: TokenCallback | None,
        on_progress: EncodeProgress | None,
        on_candidate_token: CandidateCallback | None,
    ) -> Iterator[Generation]:
        options = options or GenerationOptions()
        options.validate()
        first = Timings(load_ms=self.load_ms)
        memory = llama.llama_get_memory(self._ctx)
        llama.llama_memory_clear(memory, True)
        n_prefix, enc = self._eval_image_prefix(image, before_image, first, on_progress)
        for i, (after_image, prompt) in enumerate(suffixes):
            timings = first if i == 0 else Timings()
            llama.llama_memory_seq_rm(memory, 0, n_prefix, -1)
            suffix = self.tokenize(after_image)
            if n_prefix + len(suffix) + 1 > self.n_ctx:
                raise ContextOverflow(n_prefix + len(suffix), self.n_ctx)
            t0 = time.perf_counter()
            n_past = self._decode_tokens(suffix, n_prefix, logits_last=True)
            timings.prefill_ms += (time.perf_counter() - t0) * 1000
            timings.prefill_tokens += len(suffix)
            if options.n == 1:
                yield self._generate(prompt, n_past, enc, options, timings, on_token)
            else:
                stream = _CandidateStream(self, on_candidate_token) if on_candidate_token else None
                gen = self._generate_candidates(
                    prompt, n_past, enc, options, timings, stream.on_token if stream else None
                )
                if stream:
                    stream.finish()
                yield gen

    def _generate(
        self,
        prompt: str,
        n_past: int,
        enc: ImageEncoding,
        options: GenerationOptions,
        timings: Timings,
        on_token: TokenCallback | None,
    ) -> Generation:
        sampler = _make_sampler(options)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        n_prompt = n_past
        stop = "length"
        generated = 0
        t0 = time.perf_counter()
        try:
            budget = min(options.max_tokens, self.n_ctx - n_past)
            for _ in range(max(0, budget)):
                tok = llama.llama_sampler_sample(sampler, self._ctx, -1)
                if not options.ignore_eos and (tok in self.eos_ids or llama.llama_vocab_is_eog(self._vocab, tok)):
                    stop = "eos"
                    break
                generated += 1
                text = decoder.decode(self._piece(tok))
                if text:
                    pieces.append(text)
                    if on_token is not None and on_token(text) is False:
                        stop = "stopped"
                        break
                if generated >= budget:
                    break
                n_past = self._decode_tokens([tok], n_past, logits_last=True)
        finally:
            llama.llama_sampler_free(sampler)
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            if on_token is not None:
                on_token(tail)
        timings.decode_ms = (time.perf_counter() - t0) * 1000
        timings.decode_tokens = generated
        return Generation(
            prompt=prompt,
            text="".join(pieces),
            prompt_tokens=n_prompt,
            generated_tokens=generated,
            stop_reason=stop,
            image=enc,
            timings=timings,
        )

    def _is_end(self, token: int, options: GenerationOptions) -> bool:
        return not options.ignore_eos and (token in self.eos_ids or llama.llama_vocab_is_eog(self._vocab, token))

    def _logprob(self, row: int, token: int) -> float:
        """log softmax of logits row `row` (-1 = the last) at `token`."""
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,))
        top = float(logits.max())
        return float(logits[token]) - top - math.log(float(np.exp(logits - top).sum()))

    def _generate_candidates(
        self,
        prompt: str,
        n_past: int,
        enc: ImageEncoding,
        options: GenerationOptions,
        timings: Timings,
        on_token: Callable[[int, int], bool | None] | None = None,
    ) -> Generation:
        """options.n continuations of one evaluated prompt. The prompt's KV cells are shared (each
        sequence is a copy of sequence 0, not a re-evaluation); each step decodes the next token of
        every unfinished sequence in one batch. Candidate i samples with seed + i."""
        n = options.n
        if n > self.options.n_seq_max:
            raise InvalidOption(
                "best_of", f"{n} candidates, but the model was opened for at most {self.options.n_seq_max} sequences"
            )
        memory = llama.llama_get_memory(self._ctx)
        for seq in range(1, n):
            llama.llama_memory_seq_cp(memory, 0, seq, -1, -1)
        samplers = [
            _make_sampler(
                GenerationOptions(temperature=options.temperature, top_p=options.top_p, seed=options.seed + i)
            )
            for i in range(n)
        ]
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        stops = ["length"] * n
        row = [-1] * n  # each sequence's logits row in the last batch (-1: the prompt's last token)
        active = list(range(n))
        budget = min(options.max_tokens, (self.n_ctx - n_past) // n)
        b = self._token_batch()
        pos = _positions(b)
        t0 = time.perf_counter()
        try:
            for step in range(max(0, budget)):
                going = []
                for seq in active:
                    tok = llama.llama_sampler_sample(samplers[seq], self._ctx, row[seq])
                    if self._is_end(tok, options):
                        stops[seq] = "eos"
                        continue
                    tokens[seq].append(tok)
                    logprobs[seq].append(self._logprob(row[seq], tok))
                    if (
                        on_token is not None and on_token(seq, tok) is False
                    ):  # streaming: a stop sequence, a client gone
                        stops[seq] = "stopped"
                        continue
                    going.append(seq)
                active = going
                if not active or step + 1 == budget:
                    break
                b.n_tokens = len(active)
                for i, seq in enumerate(active):
                    b.token[i], pos[i], b.n_seq_id[i], b.logits[i] = tokens[seq][-1], n_past + step, 1, True
                    b.seq_id[i][0] = seq
                    row[seq] = i
                rc = llama.llama_decode(self._ctx, b)
                if rc != 0:
                    raise VlmError(f"llama.cpp failed to decode {len(active)} candidates (code {rc})")
        finally:
            for sampler in samplers:
                llama.llama_sampler_free(sampler)
            for seq in range(1, n):
                llama.llama_memory_seq_rm(memory, seq, -1, -1)
        timings.decode_ms = (time.perf_counter() - t0) * 1000
        timings.decode_tokens = sum(len(t) for t in tokens)
        candidates = [Candidate(self.detokenize(t), t, lp, stop) for t, lp, stop in zip(tokens, logprobs, stops)]
        first = candidates[0]
        return Generation(
            prompt, first.text, n_past, timings.decode_tokens, first.stop_reason, enc, timings, candidates
        )

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", errors="replace")

    def score(self, image: Image.Image, prompt: str, tokens: list[int]) -> list[float]:
        """Teacher forcing: the model's log-probability of each of `tokens` as the answer to `prompt`
        about `image` (the prompt evaluated as `ask` does, the answer in one batch)."""
        chat = self.chat
        memory = llama.llama_get_memory(self._ctx)
        llama.llama_memory_clear(memory, True)
        n_prefix, _ = self._eval_image_prefix(image, chat.before_image, Timings())
        n_past = self._decode_tokens(self.tokenize(chat.after_image(prompt)), n_prefix, logits_last=True)
        out = [self._logprob(-1, tokens[0])] if tokens else []
        b = self._token_batch()
        pos = _positions(b)
        for start in range(0, len(tokens) - 1, self.options.n_batch):
            part = tokens[start : min(start + self.options.n_batch, len(tokens) - 1)]
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i], pos[i], b.n_seq_id[i], b.logits[i] = tok, n_past + start + i, 1, True
                b.seq_id[i][0] = 0
            if llama.llama_decode(self._ctx, b) != 0:
                raise VlmError("llama.cpp failed to decode the answer being scored")
            out += [self._logprob(i, tokens[start + i + 1]) for i in range(len(part))]
        return out


class _CandidateStream:
    """Candidates' tokens -> their text pieces as they come (each its own UTF-8 decoder), for streaming n > 1."""

    def __init__(self, engine: VlmEngine, on_text: CandidateCallback):
        self.engine, self.on_text = engine, on_text
        self.decoders: dict[int, codecs.IncrementalDecoder] = {}

    def on_token(self, seq: int, token: int) -> bool | None:
        decoder = self.decoders.setdefault(seq, codecs.getincrementaldecoder("utf-8")(errors="replace"))
        text = decoder.decode(self.engine._piece(token))
        return self.on_text(seq, text) if text else None

    def finish(self) -> None:
        for seq, decoder in sorted(self.decoders.items()):
            if tail := decoder.decode(b"", final=True):
                self.on_text(seq, tail)


_NO_CALLBACK = mtmd.mtmd_helper_post_decode_callback()  # a NULL function pointer
# Part of the KV cache entries' key: llama.cpp's per-sequence state layout may change between builds.
_LLAMA_CPP_VERSION = build_id()


def _positions(batch: llama.llama_batch) -> ctypes.Array[ctypes.c_int32]:
    """The batch's token positions, one llama_pos each (llama-cpp-python annotates them one level too deep)."""
    return cast("ctypes.Array[ctypes.c_int32]", batch.pos)


def _with_native_reason(message: str) -> str:
    """`message`, with the error line llama.cpp / mtmd logged for it, when there is one."""
    reason = native_error()
    return f"{message}: {reason}" if reason else message


def _kv_bytes_per_token(meta: dict, arch: str) -> int:
    """Bytes of F16 KV cache one token of context takes (llama.cpp's default cache type)."""

    def per_layer(key: str, default: list[int]) -> list[int]:
        v = meta.get(f"{arch}.{key}")
        if v is None:
            return default
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * n_layer

    n_layer = int(meta.get(f"{arch}.block_count") or 0)
    n_embd = int(meta.get(f"{arch}.embedding_length") or 0)
    heads = per_layer("attention.head_count", [1] * n_layer)
    kv = per_layer("attention.head_count_kv", heads)
    head_k = int(meta.get(f"{arch}.attention.key_length") or (n_embd // max(1, heads[0] if heads else 1)))
    head_v = int(meta.get(f"{arch}.attention.value_length") or head_k)
    return 2 * sum(h * (head_k + head_v) for h in kv[:n_layer])


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _make_sampler(options: GenerationOptions) -> object:
    params = llama.llama_sampler_chain_default_params()
    chain = llama.llama_sampler_chain_init(params)
    if options.temperature <= 0:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
    else:
        if options.top_p < 1.0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(options.top_p, 1))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(options.temperature))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(options.seed & 0xFFFFFFFF))
    return chain


def _model_meta(model: object, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        llama.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace")
