"""SmolVLM2 on llama.cpp: the language model and its vision projector through llama-cpp-python.

The engine owns every llama.cpp and mtmd object. mtmd preprocesses the image (resize, tiling) and
expands it into the model's image tokens; the engine walks mtmd's chunks itself so that it can
time image encoding separately from prefill, keep an encoded image in the KV cache for several
questions, offer lower detail levels (see `detail.py`), encode the chunks on vlm's kernels
(`siglip_chunks.py`) and decode the prompt in whole batches (`prompt_rows.py`).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from PIL import Image

from vlmcli.defaults import DEFAULT_N_CTX
from vlmcli.engines import detail as detail_policy
from vlmcli.engines import media_plan
from vlmcli.engines.constrained import ConstrainedSampler, Pieces, Sampler, parse_for_closing
from vlmcli.engines.cores import CoreShare
from vlmcli.engines.encoding_cache import EncodingCache, image_digest
from vlmcli.engines.gbnf import Grammar
from vlmcli.engines.json_schema import Constraint
from vlmcli.engines.llama_native import (
    batch_positions,
    build_id,
    clear_native_errors,
    extra_buffers_allowed,
    fill_rows,
    llama,
    mtmd,
    native_error,
    quiet_native_logs,
)
from vlmcli.engines.media import Media, VideoFrames, kind_of
from vlmcli.engines.native import NativeResource
from vlmcli.engines.prompt import (
    MAX_OUTPUT_CHARS,
    MEDIA_TOKENS,
    ChatPrompt,
    TemplateProblem,
    Turn,
    question_layout,
    split_media,
)
from vlmcli.engines.prompt_rows import TOKEN_EMBD, PromptInput
from vlmcli.engines.sampling import RowSampler, SequenceSampler
from vlmcli.engines.siglip_chunks import ChunkEncoder, MtmdEncoder, start_chunk_encoder
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
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


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
    # Keep the last prompt's KV cells for the next call's shared prefix (a conversation's history). Off: each
    # call starts from an empty cache, as a batch of unrelated images wants; the questions of one call share anyway.
    reuse_kv: bool = False

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
    constraint: Constraint | None = None  # a grammar the answer follows, closed inside max_tokens (constrained.py)
    logprobs: int | None = None  # n = 1: each token's log-probability and this many alternatives (0-20)

    def validate(self) -> None:
        _need_int("max_tokens", self.max_tokens, 0, UINT32_MAX, "a token count")
        if self.logprobs is not None:
            _need_int("top_logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS, "a count of alternatives")
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
class TokenLogprob:
    """A generated token's bytes and natural-log probability under the model, with the likeliest alternatives."""

    piece: bytes
    logprob: float
    top: list[tuple[bytes, float]]


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
    stop_reason: str  # eos | length | stopped | closed (a constrained answer completed at the token budget)
    image: ImageEncoding
    timings: Timings = field(default_factory=Timings)
    candidates: list[Candidate] = field(default_factory=list)  # options.n > 1: all of them (text = the first's)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # options.logprobs set: one per generated token
    media: list[ImageEncoding] = field(default_factory=list)  # each image and video of the prompt, in order


@dataclass
class _Chunk:
    """One piece of mtmd's tokenized prompt: text token ids, or an image of n_tokens."""

    kind: str  # text | image
    tokens: list[int]
    ptr: object = None  # the mtmd chunk, for images
    n_tokens: int = 0


_TEXT, _IMAGE = 0, 1
_KEEP_TOKENIZED = 8  # views whose mtmd chunks stay in memory between planning and evaluation (more: tokenized again)


@dataclass
class _PlannedView:
    """One view of the prompt's media: its level, pixels, digest, the tokens of the text before it, and
    (while kept) mtmd's chunks for it."""

    view: media_plan.View
    level: str
    cap: int
    rgb: np.ndarray
    digest: str
    before: list[int]
    seq: list[_Chunk] | None = None
    ptr: object = None  # mtmd's chunk list holding seq's image chunks
    image_tokens: int = 0
    tiles: int = 0

    def free(self) -> None:
        if self.ptr is not None:
            mtmd.mtmd_input_chunks_free(self.ptr)
        self.ptr, self.seq = None, None


@dataclass
class _Plan:
    """A prompt's media laid out: the views, the KV entries up to the last one (`entries`, each with
    its action: (_TEXT,) or (_IMAGE, view, chunk in the view's sequence, image chunk ordinal)), and the
    text left over for the suffix (a video's closing blank line)."""

    media: list[Media]
    carry: str
    views: list[_PlannedView] = field(default_factory=list)
    entries: list[media_plan.Entry] = field(default_factory=list)
    actions: list[tuple[int, ...]] = field(default_factory=list)

    def add_view(self, index: int) -> None:
        pv = self.views[index]
        seq = pv.seq
        assert seq is not None, "a view is tokenized before it is added"
        for t in pv.before:
            self._text(t)
        ordinal = 0
        for c, chunk in enumerate(seq):
            if chunk.kind == "text":
                for t in chunk.tokens:
                    self._text(t)
            else:
                self.entries.append(media_plan.Entry((pv.digest, pv.level, pv.cap, ordinal), chunk.n_tokens))
                self.actions.append((_IMAGE, index, c, ordinal))
                ordinal += 1
        pv.image_tokens = sum(c.n_tokens for c in seq if c.kind == "image")
        pv.tiles = 0 if pv.level == "low" else ordinal - 1

    def _text(self, token: int) -> None:
        self.entries.append(media_plan.Entry(token))
        self.actions.append((_TEXT,))

    @property
    def prefix_end(self) -> int:
        """Entries up to and including the last image chunk."""
        return max((i + 1 for i, a in enumerate(self.actions) if a[0] == _IMAGE), default=0)

    @property
    def image_tokens(self) -> int:
        return sum(pv.image_tokens for pv in self.views)

    def what(self) -> str:
        """The media, as an error message names them."""
        return _count_media([kind_of(m) for m in self.media]) if len(self.media) > 1 or self.carry else "the image"

    def encodings(self, passes: list[int], evaluated: list[int], restored: bool) -> list[ImageEncoding]:
        out = []
        for i, item in enumerate(self.media):
            views = [pv for pv in self.views if pv.view.item == i]
            chunks = sum(1 for a in self.actions if a[0] == _IMAGE and self.views[a[1]].view.item == i)
            if evaluated[i] == 0:
                cached: str | None = "kv"  # kept in the KV cache, or its cells restored from the encoding cache
            else:
                cached = "embd" if passes[i] < evaluated[i] or evaluated[i] < chunks else None
            if isinstance(item, VideoFrames):
                w, h, level, tiles = item.width, item.height, "video", 0
            else:
                w, h, level, tiles = item.width, item.height, views[0].level, views[0].tiles
            out.append(ImageEncoding(w, h, level, tiles, sum(pv.image_tokens for pv in views), passes[i], cached))
        return out

    def free(self) -> None:
        for pv in self.views:
            pv.free()


def _media_list(image: Media | Sequence[Media] | None) -> list[Media]:
    if image is None:
        return []
    if isinstance(image, (list, tuple)):
        return list(image)
    return [cast("Media", image)]


def _count_media(kinds: list[str]) -> str:
    """ "2 images and 1 video", "no image"."""
    parts = [f"{kinds.count(k)} {k}{'s' if kinds.count(k) != 1 else ''}" for k in ("image", "video") if k in kinds]
    return " and ".join(parts) or "no image"


def _summary(encodings: list[ImageEncoding]) -> ImageEncoding:
    """One ImageEncoding for a prompt's media (records of one image keep its own)."""
    if len(encodings) == 1:
        return encodings[0]
    if not encodings:
        return ImageEncoding(0, 0, "none", 0, 0, 0)
    levels = {e.detail for e in encodings}
    caches = {e.cached for e in encodings}
    return ImageEncoding(
        width=encodings[0].width,
        height=encodings[0].height,
        detail=levels.pop() if len(levels) == 1 else "mixed",
        tiles=sum(e.tiles for e in encodings),
        image_tokens=sum(e.image_tokens for e in encodings),
        encoder_passes=sum(e.encoder_passes for e in encodings),
        cached=caches.pop() if len(caches) == 1 else "embd",
    )


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
        self.image_encoder: ChunkEncoder = MtmdEncoder()  # what encodes image chunks (siglip_chunks.py)
        self._grammars: dict[str, Grammar | None] = {}  # constraints' grammars as gbnf.py follows them
        self._pieces: Pieces | None = None  # the vocabulary's pieces, read at the first constrained answer
        self._batch: llama.llama_batch | None = None
        self._prompt: PromptInput | None = None  # the prompt's rows, as embeddings (prompt_rows.py)
        self._kv: list[media_plan.Entry] = []  # what sequence 0 of the KV cache holds (reused by the next prompt)
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
        image_encoder = start_chunk_encoder(self.mmproj_path, self.mmproj_info, not self.uses_gpu, self.n_threads)
        try:
            self._load_model()
        except BaseException:
            image_encoder.cancel()
            raise
        self.image_encoder = image_encoder.finish()

    def _load_model(self) -> None:
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
        self._prompt = PromptInput(self.model_info, self.options.n_batch)
        self._check_prompt_rows(model, self._prompt.width)
        self.chat_template = _model_meta(model, "tokenizer.chat_template")
        # Rendered once, used for every image; a template that cannot render is a fault of the file.
        try:
            self.chat = ChatPrompt.from_template(self.chat_template)
        except TemplateProblem as e:
            raise ModelError(f"tokenizer.chat_template cannot be used: {e}", self.model_path) from None
        self.eos_ids = self._special_ids()
        # Open the projector now, so a bad mmproj fails at load, not at the first image; with the
        # token cap this engine's detail setting uses most (each cap costs a copy of its weights).
        projector = self._mtmd_context(self._token_cap(self._usual_max_tiles()))
        if mtmd.mtmd_decode_use_non_causal(projector, None) or mtmd.mtmd_decode_use_mrope(projector):
            # prompt_rows.py decodes image rows as text rows: causal, one position each
            raise ModelError("this projector's image tokens need non-causal or M-RoPE decoding", self.mmproj_path)

    def _check_prompt_rows(self, model: object, width: int) -> None:
        """prompt_rows.py feeds text as token_embd rows: what a llama-architecture model (SmolVLM2's)
        reads for token ids, as wide as its input (others scale one input and not the other)."""
        if self.model_info.arch != "llama":
            raise ModelError(
                f"a {self.model_info.arch!r} language model: vlm runs SmolVLM2's, of the llama architecture",
                self.model_path,
            )
        if llama.llama_model_n_embd_inp(model) != width:
            raise ModelError(f"the model's input is not as wide as its {TOKEN_EMBD} rows ({width})", self.model_path)

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
        # mtmd turns flash attention on only in its warmup pass (AUTO): without one, ask for it, as
        # llama-mtmd-cli runs; a backend that lacks the op runs it on the CPU
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
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
        self.image_encoder.close()
        for ctx in self._mtmd.values():
            mtmd.mtmd_free(ctx)
        self._mtmd.clear()
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
        if self._prompt is not None:
            self._prompt.free()
        self._batch, self._prompt = None, None
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

    def _prompt_input(self) -> PromptInput:
        assert self._prompt is not None, "the engine is closed"
        return self._prompt

    # -- prompt evaluation ---------------------------------------------------------------------

    def _decode_tokens(self, tokens: list[int], n_past: int, logits: Literal["none", "last", "all"]) -> int:
        """tokens into sequence 0 from n_past on, in batches of n_batch; logits for none of them, the last,
        or all (every row of the last batch: callers wanting them all pass at most n_batch tokens)."""
        b = self._token_batch()
        step = self.options.n_batch
        for start in range(0, len(tokens), step):
            part = tokens[start : start + step]
            for i, tok in enumerate(part):
                b.token[i] = tok
            fill_rows(b, len(part), n_past + start, logits if start + len(part) == len(tokens) else "none")
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

    # -- the prompt's media ----------------------------------------------------------------------

    def _plan(self, media: Sequence[Media], texts: Sequence[str]) -> _Plan:
        """Every view of the media tokenized (the image chunks of few views kept for evaluation), with
        the entries the prompt up to its last view puts in the KV cache."""
        views, carry = media_plan.views(media, texts)
        keep = len(views) <= _KEEP_TOKENIZED
        plan = _Plan(media=list(media), carry=carry)
        try:
            for v in views:
                plan.views.append(self._plan_view(v))
                plan.add_view(len(plan.views) - 1)
                if not keep:
                    plan.views[-1].free()
        except BaseException:
            plan.free()
            raise
        return plan

    def _plan_view(self, view: media_plan.View) -> _PlannedView:
        image = view.image
        level, max_tiles = "low", cast("int | None", 1)  # a video's frames go in unsplit, as transformers sends them
        if view.frame is None:
            level, max_tiles = detail_policy.choose(
                image.width, image.height, self.vision, self.options.detail, self.options.max_tiles, self.uses_gpu
            )
        cap = self._token_cap(max_tiles)
        if level == "low" and cap not in {c for c, _ in self._mtmd}:
            # Only the overview is used, and every context makes the same one: reuse an open context's cap.
            cap = next(iter(self._mtmd))[0]
        image = detail_policy.mtmd_input(image, self.vision, cap)
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        h, w = rgb.shape[:2]
        # rgb.data: hashed in place (tobytes() would copy 36 MB for a 12 MP photo on every question)
        pv = _PlannedView(view, level, cap, rgb, image_digest(rgb.data, w, h), self.tokenize(view.before))
        self._tokenize_view(pv)
        return pv

    def _tokenize_view(self, pv: _PlannedView) -> list[_Chunk]:
        """The view's chunks as the model reads them at its level (mtmd's, or the overview alone)."""
        if pv.seq is not None:
            return pv.seq
        marker = mtmd.mtmd_default_marker().decode()
        pv.ptr, chunks = self._tokenize_with_image(pv.rgb, marker, pv.cap)
        images = [c for c in chunks if c.kind == "image"]
        if pv.level == "low":
            # The overview only, laid out as the model's unsplit image (as transformers writes an image
            # that is not split): <fake><global-img> 64 x <image> <fake>.
            pv.seq = [
                _Chunk("text", self.tokenize("<fake_token_around_image><global-img>")),
                images[-1],
                _Chunk("text", self.tokenize("<fake_token_around_image>")),
            ]
        else:
            pv.seq = [c for c in chunks if c.kind == "image" or c.tokens]
        return pv.seq

    def _prefill(
        self, plan: _Plan, suffix_text: str, timings: Timings, on_progress: EncodeProgress | None = None
    ) -> tuple[int, list[ImageEncoding]]:
        """Evaluate the plan's media and then `suffix_text` (with the logits of its last token). KV cells of
        the longest prefix the cache already holds are kept; the media prefix may come whole from the
        encoding cache. Returns n_past and how each media item went in."""
        suffix = self.tokenize(plan.carry + suffix_text)
        entries = plan.entries + [media_plan.Entry(t) for t in suffix]
        total = sum(e.size for e in entries)
        if total + 1 > self.n_ctx:
            # The media's share is named when fewer image tokens (lower detail, fewer frames) would fit.
            media_tokens = plan.image_tokens if total - plan.image_tokens + 1 <= self.n_ctx else None
            raise ContextOverflow(total, self.n_ctx, media_tokens or None, plan.what())
        memory = llama.llama_get_memory(self._ctx)
        keep = media_plan.common_prefix(self._kv, entries)
        restored_from_disk = False
        kv_key = self._kv_key(plan) if plan.views else None
        if kv_key is not None and keep < plan.prefix_end and self._restore_prefix(kv_key, plan):
            keep, restored_from_disk = plan.prefix_end, True
        n_past = sum(e.size for e in entries[:keep])
        llama.llama_memory_seq_rm(memory, 0, n_past, -1)
        self._kv = entries[:keep]  # set again at each flush below; cells past it are removed by the next prompt
        fresh = keep == 0
        passes = [0] * len(plan.media)
        evaluated = [0] * len(plan.media)
        todo = sum(1 for e in entries[keep:] if not isinstance(e.what, int))
        done = 0
        if on_progress is not None and todo:
            on_progress(0, todo)
        rows = self._prompt_input().rows(self._ctx, n_past)
        i = keep
        while i < len(entries):
            action = plan.actions[i] if i < len(plan.actions) else None
            if action is None or action[0] == _TEXT:
                j = i
                while j < len(entries) and (j >= len(plan.actions) or plan.actions[j][0] == _TEXT):
                    j += 1
                rows.add_tokens([cast(int, e.what) for e in entries[i:j]])
                timings.prefill_tokens += j - i
            else:
                _, v, c, ordinal = action
                pv = plan.views[v]
                chunk = self._tokenize_view(pv)[c]
                embd = self._embd_key(pv)
                key = {**embd, "chunk": ordinal} if embd is not None else None
                image_rows, encoded = self._image_chunk_rows(chunk, timings, pv.cap, key)
                rows.add_embeddings(image_rows)
                passes[pv.view.item] += encoded
                timings.prefill_tokens += chunk.n_tokens
                evaluated[pv.view.item] += 1
                done += 1
                if on_progress is not None:
                    on_progress(done, todo)
                j = i + 1
            # The media prefix is decoded apart from the text after it, so that its KV cells are the same
            # whatever question follows (and the same as those the encoding cache keeps).
            if j == plan.prefix_end or j == len(entries):
                n_past = rows.flush(logits_last=j == len(entries))
                self._kv = entries[:j]
            # Saved when the encoder ran for a prefix evaluated from its start: a conversation's later turns
            # (their history kept in memory) would fill the cache with prefixes no other prompt shares.
            if kv_key is not None and j == plan.prefix_end and not restored_from_disk and any(passes) and fresh:
                self._save_prefix(kv_key, n_past, plan)
            i = j
        timings.prefill_ms += rows.decode_s * 1000
        return n_past, plan.encodings(passes, evaluated, restored_from_disk)

    # -- the encoding cache ----------------------------------------------------------------------

    def _embd_key(self, pv: _PlannedView) -> dict[str, Any] | None:
        """A view's encoder output in the cache (its chunk's index added per chunk); None without a cache."""
        if self.options.cache is None:
            return None
        try:
            mmproj = self.options.cache.file_sha256(self.mmproj_path)
        except OSError:
            return None
        level = pv.level
        return {
            "v": 1,
            "kind": "embd",
            "image": pv.digest,
            "mmproj": mmproj,
            "level": level,
            "cap": 0 if level == "low" else pv.cap,
        }

    def _kv_key(self, plan: _Plan) -> dict[str, Any] | None:
        """The KV cells of the prompt up to its last view in the cache: every view and the texts between."""
        cache = self.options.cache
        if cache is None:
            return None
        try:
            views = [{"image": pv.digest, "level": pv.level, "cap": pv.cap} for pv in plan.views]
            return {
                "v": 3,  # 3: the prompt decoded in batches of n_batch rows (prompt_rows.py)
                "kind": "kv",
                "mmproj": cache.file_sha256(self.mmproj_path),
                "model": cache.file_sha256(self.model_path),
                "views": views,
                "texts": [pv.view.before for pv in plan.views],
                "llama_cpp": _LLAMA_CPP_VERSION,
                "gpu": self.uses_gpu,
                "n_batch": self.options.n_batch,  # where the prefix's batches end moves its sums' rounding
            }
        except OSError:
            return None

    def _restore_prefix(self, key: dict[str, Any], plan: _Plan) -> bool:
        """The prompt's media prefix from the cache into sequence 0 (then it is not evaluated)."""
        assert self.options.cache is not None
        hit = self.options.cache.get(key)
        if hit is None:
            return False
        try:
            n_past = int(hit.meta["n_past"])
        except (KeyError, TypeError, ValueError):
            return False
        if n_past != sum(e.size for e in plan.entries[: plan.prefix_end]) or not 0 < n_past < self.n_ctx:
            return False
        memory = llama.llama_get_memory(self._ctx)
        llama.llama_memory_seq_rm(memory, 0, -1, -1)
        self._kv = []
        buf = (ctypes.c_uint8 * len(hit.payload)).from_buffer_copy(hit.payload)
        if llama.llama_state_seq_set_data(self._ctx, buf, len(hit.payload), 0) != len(hit.payload):
            # llama.cpp refused it (another layout): start clean and evaluate the prefix
            llama.llama_memory_clear(memory, True)
            return False
        return True

    def _save_prefix(self, key: dict[str, Any], n_past: int, plan: _Plan) -> None:
        assert self.options.cache is not None
        size = llama.llama_state_seq_get_size(self._ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = llama.llama_state_seq_get_data(self._ctx, buf, size, 0)
        if written:
            self.options.cache.put(key, {"n_past": n_past}, bytes(buf)[:written])

    def _image_chunk_rows(
        self, chunk: _Chunk, timings: Timings, cap: int, key: dict[str, Any] | None
    ) -> tuple[np.ndarray, int]:
        """One image chunk's embeddings, [n_tokens, width], and the encoder passes run for them: 0 (from the
        encoding cache) or 1 (encoded, and put in the cache)."""
        t0 = time.perf_counter()
        width = self._prompt_input().width
        size = chunk.n_tokens * width * 4
        cache = self.options.cache
        hit = cache.get(key) if key is not None and cache is not None else None
        if hit is not None and len(hit.payload) == size:
            embd, encoded = np.frombuffer(hit.payload, np.float32), 0
        else:
            ctx = self._mtmd_context(cap)
            embd = self.image_encoder.encode(ctx, chunk.ptr, chunk.n_tokens, width, self.n_threads)
            encoded = 1
            if key is not None and cache is not None and size:
                cache.put(key, {"tokens": chunk.n_tokens, "width": width}, embd.tobytes())
        timings.image_encode_ms += (time.perf_counter() - t0) * 1000
        return embd.reshape(chunk.n_tokens, width), encoded

    # -- generation ----------------------------------------------------------------------------

    def ask(
        self,
        image: Media | Sequence[Media] | None,
        prompts: list[str],
        options: GenerationOptions | None = None,
        on_token: TokenCallback | None = None,
        on_progress: EncodeProgress | None = None,
        on_candidate_token: CandidateCallback | None = None,
    ) -> Iterator[Generation]:
        """Answer each prompt about the media: one image, several images and videos in order (one user turn
        of them, then the question), or none (a text-only prompt). Each image is encoded once; the KV cells
        of the media are reused for every prompt."""
        media = _media_list(image)
        kinds = [kind_of(m) for m in media]
        try:
            texts, head, tail = question_layout(self.chat_template, kinds)
        except TemplateProblem as e:
            raise ModelError(f"tokenizer.chat_template cannot be used: {e}", self.model_path) from None
        shown = "".join(t + MEDIA_TOKENS[k] for t, k in zip(texts, kinds))
        suffixes = [(head + p + tail, shown + head + p + tail) for p in prompts]
        return self._answers(media, texts, suffixes, options, on_token, on_progress, on_candidate_token)

    def chat_turns(
        self,
        image: Media | Sequence[Media] | None,
        turns: list[Turn],
        options: GenerationOptions | None = None,
        on_token: TokenCallback | None = None,
        on_progress: EncodeProgress | None = None,
        on_candidate_token: CandidateCallback | None = None,
    ) -> Iterator[Generation]:
        """The next assistant turn of a conversation (system, user, assistant turns; images and videos
        anywhere in them, `image` holding them in the order the turns place them), rendered whole by the
        model's chat template. One user turn with the image first is the same prompt, token for token,
        as `ask` with its text."""
        media = _media_list(image)
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
            texts, kinds = split_media(self.chat_template, list(turns))
        except ValueError as e:
            raise InvalidOption("messages", str(e)) from None
        except TemplateProblem as e:
            raise ModelError(f"tokenizer.chat_template cannot render this conversation: {e}", self.model_path) from None
        given = [kind_of(m) for m in media]
        if kinds != given:
            raise InvalidOption(
                "messages",
                f"the messages place {_count_media(kinds)} but {_count_media(given)} came with them",
            )
        whole = "".join(t + MEDIA_TOKENS[k] for t, k in zip(texts, kinds)) + texts[-1]
        return self._answers(
            media, texts[:-1], [(texts[-1], whole)], options, on_token, on_progress, on_candidate_token
        )

    def layout(self, image: Media | Sequence[Media] | None, prompt: str) -> list[int]:
        """The token ids `ask` feeds the model for `prompt` about the media, each image chunk written as
        its n <image> ids, as transformers' processor writes them (for comparing layouts; encodes nothing)."""
        media = _media_list(image)
        texts, head, tail = question_layout(self.chat_template, [kind_of(m) for m in media])
        plan = self._plan(media, texts)
        try:
            image_id = self._token_id("<image>")
            ids: list[int] = []
            for e in plan.entries:
                ids += [e.what] if isinstance(e.what, int) else [image_id if image_id is not None else -1] * e.size
            return ids + self.tokenize(plan.carry + head + prompt + tail)
        finally:
            plan.free()

    def _answers(
        self,
        media: list[Media],
        texts: list[str],  # the text before each media item
        suffixes: list[tuple[str, str]],  # (the text after the last item, the whole prompt for the record)
        options: GenerationOptions | None,
        on_token: TokenCallback | None,
        on_progress: EncodeProgress | None,
        on_candidate_token: CandidateCallback | None,
    ) -> Iterator[Generation]:
        with self._sharing_cores():
            yield from self._answer_all(media, texts, suffixes, options, on_token, on_progress, on_candidate_token)

    def _answer_all(
        self,
        media: list[Media],
        texts: list[str],
        suffixes: list[tuple[str, str]],
        options: GenerationOptions | None,
        on_token: TokenCallback | None,
        on_progress: EncodeProgress | None,
        on_candidate_token: CandidateCallback | None,
    ) -> Iterator[Generation]:
        options = options or GenerationOptions()
        options.validate()
        first = Timings(load_ms=self.load_ms)
        if not self.options.reuse_kv:
            self._kv = []
        plan = self._plan(media, texts)
        try:
            for i, (after_media, prompt) in enumerate(suffixes):
                timings = first if i == 0 else Timings()
                n_past, encodings = self._prefill(plan, after_media, timings, on_progress if i == 0 else None)
                enc = _summary(encodings)
                if options.n == 1:
                    gen = self._generate(prompt, n_past, enc, options, timings, on_token)
                else:
                    stream = _CandidateStream(self, on_candidate_token) if on_candidate_token else None
                    gen = self._generate_candidates(
                        prompt, n_past, enc, options, timings, stream.on_token if stream else None
                    )
                    if stream:
                        stream.finish()
                gen.media = encodings
                yield gen
        finally:
            plan.free()

    def _generate(
        self,
        prompt: str,
        n_past: int,
        enc: ImageEncoding,
        options: GenerationOptions,
        timings: Timings,
        on_token: TokenCallback | None,
    ) -> Generation:
        budget = min(options.max_tokens, self.n_ctx - n_past)
        sampler = self._sampler(options, options.seed, budget)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        logprobs: list[TokenLogprob] = []
        n_prompt = n_past
        stop = "length"
        generated = 0
        t0 = time.perf_counter()
        try:
            for _ in range(max(0, budget)):
                tok = sampler.sample(-1)
                if tok is None:
                    break  # closed (or, never expected, the grammar could not be followed): see below
                if not options.ignore_eos and (tok in self.eos_ids or llama.llama_vocab_is_eog(self._vocab, tok)):
                    stop = "eos"
                    break
                generated += 1
                if options.logprobs is not None:
                    logprobs.append(self._token_logprob(tok, options.logprobs))
                text = decoder.decode(self._piece(tok))
                if text:
                    pieces.append(text)
                    if on_token is not None and on_token(text) is False:
                        stop = "stopped"
                        break
                if generated >= budget:
                    break
                n_past = self._decode_tokens([tok], n_past, "last")
            if stop == "length" and sampler.closed:
                stop = "closed"
        finally:
            sampler.free()
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
            logprobs=logprobs,
        )

    def _sampler(self, options: GenerationOptions, seed: int, budget: int) -> Sampler:
        """One sequence's sampler: vlm's row sampler, or llama.cpp's chain under the options' grammar."""
        if options.constraint is None:
            return SequenceSampler(self._row_sampler(options, [seed]), self._logits_row)
        chain = _make_sampler(GenerationOptions(temperature=options.temperature, top_p=options.top_p, seed=seed))
        c = options.constraint
        if c.gbnf not in self._grammars:
            self._grammars[c.gbnf] = parse_for_closing(c)
        grammar = self._grammars[c.gbnf]
        if grammar is not None and self._pieces is None:
            self._pieces = Pieces(self.n_vocab, self._piece, lambda t: not llama.llama_vocab_is_eog(self._vocab, t))
        return ConstrainedSampler(
            self._vocab, self._ctx, self.n_vocab, chain, c, grammar, self._pieces, self._piece, budget
        )

    def _row_sampler(self, options: GenerationOptions, seeds: list[int]) -> RowSampler:
        return RowSampler(self.n_vocab, options.temperature, options.top_p, seeds)

    def _logits_row(self, row: int) -> np.ndarray:
        """Logits row `row` of the last batch (-1: its last), as floats that llama.cpp owns."""
        return self._logits_rows(True, 1)[0] if row == -1 else self._logits_rows(False, row + 1)[row]

    def _logits_rows(self, last: bool, n: int) -> np.ndarray:
        """The last batch's logits (n rows, in the batch's order), or its last row (n = 1): (n, n_vocab)
        floats that llama.cpp owns."""
        ptr = llama.llama_get_logits_ith(self._ctx, -1) if last else llama.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab))

    def _token_logprob(self, token: int, top: int) -> TokenLogprob:
        """The last logits row's log-probability of `token` and its `top` most likely alternatives."""
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))
        norm = float(_log_normalizer(logits))
        best = np.argpartition(-logits, top)[:top] if top else np.zeros(0, dtype=np.int64)
        best = best[np.argsort(-logits[best], kind="stable")]
        return TokenLogprob(
            self._piece(token),
            float(logits[token]) - norm,
            [(self._piece(int(t)), float(logits[t]) - norm) for t in best],
        )

    def _is_end(self, token: int, options: GenerationOptions) -> bool:
        return not options.ignore_eos and (token in self.eos_ids or llama.llama_vocab_is_eog(self._vocab, token))

    def _logprob(self, row: int, token: int) -> float:
        """log softmax of logits row `row` (-1 = the last) at `token`."""
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,))
        return float(logits[token]) - float(_log_normalizer(logits))

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
        budget = min(options.max_tokens, (self.n_ctx - n_past) // n)
        # Without a grammar every candidate's token comes from one call over the step's logits rows;
        # a grammar needs each candidate's own sampler.
        together = (
            self._row_sampler(options, [options.seed + i for i in range(n)]) if options.constraint is None else None
        )
        samplers: list[Sampler] = []
        try:
            for i in range(n if together is None else 0):
                samplers.append(self._sampler(options, options.seed + i, budget))
        except VlmError:
            for sampler in samplers:
                sampler.free()
            raise
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        stops = ["length"] * n
        row = [-1] * n  # each sequence's logits row in the last batch (-1: the prompt's last token)
        active = list(range(n))
        b = self._token_batch()
        pos = batch_positions(b)
        t0 = time.perf_counter()
        try:
            for step in range(max(0, budget)):
                drawn: list[tuple[int | None, float | None]]
                if together is not None:
                    rows = [0] * len(active) if step == 0 else [row[seq] for seq in active]
                    # the prompt's last row, shared by all; then one row per sequence
                    logits = self._logits_rows(step == 0, max(rows) + 1)
                    drawn = list(zip(*together.sample(logits, rows, active)))
                else:
                    drawn = [(samplers[seq].sample(row[seq]), None) for seq in active]
                going = []
                for seq, (tok, logprob) in zip(active, drawn):
                    if tok is None:
                        continue  # closed: see below
                    if self._is_end(tok, options):
                        stops[seq] = "eos"
                        continue
                    tokens[seq].append(tok)
                    logprobs[seq].append(self._logprob(row[seq], tok) if logprob is None else logprob)
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
            if samplers:
                stops = ["closed" if s == "length" and sampler.closed else s for s, sampler in zip(stops, samplers)]
        finally:
            for sampler in samplers:
                sampler.free()
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

    def answer_logits(self, image: Image.Image, prompt: str, tokens: list[int]) -> np.ndarray:
        """Teacher forcing: the logits the model gives before each of `tokens`, as the answer to `prompt`
        about `image` (the prompt evaluated as `ask` does, the answer in batches of n_batch):
        [len(tokens), n_vocab]."""
        chat = self.chat
        if not self.options.reuse_kv:
            self._kv = []
        plan = self._plan([image], [chat.before_image])
        try:
            n_past, _ = self._prefill(plan, chat.after_image(prompt), Timings())
        finally:
            plan.free()
        out = np.empty((len(tokens), self.n_vocab), np.float32)
        if tokens:
            out[0] = self._logits_row(-1)
        for start in range(0, len(tokens) - 1, self.options.n_batch):
            part = tokens[start : min(start + self.options.n_batch, len(tokens) - 1)]
            n_past = self._decode_tokens(part, n_past, "all")
            out[start + 1 : start + 1 + len(part)] = self._logits_rows(False, len(part))
        return out

    def score(self, image: Image.Image, prompt: str, tokens: list[int]) -> list[float]:
        """The model's log-probability of each of `tokens` as the answer to `prompt` about `image`."""
        logits = self.answer_logits(image, prompt, tokens).astype(np.float64)
        norm = _log_normalizer(logits)
        return [float(logits[i, t] - norm[i]) for i, t in enumerate(tokens)]


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


# Part of the KV cache entries' key: llama.cpp's per-sequence state layout may change between builds.
_LLAMA_CPP_VERSION = build_id()


def _log_normalizer(logits: np.ndarray) -> np.ndarray:
    """log sum exp over a vocabulary's logits (the last axis): each token's log-probability is its logit
    less this. The exponentials are summed in the logits' own type, the log taken in float64."""
    peak = logits.max(axis=-1, keepdims=True)
    sums = np.exp(logits - peak).sum(axis=-1)
    return peak[..., 0].astype(np.float64) + np.log(sums.astype(np.float64))


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
