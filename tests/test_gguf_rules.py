"""The validation table (vlmcli/gguf/rules.py) on the converted fixtures, and the other load-time
and use-time checks of issue 11: chat templates, image shapes mtmd cannot take, engine options."""

from __future__ import annotations

from pathlib import Path

import fuzzing as fz
import pytest

from vlmcli.engines.detail import VisionGeometry, check_image_shape
from vlmcli.engines.llama import EngineOptions, GenerationOptions
from vlmcli.engines.prompt import ChatPrompt, TemplateProblem, render_user_turn
from vlmcli.errors import ImageError, InvalidOption, ModelError
from vlmcli.gguf.reader import inspect_gguf
from vlmcli.gguf.relations import SPECIAL_TOKEN_KEYS
from vlmcli.gguf.rule_kinds import InvalidModelValue, Key
from vlmcli.gguf.rules import rules_for
from vlmcli.gguf.validate import require_kind

# Numeric keys nothing native sizes anything by (informational, or flags read as booleans).
UNCHECKED = {
    "general.file_type",
    "general.quantization_version",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "clip.has_llava_projector",
    "clip.has_text_encoder",
    "clip.has_vision_encoder",  # decide the kind (clip vs mmproj): require_kind
}


def _files(smolvlm2_gguf, clip_gguf) -> dict[str, Path]:
    return {"llm": smolvlm2_gguf.model, "mmproj": smolvlm2_gguf.mmproj, "clip": clip_gguf}


def test_the_converted_files_pass(smolvlm2_gguf, clip_gguf) -> None:
    for kind, path in _files(smolvlm2_gguf, clip_gguf).items():
        require_kind(path, kind, keep_string_arrays=kind == "clip")


def test_every_numeric_key_of_the_real_layouts_has_a_rule(smolvlm2_gguf, clip_gguf) -> None:
    """A key a converter starts writing must get a rule (or be listed as harmless here)."""
    for kind, path in _files(smolvlm2_gguf, clip_gguf).items():
        info = inspect_gguf(path)
        ruled = {r.key.replace("{arch}", info.arch) for r in rules_for(kind, info.arch) if isinstance(r, Key)}
        ruled |= set(SPECIAL_TOKEN_KEYS)
        numeric = {k.key for k in fz.numeric_keys(fz.parse_gguf(path.read_bytes()))}
        assert numeric - ruled - UNCHECKED == set(), kind


def _mutated(path: Path, tmp_path: Path, key: str, value) -> Path:
    layout = fz.parse_gguf(path.read_bytes())
    out = tmp_path / f"bad-{path.name}"
    out.write_bytes(fz.set_value(layout, key, value, "x").data)
    return out


@pytest.mark.parametrize(
    "kind,key,value,reason",
    [
        ("mmproj", "clip.vision.patch_size", 7, "v.patch_embd.weight has 16 x 16 patches"),
        ("mmproj", "clip.vision.image_size", 256, "v.position_embd.weight holds 64 positions"),
        ("mmproj", "clip.vision.attention.head_count", 5, "does not divide clip.vision.embedding_length (64)"),
        ("mmproj", "clip.vision.projector.scale_factor", 1, "must be between 2 and 65535"),
        ("mmproj", "clip.vision.projector.scale_factor", 1000, "does not divide the 8 x 8 patch grid"),
        ("mmproj", "clip.vision.attention.layer_norm_epsilon", float("inf"), "must be a finite number"),
        ("llm", "llama.block_count", 513, "must be between 1 and 512"),
        ("llm", "llama.block_count", 1, "but the file holds tensors of block 1"),
        (
            "llm",
            "llama.attention.head_count",
            6,
            "blk.0.attn_q.weight has shape (64, 64), but the hyper-parameters imply (64, 96)",
        ),
        ("llm", "llama.attention.head_count_kv", 3, "does not divide llama.attention.head_count (4)"),
        ("llm", "llama.attention.layer_norm_rms_epsilon", -1e-5, "must be more than 0"),
        ("llm", "llama.rope.dimension_count", 8, "differs from the head size 16"),
        ("llm", "tokenizer.ggml.eos_token_id", 49280, "is outside the vocabulary of 49280 tokens"),
        ("llm", "llama.context_length", 0, "must be between 1 and"),
        ("clip", "tokenizer.ggml.bos_token_id", 10**9, "is outside the vocabulary of 49408 tokens"),
        ("clip", "clip.text.block_count", 2**31, "must be between 1 and 512"),
        ("clip", "clip.vision.image_size", 4096, "must be between 1 and 1024"),
    ],
)
def test_refusals_name_file_key_value_and_reason(
    smolvlm2_gguf, clip_gguf, tmp_path: Path, kind, key, value, reason
) -> None:
    path = _mutated(_files(smolvlm2_gguf, clip_gguf)[kind], tmp_path, key, value)
    with pytest.raises(InvalidModelValue) as e:
        require_kind(path, kind, keep_string_arrays=kind == "clip")
    err = e.value
    assert err.path == str(path) and reason in err.message, err.message
    assert err.key in err.message and isinstance(err, ModelError)
    assert str(path) in str(err)


def test_a_value_of_another_gguf_type_is_refused_for_the_projector(smolvlm2_gguf, tmp_path: Path) -> None:
    """mtmd reads clip.* with typed getters that abort on another type."""
    layout = fz.parse_gguf(smolvlm2_gguf.mmproj.read_bytes())
    kv = layout.kv("clip.vision.image_size")
    out = tmp_path / "retyped.gguf"
    out.write_bytes(fz.splice(layout, kv.type_at, kv.end, fz._encode_value(10, 128)))  # uint64
    with pytest.raises(InvalidModelValue, match="has GGUF type uint64, expected uint32"):
        require_kind(out, "mmproj")


def test_duplicate_vocabulary_entry_is_refused(smolvlm2_gguf, tmp_path: Path) -> None:
    """llama-vocab.cpp asserts the vocabulary has no duplicates."""
    layout = fz.parse_gguf(smolvlm2_gguf.model.read_bytes())
    kv = layout.kv("tokenizer.ggml.tokens")
    items = fz.string_items(layout, kv)
    items[300] = items[200]
    out = tmp_path / "dup.gguf"
    out.write_bytes(fz.splice(layout, kv.type_at, kv.end, fz._encode_string_array(items)))
    with pytest.raises(InvalidModelValue, match="tokenizer.ggml.tokens holds .* twice"):
        require_kind(out, "llm")


# --- chat templates ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template,reason",
    [
        ("{% for m in messages %}{{ m['role'] }", "syntax error on line 1"),
        ("{{ messages[0]['content'][7]['text'] }}", "rendering failed"),
        ("Hello", "does not place the image"),
        ("{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}", "more than 200000 steps"),
        ("{{ 'x' * 10000000 }}", "at most 6 digits"),
        ("{{ 'x' * 1000 * 1000 }}", "a sequence of 1000000 items"),
        ("{{ 'x'|center(999999) * 3 }}", "a sequence of"),
    ],
)
def test_bad_templates_are_template_problems(template: str, reason: str) -> None:
    with pytest.raises(TemplateProblem, match=reason):
        ChatPrompt.from_template(template)


def test_the_real_template_renders() -> None:
    assert (
        render_user_turn(None, "What is this?") == "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"
    )


# --- images mtmd cannot take -------------------------------------------------------------------------


GEO = VisionGeometry(tile_size=512, patch_size=16, scale_factor=4, longest_edge=2048, preproc_longest_edge=2048)


@pytest.mark.parametrize("w,h", [(1, 20000), (20000, 1), (1, 2049), (3, 7000)])
def test_full_detail_refuses_images_that_resize_to_nothing(w: int, h: int) -> None:
    with pytest.raises(ImageError, match=f"{w}x{h} pixels"):
        check_image_shape(w, h, GEO, -1)


@pytest.mark.parametrize("w,h", [(1, 2048), (2048, 1), (1, 1), (4000, 3000)])
def test_full_detail_takes_images_that_keep_a_pixel(w: int, h: int) -> None:
    check_image_shape(w, h, GEO, -1)


def test_a_token_cap_takes_any_shape() -> None:
    for w, h in [(1, 20000), (20000, 1), (1, 1)]:
        check_image_shape(w, h, GEO, 4 * 64)


# --- engine options, checked before anything is allocated ---------------------------------------------


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"n_ctx": 4294967553}, "n_ctx"),
        ({"n_ctx": -1}, "n_ctx"),
        ({"n_threads": 0}, "n_threads"),
        ({"n_threads": 100000}, "n_threads"),
        ({"n_batch": 0}, "n_batch"),
        ({"n_gpu_layers": 2**32}, "n_gpu_layers"),
        ({"max_tiles": 10**6}, "max_tiles"),
        ({"detail": "ultra"}, "detail"),
    ],
)
def test_engine_options_out_of_range(kwargs: dict, option: str) -> None:
    with pytest.raises(InvalidOption) as e:
        EngineOptions(**kwargs).validate()
    assert e.value.option == option


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": float("inf")}, "top_p"),
        ({"max_tokens": -5}, "max_tokens"),
    ],
)
def test_generation_options_out_of_range(kwargs: dict, option: str) -> None:
    with pytest.raises(InvalidOption) as e:
        GenerationOptions(**kwargs).validate()
    assert e.value.option == option


def test_context_beyond_the_trained_one_is_refused_before_loading(smolvlm2_gguf) -> None:
    from vlmcli.engines.llama import VlmEngine

    with pytest.raises(InvalidOption, match="more than the 8192 this model was trained for") as e:
        VlmEngine(smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(n_ctx=1_000_000_000))
    assert e.value.option == "n_ctx" and e.value.path == str(smolvlm2_gguf.model)
