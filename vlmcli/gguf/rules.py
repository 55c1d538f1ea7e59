"""The validation rules for model files, in one table, checked before any native code sees a file.

llama.cpp, mtmd and ggml trust a GGUF's hyper-parameters: a value they cannot use often ends in a
GGML_ASSERT (SIGABRT, the whole process dies with a backtrace and no file name), a division by zero,
or an allocation sized by the value. Every rule below stands for such a place (the `why` column says
which, from llama-cpp-python 0.3.36's llama.cpp: src/llama-model.cpp, src/llama-vocab.cpp,
tools/mtmd/clip.cpp, mtmd.cpp, mtmd-image.cpp, ggml/src/gguf.cpp) or for a limit of vlmcli's own
CLIP graphs, and refuses the file with an `InvalidModelValue` naming the file, the key and the value.

Three kinds of rule, one table (`RULES`), applied in order by `check_model`:
- `Key`: one key's GGUF type (mtmd reads values with typed getters that *abort* on another type),
  whether it must be present, and its range (finite, positive, bounded).
- `Relation`: a check across keys (divisibility, head counts, token ids inside the vocabulary).
- `Tensors`: the tensors the hyper-parameters imply exist with the shapes and types they imply
  (clip.cpp checks no tensor shape at all; a wrong one is a ggml assert in the first graph).
Rules apply per kind of file ("llm", "mmproj", "clip") and, for the language model, per architecture
(`{arch}` in a key is the file's general.architecture); the projector rules are those of
SmolVLM2's projector type, idefics3, the only one the engine drives.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from vlmcli.errors import ModelError
from vlmcli.gguf.layout import GgufTensor
from vlmcli.gguf.reader import GgufInfo
from vlmcli.gguf.smolvlm2_layout import Idefics3Dims, LlamaDims, idefics3_tensors, llama_tensors


class InvalidModelValue(ModelError):
    """A model file holds a value vlmcli (or the native code behind it) cannot use.

    `key` is the GGUF key or tensor name, `value` the offending value (None if missing)."""

    def __init__(self, path: Any, key: str, value: Any, reason: str):
        name = key if key.isprintable() else repr(key)  # one line, whatever the file holds
        message = f"{name} {reason}" if value is None else f"{name} = {_show(value)}: {reason}"
        super().__init__(message, path)
        self.key = key
        self.value = value
        self.reason = reason


# GGUF value type codes (gguf.GGUFValueType) and the names the table uses.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_INTS = {U8, I8, U16, I16, U32, I32, U64, I64}
_FLOATS = {F32, F64}
TYPE_NAMES = {
    U8: "uint8",
    I8: "int8",
    U16: "uint16",
    I16: "int16",
    U32: "uint32",
    I32: "int32",
    F32: "float32",
    BOOL: "bool",
    STR: "string",
    ARR: "array",
    U64: "uint64",
    I64: "int64",
    F64: "float64",
}

# Limits of vlmcli's own (stated here, as llama.cpp states its own).
LLAMA_MAX_LAYERS = 512  # src/llama-hparams.h
LLAMA_MAX_EXPERTS = 512  # src/llama-hparams.h
CLIP_MAX_IMAGE_SIZE = 8192  # clip.cpp: "image_size is too large (max 8192)"
CLIP_MAX_PATCH_SIZE = 65535  # clip.cpp: "patch_size must be positive and less than 65536"
MAX_PATCHES = 4096  # patches per encoder pass: attention is quadratic in it (real models: 576..1024)
CLIP_TOWER_MAX_IMAGE_SIZE = 1024  # vlmcli's CLIP graphs: preprocessed pixels are 12 * size^2 bytes per image
MAX_CONTEXT = 2**31 - 1  # context lengths are int32 in llama.cpp's batch and position types
MAX_EPS = 1.0  # layer-norm epsilons are ~1e-6..1e-5; above 1 the norm is meaningless


def _show(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if not math.isfinite(value) else f"{value:g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")  # repr: control characters escaped
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in list(value)[:4]) + (", ...]" if len(value) > 4 else "]")
    return str(value)


# ----------------------------------------------------------------------------------------------------
# The context a rule sees


class Model:
    """The parsed header a rule checks: metadata, GGUF types, tensors; `arch` fills `{arch}` in keys."""

    def __init__(self, info: GgufInfo):
        self.info = info
        self.path = info.path
        self.kind = info.kind
        self.arch = info.arch
        self.meta = info.metadata
        self.types = info.types
        self.tensors = {t.name: t for t in info.tensors}

    def key(self, template: str) -> str:
        return template.replace("{arch}", self.arch)

    def get(self, template: str, default: Any = None) -> Any:
        return self.meta.get(self.key(template), default)

    def n_tokens(self) -> int | None:
        """The vocabulary size: tokenizer.ggml.tokens (a count, or the list when kept)."""
        tokens = self.meta.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list):
            return len(tokens)
        return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None

    def fail(self, key: str, value: Any, reason: str) -> InvalidModelValue:
        return InvalidModelValue(self.path, self.key(key), value, reason)


# ----------------------------------------------------------------------------------------------------
# Rule kinds


@dataclass(frozen=True)
class Key:
    """One key: its GGUF type, whether it is required, its range.

    `type` is "u32", "i32", "f32", "bool", "str", "f32[]", "i32[]", "str[]", "u32|u32[]" (a scalar or
    a per-layer array), or "int"/"float" for vlmcli's own CLIP files (any integer / numeric type).
    Bounds are inclusive; `gt` is an exclusive lower bound (for epsilons)."""

    kinds: tuple[str, ...]
    key: str
    type: str
    required: bool = False
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    choices: tuple[str, ...] | None = None
    why: str = ""
    arch: str | None = None  # language model rules for one architecture only

    def check(self, m: Model) -> None:
        key = m.key(self.key)
        if key not in m.meta:
            if self.required:
                raise m.fail(self.key, None, f"is required ({self.why})" if self.why else "is required")
            return
        value = m.meta[key]
        vtype, itype = m.types.get(key, (None, None))
        values = self._typed(m, key, value, vtype, itype)
        if self.choices is None and self.min is None and self.max is None and self.gt is None:
            values = [v for v in values if isinstance(v, float)]  # finiteness only
        for v in values:
            self._range(m, v, value)

    def _typed(self, m: Model, key: str, value: Any, vtype: int | None, itype: int | None) -> list[Any]:
        want = self.type
        if vtype is None:  # types unknown (an info built by hand): check the values only
            return list(value) if isinstance(value, list) else [value]
        options = want.split("|")
        for opt in options:
            if opt.endswith("[]"):
                base = opt[:-2]
                if vtype == ARR and _type_ok(base, itype):
                    if base == "str" or not isinstance(value, list):  # strings have no range to check
                        return []
                    return value
            elif _type_ok(opt, vtype):
                return [value]
        got = _type_name(vtype)
        if vtype == ARR:
            got = f"array of {_type_name(itype)}"
        raise m.fail(
            self.key,
            value if vtype != ARR else None,
            f"has GGUF type {got}, expected {' or '.join(_type_label(o) for o in options)}",
        )

    def _range(self, m: Model, v: Any, whole: Any) -> None:
        if self.choices is not None:
            if v not in self.choices:
                raise m.fail(self.key, whole, f"is not one of {', '.join(self.choices)}")
            return
        if isinstance(v, (bool, str)) or not isinstance(v, (int, float)):
            return
        if isinstance(v, float) and not math.isfinite(v):
            raise m.fail(self.key, whole, "must be a finite number" + (f" ({self.why})" if self.why else ""))
        lo_ok = (self.min is None or v >= self.min) and (self.gt is None or v > self.gt)
        hi_ok = self.max is None or v <= self.max
        if not (lo_ok and hi_ok):
            raise m.fail(self.key, whole, f"must be {self._range_text()}" + (f" ({self.why})" if self.why else ""))

    def _range_text(self) -> str:
        lo = (
            f"more than {self.gt:g}"
            if self.gt is not None
            else (f"at least {self.min:g}" if self.min is not None else "")
        )
        hi = f"at most {self.max:g}" if self.max is not None else ""
        if self.min is not None and self.max is not None and self.gt is None:
            return f"between {self.min:g} and {self.max:g}"
        return " and ".join(p for p in (lo, hi) if p)


def _type_name(code: int | None) -> str:
    return TYPE_NAMES[code] if code is not None and code in TYPE_NAMES else str(code)


def _type_ok(name: str, code: int | None) -> bool:
    return {
        "u32": code == U32,
        "i32": code == I32,
        "f32": code == F32,
        "bool": code == BOOL,
        "str": code == STR,
        "int": code in _INTS,
        "float": code in _INTS | _FLOATS,
        "anybool": code == BOOL or code in _INTS,
    }[name]


def _type_label(opt: str) -> str:
    base = opt[:-2] if opt.endswith("[]") else opt
    label = {
        "u32": "uint32",
        "i32": "int32",
        "f32": "float32",
        "bool": "bool",
        "str": "string",
        "int": "an integer type",
        "float": "a number type",
        "anybool": "bool",
    }[base]
    return f"array of {label}" if opt.endswith("[]") else label


@dataclass(frozen=True)
class Relation:
    """A check across keys. `check` raises through `m.fail` (naming the key it is about)."""

    kinds: tuple[str, ...]
    name: str
    check: Callable[[Model], None]
    why: str = ""
    arch: str | None = None


@dataclass(frozen=True)
class Tensors:
    """The tensors the hyper-parameters imply: `expected(m)` yields them from the model's layout table."""

    kinds: tuple[str, ...]
    name: str
    expected: Callable[[Model], Iterator[GgufTensor]]
    why: str = ""
    arch: str | None = None

    def check(self, m: Model) -> None:
        for spec in self.expected(m):
            name = spec.name
            t = m.tensors.get(name)
            if t is None:
                if spec.required:
                    raise InvalidModelValue(m.path, name, None, "is required: the file lacks this tensor")
                continue
            got = tuple(int(d) for d in t.shape)
            if not any(_same_shape(got, s) for s in spec.shapes):
                want = " or ".join(str(tuple(s)) for s in spec.shapes)
                raise InvalidModelValue(m.path, name, None, f"has shape {got}, but the hyper-parameters imply {want}")
            if t.type not in spec.types:
                raise InvalidModelValue(
                    m.path, name, None, f"has type {t.type}, expected one of {', '.join(spec.types)}"
                )


def _same_shape(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    n = max(len(got), len(want))
    return got + (1,) * (n - len(got)) == tuple(want) + (1,) * (n - len(want))


# ----------------------------------------------------------------------------------------------------
# Relations and tensor lists (the functions the table names)


def _int(m: Model, key: str, default: int | None = None) -> int | None:
    v = m.get(key, default)
    if isinstance(v, list):
        return None
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _per_layer(m: Model, key: str) -> list[int] | None:
    """A per-layer count: the scalar repeated, or the array (llama.cpp's get_key_or_arr)."""
    v = m.get(key)
    n_layer = _int(m, "{arch}.block_count") or 0
    if v is None:
        return None
    if isinstance(v, list):
        return [int(x) for x in v]
    return [int(v)] * n_layer


def _llm_layers(m: Model) -> None:
    n = _int(m, "{arch}.block_count")
    if n is None:
        return
    for key in ("{arch}.feed_forward_length", "{arch}.attention.head_count", "{arch}.attention.head_count_kv"):
        v = m.get(key)
        if isinstance(v, list) and len(v) != n:
            raise m.fail(key, v, f"has {len(v)} entries, but {m.key('{arch}.block_count')} is {n}")
    extra = sorted({int(g.group(1)) for name in m.tensors if (g := re.match(r"blk\.(\d+)\.", name))} - set(range(n)))
    if extra:
        raise m.fail("{arch}.block_count", n, f"but the file holds tensors of block {extra[0]}")
    nextn = _int(m, "{arch}.nextn_predict_layers", 0) or 0
    if nextn > n:
        raise m.fail("{arch}.nextn_predict_layers", nextn, f"is more than {m.key('{arch}.block_count')} ({n})")


def _llm_heads(m: Model) -> None:
    n_embd = _int(m, "{arch}.embedding_length")
    heads = _per_layer(m, "{arch}.attention.head_count") or []
    kv = _per_layer(m, "{arch}.attention.head_count_kv") or heads
    k_len = _int(m, "{arch}.attention.key_length")
    _int(m, "{arch}.attention.value_length")
    for il, (h, hk) in enumerate(zip(heads, kv)):
        where = f" (layer {il})" if isinstance(m.get("{arch}.attention.head_count"), list) else ""
        if h < 1:
            raise m.fail("{arch}.attention.head_count", h, f"must be at least 1{where}")
        if k_len is None and n_embd is not None and n_embd % h:
            raise m.fail(
                "{arch}.attention.head_count",
                h,
                f"does not divide {m.key('{arch}.embedding_length')} ({n_embd}){where}",
            )
        if hk < 1:
            raise m.fail("{arch}.attention.head_count_kv", hk, f"must be at least 1{where} (llama.cpp divides by it)")
        if h % hk:
            raise m.fail(
                "{arch}.attention.head_count_kv",
                hk,
                f"does not divide {m.key('{arch}.attention.head_count')} ({h}){where}",
            )


def _llama_head_dims(m: Model) -> None:
    n_embd = _int(m, "{arch}.embedding_length")
    heads = _per_layer(m, "{arch}.attention.head_count") or []
    if not heads or n_embd is None or heads[0] < 1:
        return
    head_k = _int(m, "{arch}.attention.key_length", n_embd // heads[0])
    head_v = _int(m, "{arch}.attention.value_length", n_embd // heads[0])
    if head_k is None:  # not a number: its Key rule has refused the file already
        return
    if head_v != head_k:
        raise m.fail(
            "{arch}.attention.value_length",
            head_v,
            f"differs from the key length {head_k} (llama's graph asserts they are equal)",
        )
    rot = _int(m, "{arch}.rope.dimension_count", head_k)
    if rot != head_k:
        raise m.fail(
            "{arch}.rope.dimension_count",
            rot,
            f"differs from the head size {head_k} (llama requires n_rot = head size)",
        )
    if head_k % 2:
        raise m.fail(
            "{arch}.attention.key_length"
            if m.get("{arch}.attention.key_length") is not None
            else "{arch}.attention.head_count",
            m.get("{arch}.attention.key_length", heads[0]),
            f"gives an odd head size {head_k} (rotary embeddings rotate pairs)",
        )


def _llm_experts(m: Model) -> None:
    n_expert = _int(m, "{arch}.expert_count", 0) or 0
    used = max(_per_layer(m, "{arch}.expert_used_count") or [0])
    groups = _int(m, "{arch}.expert_group_count", 0) or 0
    if n_expert > LLAMA_MAX_EXPERTS:
        raise m.fail("{arch}.expert_count", n_expert, f"must be at most {LLAMA_MAX_EXPERTS}")
    if used > n_expert:
        raise m.fail("{arch}.expert_used_count", used, f"is more than {m.key('{arch}.expert_count')} ({n_expert})")
    if n_expert > 0:
        if used == 0:
            raise m.fail("{arch}.expert_used_count", used, "must be at least 1 in a mixture-of-experts model")
        if groups >= n_expert:
            raise m.fail(
                "{arch}.expert_group_count", groups, f"must be less than {m.key('{arch}.expert_count')} ({n_expert})"
            )
        if groups > 1:
            if n_expert % groups:
                raise m.fail(
                    "{arch}.expert_group_count", groups, f"does not divide {m.key('{arch}.expert_count')} ({n_expert})"
                )
            g_used = _int(m, "{arch}.expert_group_used_count", 0) or 0
            if not 0 < g_used < groups:
                raise m.fail("{arch}.expert_group_used_count", g_used, f"must be between 1 and {groups - 1}")
    elif groups:
        raise m.fail("{arch}.expert_group_count", groups, "is set but the model has no experts")


SPECIAL_TOKEN_KEYS = tuple(
    f"tokenizer.ggml.{name}_token_id"
    for name in (
        "bos",
        "eos",
        "eot",
        "eom",
        "unknown",
        "seperator",
        "padding",
        "mask",
        "cls",
        "fim_pre",
        "fim_suf",
        "fim_mid",
        "fim_pad",
        "fim_rep",
        "fim_sep",
        "prefix",
        "suffix",
        "middle",
    )
)


def _special_tokens(m: Model) -> None:
    n = m.n_tokens()
    if n is None:
        return
    for key in SPECIAL_TOKEN_KEYS:
        v = m.meta.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v < n:
            raise m.fail(key, v, f"is outside the vocabulary of {n} tokens")


def _vocab_arrays(m: Model) -> None:
    n = m.n_tokens()
    if n is None:
        return
    if n < 1:
        raise m.fail("tokenizer.ggml.tokens", None, "is empty")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = m.meta.get(key)
        if isinstance(v, list) and len(v) < n:
            raise m.fail(key, None, f"has {len(v)} entries for {n} tokens")


def _unique_tokens(m: Model) -> None:
    tokens = m.meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        return
    seen: set[str] = set()
    for i, t in enumerate(tokens):
        t = t or f"[EMPTY_{i}]"  # what llama.cpp makes of an empty token
        if t in seen:
            raise m.fail("tokenizer.ggml.tokens", None, f"holds {t!r} twice (the second at id {i})")
        seen.add(t)


def _clip_vocab(m: Model) -> None:
    """vlmcli's CLIP tokenizer: its ids inside the vocabulary, and every merge's parts and result in it."""
    tokens = m.meta.get("tokenizer.ggml.tokens")
    n = m.n_tokens()
    if n is None:
        embd = m.tensors.get("t.token_embd.weight")
        n = int(embd.shape[1]) if embd is not None and len(embd.shape) >= 2 else None
    for key, default in (("tokenizer.ggml.bos_token_id", 49406), ("tokenizer.ggml.eos_token_id", 49407)):
        v = m.meta.get(key, default)
        if n is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v < n:
            missing = "" if key in m.meta else " (the key is missing; this is CLIP's default)"
            raise m.fail(key, v, f"is outside the vocabulary of {n} tokens{missing}")
    merges = m.meta.get("tokenizer.ggml.merges")
    if isinstance(tokens, list) and tokens and isinstance(merges, list):
        vocab = set(tokens)
        for i, merge in enumerate(merges):
            parts = merge.split(" ")
            if len(parts) != 2 or not all(parts):
                raise m.fail("tokenizer.ggml.merges", None, f"entry {i} ({merge!r}) is not two symbols")
            if parts[0] + parts[1] not in vocab:
                raise m.fail(
                    "tokenizer.ggml.merges",
                    None,
                    f"entry {i} makes {parts[0] + parts[1]!r}, which is not in tokenizer.ggml.tokens",
                )


def _architecture(m: Model) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", m.arch):
        raise m.fail("general.architecture", m.arch, "is not an architecture name")


def _alignment(m: Model) -> None:
    a = m.meta.get("general.alignment")
    if a is not None and (not isinstance(a, int) or a <= 0 or a & (a - 1)):
        raise m.fail("general.alignment", a, "must be a power of two")


def _idefics3_geometry(m: Model) -> None:
    size = _int(m, "clip.vision.image_size")
    patch = _int(m, "clip.vision.patch_size")
    scale = _int(m, "clip.vision.projector.scale_factor")
    if not size or not patch:
        return
    grid = size // patch  # the conv's output side (SmolVLM2-2.2B: 384 / 14 -> 27)
    if grid < 1:
        raise m.fail("clip.vision.patch_size", patch, f"is larger than clip.vision.image_size ({size})")
    # The patch embedding and the position table show what the sizes were: name the key that disagrees.
    conv, pos = m.tensors.get("v.patch_embd.weight"), m.tensors.get("v.position_embd.weight")
    if conv is not None and len(conv.shape) >= 2 and conv.shape[0] == conv.shape[1] and conv.shape[0] != patch:
        raise m.fail(
            "clip.vision.patch_size", patch, f"but v.patch_embd.weight has {conv.shape[0]} x {conv.shape[1]} patches"
        )
    if pos is not None and len(pos.shape) >= 2 and pos.shape[1] != grid * grid:
        raise m.fail(
            "clip.vision.image_size",
            size,
            f"gives a {grid} x {grid} patch grid (patch size {patch}), but "
            f"v.position_embd.weight holds {pos.shape[1]} positions",
        )
    if grid * grid > MAX_PATCHES:
        raise m.fail(
            "clip.vision.patch_size", patch, f"makes {grid * grid} patches per {size} px tile, more than {MAX_PATCHES}"
        )
    if scale is not None and grid % scale:
        raise m.fail(
            "clip.vision.projector.scale_factor",
            scale,
            f"does not divide the {grid} x {grid} patch grid (clip.vision.image_size / clip.vision.patch_size)",
        )
    longest = _int(m, "clip.vision.preproc_image_size")
    if longest is not None and not size <= longest <= CLIP_MAX_IMAGE_SIZE:
        raise m.fail(
            "clip.vision.preproc_image_size",
            longest,
            f"must be between clip.vision.image_size ({size}) and {CLIP_MAX_IMAGE_SIZE}",
        )
    if m.meta.get("clip.use_gelu") is True and m.meta.get("clip.use_silu") is True:
        raise m.fail("clip.use_silu", True, "is set together with clip.use_gelu")


def _vision_heads(prefix: str) -> Callable[[Model], None]:
    def check(m: Model) -> None:
        width = _int(m, f"{prefix}.embedding_length")
        heads = _int(m, f"{prefix}.attention.head_count")
        if width and heads and width % heads:
            raise m.fail(
                f"{prefix}.attention.head_count",
                heads,
                f"does not divide {prefix}.embedding_length ({width}): the head count must divide the width",
            )
        kv = _int(m, f"{prefix}.attention.head_count_kv")
        if kv is not None and heads and (kv < 1 or heads % kv):
            raise m.fail(
                f"{prefix}.attention.head_count_kv", kv, f"does not divide {prefix}.attention.head_count ({heads})"
            )
        hd = _int(m, f"{prefix}.attention.head_dim")
        if hd is not None and width and heads and hd * heads != width:
            raise m.fail(
                f"{prefix}.attention.head_dim", hd, f"times the head count ({heads}) is not the width ({width})"
            )

    return check


def _mean_std(m: Model) -> None:
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        v = m.meta.get(key)
        if v is None:
            continue
        if not isinstance(v, list) or len(v) < 3 or (m.kind == "clip" and len(v) != 3):
            raise m.fail(key, v, "must hold 3 values (one per RGB channel)")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and abs(x) <= 1e3 for x in v[:3]):
            raise m.fail(key, v, "must hold finite values of at most 1000")
        if key.endswith("std") and not all(x >= 1e-3 for x in v[:3]):
            raise m.fail(key, v, "must be at least 0.001 (pixels are divided by it; real values are 0.2 to 0.5)")


def _clip_tower_geometry(m: Model) -> None:
    size = _int(m, "clip.vision.image_size")
    patch = _int(m, "clip.vision.patch_size")
    if size and patch:
        if size % patch:
            raise m.fail("clip.vision.patch_size", patch, f"does not divide clip.vision.image_size ({size})")
        if (size // patch) ** 2 > MAX_PATCHES:
            raise m.fail(
                "clip.vision.patch_size", patch, f"makes {(size // patch) ** 2} patches, more than {MAX_PATCHES}"
            )
    tp = _int(m, "clip.text.projection_dim")
    vp = _int(m, "clip.vision.projection_dim")
    if tp is not None and vp is not None and tp != vp:
        raise m.fail("clip.text.projection_dim", tp, f"differs from clip.vision.projection_dim ({vp})")


def _llama_tensors(m: Model) -> Iterator[GgufTensor]:
    n_embd = _int(m, "{arch}.embedding_length")
    n_layer = _int(m, "{arch}.block_count")
    n_vocab = m.n_tokens()
    heads = _per_layer(m, "{arch}.attention.head_count")
    if n_embd is None or n_layer is None or n_vocab is None or not heads or _int(m, "{arch}.expert_count", 0):
        return
    head_k = _int(m, "{arch}.attention.key_length", n_embd // heads[0])
    head_v = _int(m, "{arch}.attention.value_length", n_embd // heads[0])
    if head_k is None or head_v is None:
        return
    dims = LlamaDims(
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_layer=n_layer,
        heads=heads,
        kv_heads=_per_layer(m, "{arch}.attention.head_count_kv") or heads,
        ffn=_per_layer(m, "{arch}.feed_forward_length") or [0] * n_layer,
        head_k=head_k,
        head_v=head_v,
    )
    fused = {i for i in range(n_layer) if f"blk.{i}.attn_qkv.weight" in m.tensors}
    yield from llama_tensors(dims, fused)


def _idefics3_tensors(m: Model) -> Iterator[GgufTensor]:
    d = _int(m, "clip.vision.embedding_length")
    ffn = _int(m, "clip.vision.feed_forward_length")
    layers = _int(m, "clip.vision.block_count")
    size = _int(m, "clip.vision.image_size")
    patch = _int(m, "clip.vision.patch_size")
    scale = _int(m, "clip.vision.projector.scale_factor")
    proj = _int(m, "clip.vision.projection_dim")
    if d is None or ffn is None or layers is None or size is None or scale is None or proj is None or not patch:
        return
    yield from idefics3_tensors(Idefics3Dims(d, ffn, layers, size, patch, scale, proj))


def _idefics3_ffn_pairs(m: Model) -> None:
    """Each block's up and down projections must be the two orientations, not the same one twice."""
    d = _int(m, "clip.vision.embedding_length")
    layers = _int(m, "clip.vision.block_count") or 0
    if d is None:
        return
    for i in range(layers):
        up, down = m.tensors.get(f"v.blk.{i}.ffn_up.weight"), m.tensors.get(f"v.blk.{i}.ffn_down.weight")
        if up is not None and down is not None and tuple(up.shape) == tuple(down.shape) and up.shape[0] != up.shape[-1]:
            raise InvalidModelValue(
                m.path,
                f"v.blk.{i}.ffn_down.weight",
                None,
                f"has the same shape as ffn_up {tuple(up.shape)}: one of them is the wrong way round",
            )


def _projector_type(m: Model) -> None:
    t = m.meta.get("clip.projector_type", m.meta.get("clip.vision.projector_type"))
    if t is None:
        raise m.fail("clip.projector_type", None, "is required (which projector this is)")
    if t not in PROJECTOR_TYPES:
        raise m.fail(
            "clip.projector_type",
            t,
            f"is not supported (vlmcli drives SmolVLM2's projector: {', '.join(PROJECTOR_TYPES)})",
        )
    if m.meta.get("clip.has_vision_encoder") is not True:
        raise m.fail(
            "clip.has_vision_encoder",
            m.meta.get("clip.has_vision_encoder"),
            "must be true: the projector has no vision encoder",
        )


PROJECTOR_TYPES = ("idefics3",)
# llama-vocab.cpp's tokenizers (less "none" / "no_vocab": a model without one cannot take a prompt)
TOKENIZER_MODELS = ("gpt2", "llama", "bert", "t5", "rwkv", "plamo2", "gemma4", "hybriddna", "whitespace")

LLM, MMPROJ, CLIP = ("llm",), ("mmproj",), ("clip",)
ANY = ("llm", "mmproj", "clip")
VISION = ("mmproj", "clip")

# ----------------------------------------------------------------------------------------------------
# THE TABLE. Order matters only in that types and ranges come before the relations that use them.

RULES: list[Key | Relation | Tensors] = [
    # every file
    Relation(ANY, "architecture", _architecture, "keys are named after it; llama.cpp looks it up by name"),
    Key(ANY, "general.alignment", "u32", min=1, why="gguf.cpp: the data alignment"),
    Relation(ANY, "alignment", _alignment, "gguf.cpp refuses an alignment that is not a power of two"),
    Key(ANY, "general.name", "str", why="clip.cpp reads it with a typed getter"),
    Key(ANY, "general.description", "str", why="clip.cpp reads it with a typed getter"),
    # --- language model (llama.cpp: llama-model.cpp load_hparams, llama-vocab.cpp load) -------------
    Key(
        LLM,
        "{arch}.block_count",
        "u32",
        required=True,
        min=1,
        max=LLAMA_MAX_LAYERS,
        why=f"llama.cpp asserts 0 < n_layer <= {LLAMA_MAX_LAYERS}",
    ),
    Key(LLM, "{arch}.context_length", "u32", required=True, min=1, max=MAX_CONTEXT, why="the trained context"),
    Key(LLM, "{arch}.embedding_length", "u32", required=True, min=1, why="tensor sizes; 0 is a ggml assert"),
    Key(
        LLM,
        "{arch}.feed_forward_length",
        "u32|u32[]",
        required=True,
        min=1,
        arch="llama",
        why="tensor sizes; 0 is a ggml assert",
    ),
    Key(
        LLM,
        "{arch}.attention.head_count",
        "u32|u32[]|i32[]",
        required=True,
        min=1,
        arch="llama",
        why="llama's graph divides by it",
    ),
    Key(LLM, "{arch}.attention.head_count_kv", "u32|u32[]|i32[]", min=1, why="llama.cpp divides by it"),
    Key(LLM, "{arch}.attention.key_length", "u32", min=1),
    Key(LLM, "{arch}.attention.value_length", "u32", min=1),
    Key(LLM, "{arch}.rope.dimension_count", "u32", min=1),
    Key(
        LLM,
        "{arch}.attention.layer_norm_rms_epsilon",
        "f32",
        required=True,
        gt=0,
        max=MAX_EPS,
        arch="llama",
        why="ggml's rms_norm asserts eps >= 0; NaN fails it",
    ),
    Key(LLM, "{arch}.attention.layer_norm_epsilon", "f32", gt=0, max=MAX_EPS, why="ggml's norm asserts eps >= 0"),
    Key(LLM, "{arch}.rope.freq_base", "f32", gt=0, why="rotary frequencies"),
    Key(
        LLM,
        "{arch}.rope.scaling.type",
        "str",
        choices=("none", "linear", "yarn", "longrope"),
        why="llama.cpp asserts a known rope scaling type",
    ),
    Key(LLM, "{arch}.rope.scaling.factor", "f32", min=0),
    Key(LLM, "{arch}.rope.scale_linear", "f32", min=0),
    Key(LLM, "{arch}.rope.scaling.attn_factor", "f32", gt=0),
    Key(LLM, "{arch}.rope.scaling.original_context_length", "u32", min=1, max=MAX_CONTEXT),
    Key(LLM, "{arch}.expert_count", "u32", min=0, max=LLAMA_MAX_EXPERTS, why="llama.cpp asserts n_expert <= 512"),
    Key(LLM, "{arch}.expert_used_count", "u32|u32[]", min=0),
    Key(LLM, "{arch}.vocab_size", "u32", min=1),
    Key(
        LLM,
        "tokenizer.ggml.model",
        "str",
        required=True,
        choices=TOKENIZER_MODELS,
        why="llama.cpp builds no tokenizer for 'none' / 'no_vocab' and asserts when asked to tokenize",
    ),
    Key(LLM, "tokenizer.ggml.tokens", "str[]", required=True, why="the vocabulary"),
    Key(LLM, "tokenizer.ggml.scores", "f32[]|i32[]"),
    Key(LLM, "tokenizer.ggml.token_type", "i32[]"),
    Key(LLM, "tokenizer.ggml.merges", "str[]"),
    Key(LLM, "tokenizer.chat_template", "str"),
    *[Key(LLM, key, "u32") for key in SPECIAL_TOKEN_KEYS],
    Relation(LLM, "layers", _llm_layers, "per-layer arrays and blk.N tensors agree with block_count"),
    Relation(LLM, "heads", _llm_heads, "head counts divide the width and each other (llama.cpp divides by them)"),
    Relation(
        LLM,
        "head size",
        _llama_head_dims,
        "llama's graph asserts n_embd_head_k == n_embd_head_v == n_rot",
        arch="llama",
    ),
    Relation(LLM, "experts", _llm_experts, "llama.cpp's expert-count asserts"),
    Relation(LLM, "vocabulary arrays", _vocab_arrays, "scores and token types cover the vocabulary"),
    Relation(LLM, "unique tokens", _unique_tokens, "llama-vocab.cpp asserts id_to_token.size() == token_to_id.size()"),
    Relation(LLM, "special tokens", _special_tokens, "special token ids name vocabulary entries"),
    Tensors(
        LLM,
        "llama tensors",
        _llama_tensors,
        "token_embd, output and every block as the hyper-parameters say",
        arch="llama",
    ),
    # --- vision projector, idefics3 (tools/mtmd/clip.cpp load_hparams, the siglip graph, mtmd.cpp) ---
    Key(MMPROJ, "clip.projector_type", "str"),
    Key(MMPROJ, "clip.vision.projector_type", "str"),
    Key(MMPROJ, "clip.has_vision_encoder", "bool", required=True),
    Key(MMPROJ, "clip.has_audio_encoder", "bool"),
    Key(MMPROJ, "clip.has_gen_audio_encoder", "bool"),
    Relation(MMPROJ, "projector type", _projector_type, "mtmd drives one projector type per engine"),
    Key(MMPROJ, "clip.use_gelu", "bool"),
    Key(MMPROJ, "clip.use_silu", "bool"),
    Key(MMPROJ, "clip.minicpmv_version", "i32"),
    Key(MMPROJ, "clip.minicpmv_query_num", "u32"),
    Key(
        MMPROJ,
        "clip.vision.image_size",
        "u32",
        required=True,
        min=1,
        max=CLIP_MAX_IMAGE_SIZE,
        why="the tile size; mtmd divides by it",
    ),
    Key(MMPROJ, "clip.vision.patch_size", "u32", required=True, min=1, max=CLIP_MAX_PATCH_SIZE),
    Key(MMPROJ, "clip.vision.embedding_length", "u32", required=True, min=1),
    Key(MMPROJ, "clip.vision.feed_forward_length", "u32", required=True, min=1),
    Key(MMPROJ, "clip.vision.block_count", "u32", required=True, min=1, max=LLAMA_MAX_LAYERS),
    Key(MMPROJ, "clip.vision.projection_dim", "u32", required=True, min=1),
    Key(MMPROJ, "clip.vision.attention.head_count", "u32", required=True, min=1, why="the attention divides by it"),
    Key(MMPROJ, "clip.vision.attention.head_count_kv", "u32", min=1),
    Key(MMPROJ, "clip.vision.attention.head_dim", "u32", min=1),
    Key(
        MMPROJ,
        "clip.vision.attention.layer_norm_epsilon",
        "f32",
        required=True,
        gt=0,
        max=MAX_EPS,
        why="ggml's norm asserts eps >= 0; NaN fails it",
    ),
    Key(MMPROJ, "clip.vision.image_mean", "f32[]"),
    Key(MMPROJ, "clip.vision.image_std", "f32[]"),
    Key(
        MMPROJ,
        "clip.vision.projector.scale_factor",
        "u32",
        required=True,
        min=2,
        max=65535,
        why="clip.cpp asserts scale_factor > 1 for idefics3",
    ),
    Key(MMPROJ, "clip.vision.preproc_image_size", "u32", min=1, max=CLIP_MAX_IMAGE_SIZE),
    Key(MMPROJ, "clip.vision.feature_layer", "i32[]"),
    Key(MMPROJ, "clip.vision.image_grid_pinpoints", "i32[]"),
    Key(MMPROJ, "clip.vision.mm_patch_merge_type", "str"),
    Key(MMPROJ, "clip.vision.image_min_pixels", "i32"),
    Key(MMPROJ, "clip.vision.image_max_pixels", "i32"),
    Relation(MMPROJ, "heads", _vision_heads("clip.vision"), "the head count divides the width"),
    Relation(
        MMPROJ,
        "geometry",
        _idefics3_geometry,
        "patches tile the image and the pixel shuffle tiles the patch grid (mtmd asserts nx > 0)",
    ),
    Relation(VISION, "mean/std", _mean_std, "one value per channel; pixels are divided by the std"),
    Tensors(
        MMPROJ,
        "idefics3 tensors",
        _idefics3_tensors,
        "clip.cpp checks no shapes: a wrong one is a ggml assert in the first graph",
    ),
    Relation(MMPROJ, "ffn orientation", _idefics3_ffn_pairs, "clip.cpp tells up from down by shape"),
    # --- vlmcli's two-tower CLIP (engines/clip.py). Which keys must be present (and the defaults of those
    # that need not) is ClipConfig.from_gguf's business, and the tensor shapes ClipModel.load's (from
    # clip_layout.py): here only the ranges of the values present.
    Key(
        CLIP,
        "clip.vision.image_size",
        "int",
        min=1,
        max=CLIP_TOWER_MAX_IMAGE_SIZE,
        why="preprocessing makes a float32 image of this size",
    ),
    Key(CLIP, "clip.vision.patch_size", "int", min=1),
    Key(CLIP, "clip.text.context_length", "int", min=2, max=MAX_CONTEXT, why="room for the start and end tokens"),
    *[
        Key(CLIP, f"clip.{tower}.{key}", "int", min=1)
        for tower in ("text", "vision")
        for key in ("embedding_length", "feed_forward_length", "attention.head_count")
    ],
    *[
        Key(
            CLIP,
            f"clip.{tower}.block_count",
            "int",
            min=1,
            max=LLAMA_MAX_LAYERS,
            why="the loader lists every block's tensors",
        )
        for tower in ("text", "vision")
    ],
    Key(CLIP, "clip.vision.projection_dim", "int", min=1),
    Key(CLIP, "clip.text.projection_dim", "int", min=1),
    *[
        Key(CLIP, f"clip.{tower}.attention.layer_norm_epsilon", "float", gt=0, max=MAX_EPS)
        for tower in ("text", "vision")
    ],
    Key(CLIP, "clip.logit_scale", "float", min=-20, max=20, why="stored as a log: exp() of it scales the logits"),
    Key(CLIP, "clip.vision.image_mean", "float[]"),
    Key(CLIP, "clip.vision.image_std", "float[]"),
    Key(CLIP, "clip.use_gelu", "anybool"),
    Key(CLIP, "tokenizer.ggml.bos_token_id", "int"),
    Key(CLIP, "tokenizer.ggml.eos_token_id", "int"),
    Key(CLIP, "tokenizer.ggml.tokens", "str[]"),
    Key(CLIP, "tokenizer.ggml.merges", "str[]"),
    Relation(CLIP, "text heads", _vision_heads("clip.text"), "the head count divides the width"),
    Relation(CLIP, "vision heads", _vision_heads("clip.vision"), "the head count divides the width"),
    Relation(CLIP, "geometry", _clip_tower_geometry, "patches tile the image; both towers project to one size"),
    Relation(CLIP, "tokenizer", _clip_vocab, "the tokenizer's ids and merges agree with the vocabulary"),
]


def rules_for(kind: str, arch: str) -> Iterable[Key | Relation | Tensors]:
    return (r for r in RULES if kind in r.kinds and (r.arch is None or r.arch == arch))


def check_model(info: GgufInfo) -> None:
    """Apply every rule of the table that fits this file; raise InvalidModelValue on the first failure."""
    m = Model(info)
    for rule in rules_for(info.kind, info.arch):
        rule.check(m)
