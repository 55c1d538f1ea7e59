"""The validation rules for model files, in one table, checked before any native code sees a file.

llama.cpp, mtmd and ggml trust a GGUF's hyper-parameters: a value they cannot use often ends in a
GGML_ASSERT (SIGABRT, the whole process dies with a backtrace and no file name), a division by zero,
or an allocation sized by the value. Every rule below stands for such a place (the `why` column says
which, from llama-cpp-python 0.3.36's llama.cpp: src/llama-model.cpp, src/llama-vocab.cpp,
tools/mtmd/clip.cpp, mtmd.cpp, mtmd-image.cpp, ggml/src/gguf.cpp) or for a limit of vlmcli's own
CLIP graphs, and refuses the file with an `InvalidModelValue` naming the file, the key and the value.

Three kinds of rule (rule_kinds.py), one table (`RULES`), applied in order by `check_model`:
- `Key`: one key's GGUF type (mtmd reads values with typed getters that *abort* on another type),
  whether it must be present, and its range (finite, positive, bounded).
- `Relation`: a check across keys (divisibility, head counts, token ids inside the vocabulary;
  the functions are in relations.py).
- `Tensors`: the tensors the hyper-parameters imply exist with the shapes and types they imply, from
  the model's layout table (clip.cpp checks no tensor shape at all; a wrong one is a ggml assert in the
  first graph).
Rules apply per kind of file ("llm", "mmproj", "clip") and, for the language model, per architecture
(`{arch}` in a key is the file's general.architecture); the projector rules are those of
SmolVLM2's projector type, idefics3, the only one the engine drives.
"""

from __future__ import annotations

from collections.abc import Iterable

from vlmcli.gguf.limits import (
    CLIP_MAX_IMAGE_SIZE,
    CLIP_MAX_PATCH_SIZE,
    CLIP_TOWER_MAX_IMAGE_SIZE,
    LLAMA_MAX_EXPERTS,
    LLAMA_MAX_LAYERS,
    MAX_CONTEXT,
    MAX_EPS,
)
from vlmcli.gguf.reader import GgufInfo
from vlmcli.gguf.relations import (
    SPECIAL_TOKEN_KEYS,
    alignment,
    architecture,
    clip_tower_geometry,
    clip_vocab,
    expected_idefics3_tensors,
    expected_llama_tensors,
    idefics3_ffn_pairs,
    idefics3_geometry,
    llama_head_dims,
    llm_experts,
    llm_heads,
    llm_layers,
    mean_std,
    projector_type,
    special_tokens,
    unique_tokens,
    vision_heads,
    vocab_arrays,
)
from vlmcli.gguf.rule_kinds import Key, Model, Relation, Tensors

# llama-vocab.cpp's tokenizers (less "none" / "no_vocab": a model without one cannot take a prompt)
TOKENIZER_MODELS = ("gpt2", "llama", "bert", "t5", "rwkv", "plamo2", "gemma4", "hybriddna", "whitespace")

LLM, MMPROJ, CLIP = ("llm",), ("mmproj",), ("clip",)
ANY = ("llm", "mmproj", "clip")
VISION = ("mmproj", "clip")

# ----------------------------------------------------------------------------------------------------
# THE TABLE. Order matters only in that types and ranges come before the relations that use them.

RULES: list[Key | Relation | Tensors] = [
    # every file
    Relation(ANY, "architecture", architecture, "keys are named after it; llama.cpp looks it up by name"),
    Key(ANY, "general.alignment", "u32", min=1, why="gguf.cpp: the data alignment"),
    Relation(ANY, "alignment", alignment, "gguf.cpp refuses an alignment that is not a power of two"),
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
    Relation(LLM, "layers", llm_layers, "per-layer arrays and blk.N tensors agree with block_count"),
    Relation(LLM, "heads", llm_heads, "head counts divide the width and each other (llama.cpp divides by them)"),
    Relation(
        LLM,
        "head size",
        llama_head_dims,
        "llama's graph asserts n_embd_head_k == n_embd_head_v == n_rot",
        arch="llama",
    ),
    Relation(LLM, "experts", llm_experts, "llama.cpp's expert-count asserts"),
    Relation(LLM, "vocabulary arrays", vocab_arrays, "scores and token types cover the vocabulary"),
    Relation(LLM, "unique tokens", unique_tokens, "llama-vocab.cpp asserts id_to_token.size() == token_to_id.size()"),
    Relation(LLM, "special tokens", special_tokens, "special token ids name vocabulary entries"),
    Tensors(
        LLM,
        "llama tensors",
        expected_llama_tensors,
        "token_embd, output and every block as the hyper-parameters say",
        arch="llama",
    ),
    # --- vision projector, idefics3 (tools/mtmd/clip.cpp load_hparams, the siglip graph, mtmd.cpp) ---
    Key(MMPROJ, "clip.projector_type", "str"),
    Key(MMPROJ, "clip.vision.projector_type", "str"),
    Key(MMPROJ, "clip.has_vision_encoder", "bool", required=True),
    Key(MMPROJ, "clip.has_audio_encoder", "bool"),
    Key(MMPROJ, "clip.has_gen_audio_encoder", "bool"),
    Relation(MMPROJ, "projector type", projector_type, "mtmd drives one projector type per engine"),
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
    Relation(MMPROJ, "heads", vision_heads("clip.vision"), "the head count divides the width"),
    Relation(
        MMPROJ,
        "geometry",
        idefics3_geometry,
        "patches tile the image and the pixel shuffle tiles the patch grid (mtmd asserts nx > 0)",
    ),
    Relation(VISION, "mean/std", mean_std, "one value per channel; pixels are divided by the std"),
    Tensors(
        MMPROJ,
        "idefics3 tensors",
        expected_idefics3_tensors,
        "clip.cpp checks no shapes: a wrong one is a ggml assert in the first graph",
    ),
    Relation(MMPROJ, "ffn orientation", idefics3_ffn_pairs, "clip.cpp tells up from down by shape"),
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
    Relation(CLIP, "text heads", vision_heads("clip.text"), "the head count divides the width"),
    Relation(CLIP, "vision heads", vision_heads("clip.vision"), "the head count divides the width"),
    Relation(CLIP, "geometry", clip_tower_geometry, "patches tile the image; both towers project to one size"),
    Relation(CLIP, "tokenizer", clip_vocab, "the tokenizer's ids and merges agree with the vocabulary"),
]


def rules_for(kind: str, arch: str) -> Iterable[Key | Relation | Tensors]:
    return (r for r in RULES if kind in r.kinds and (r.arch is None or r.arch == arch))


def check_model(info: GgufInfo) -> None:
    """Apply every rule of the table that fits this file; raise InvalidModelValue on the first failure."""
    m = Model(info)
    for rule in rules_for(info.kind, info.arch):
        rule.check(m)
