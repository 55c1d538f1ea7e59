"""The checks across keys (Relation) and the tensor lists (Tensors) that the table in rules.py names."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

from vlmcli.gguf.layout import GgufTensor
from vlmcli.gguf.limits import CLIP_MAX_IMAGE_SIZE, LLAMA_MAX_EXPERTS, MAX_PATCHES
from vlmcli.gguf.rule_kinds import InvalidModelValue, Model
from vlmcli.gguf.smolvlm2_layout import Idefics3Dims, LlamaDims, idefics3_tensors, llama_tensors

PROJECTOR_TYPES = ("idefics3",)


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


def llm_layers(m: Model) -> None:
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


def llm_heads(m: Model) -> None:
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


def llama_head_dims(m: Model) -> None:
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


def llm_experts(m: Model) -> None:
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


def special_tokens(m: Model) -> None:
    n = m.n_tokens()
    if n is None:
        return
    for key in SPECIAL_TOKEN_KEYS:
        v = m.meta.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v < n:
            raise m.fail(key, v, f"is outside the vocabulary of {n} tokens")


def vocab_arrays(m: Model) -> None:
    n = m.n_tokens()
    if n is None:
        return
    if n < 1:
        raise m.fail("tokenizer.ggml.tokens", None, "is empty")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = m.meta.get(key)
        if isinstance(v, list) and len(v) < n:
            raise m.fail(key, None, f"has {len(v)} entries for {n} tokens")


def unique_tokens(m: Model) -> None:
    tokens = m.meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        return
    seen: set[str] = set()
    for i, t in enumerate(tokens):
        t = t or f"[EMPTY_{i}]"  # what llama.cpp makes of an empty token
        if t in seen:
            raise m.fail("tokenizer.ggml.tokens", None, f"holds {t[:40]!r} twice (the second at id {i})")
        seen.add(t)


def clip_vocab(m: Model) -> None:
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
                raise m.fail("tokenizer.ggml.merges", None, f"entry {i} ({merge[:40]!r}) is not two symbols")
            if parts[0] + parts[1] not in vocab:
                raise m.fail(
                    "tokenizer.ggml.merges",
                    None,
                    f"entry {i} makes {(parts[0] + parts[1])[:40]!r}, which is not in tokenizer.ggml.tokens",
                )


def architecture(m: Model) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", m.arch):
        raise m.fail("general.architecture", m.arch, "is not an architecture name")


def alignment(m: Model) -> None:
    a = m.meta.get("general.alignment")
    if a is not None and (not isinstance(a, int) or a <= 0 or a & (a - 1)):
        raise m.fail("general.alignment", a, "must be a power of two")


def idefics3_geometry(m: Model) -> None:
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


def vision_heads(prefix: str) -> Callable[[Model], None]:
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


def mean_std(m: Model) -> None:
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


def clip_tower_geometry(m: Model) -> None:
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


def expected_llama_tensors(m: Model) -> Iterator[GgufTensor]:
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


def expected_idefics3_tensors(m: Model) -> Iterator[GgufTensor]:
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


def idefics3_ffn_pairs(m: Model) -> None:
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


def projector_type(m: Model) -> None:
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
