"""The SmolVLM2 engine on the real llama.cpp + mtmd, with the tiny converted fixture."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
from vlmcli.engines.llama_native import llama, mtmd
from vlmcli.engines.prompt import ChatPrompt, render_user_turn
from vlmcli.errors import VlmError
from vlmcli.gguf.reader import inspect_gguf
from vlmcli.images import load_image

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"


@pytest.fixture(scope="module")
def engines(smolvlm2_gguf):
    """One engine per detail level, loaded once for the module."""
    made: dict[str, VlmEngine] = {}

    def get(detail: str = "high", max_tiles: int | None = None) -> VlmEngine:
        key = f"{detail}/{max_tiles}"
        if key not in made:
            made[key] = VlmEngine(
                smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(detail=detail, max_tiles=max_tiles, n_ctx=2048)
            )
        return made[key]

    yield get
    for e in made.values():
        e.close()


def _geometry(mmproj: Path) -> tuple[int, int, int]:
    """(tile size, longest edge, image tokens per tile) read straight from the mmproj keys."""
    meta = inspect_gguf(mmproj).metadata
    tile = meta["clip.vision.image_size"]
    per_tile = (tile // meta["clip.vision.patch_size"]) ** 2 // meta["clip.vision.projector.scale_factor"] ** 2
    return tile, meta["clip.vision.preproc_image_size"], per_tile


def _expected_full_tiles(w: int, h: int, tile: int, longest: int) -> int:
    # SmolVLM2's rule: scale so the longest edge is `longest`, then cut into tile-size squares.
    if w >= h:
        rw, rh = longest, int(longest / (w / h))
        rh += rh % 2
    else:
        rw, rh = int(longest * (w / h)), longest
        rw += rw % 2
    return math.ceil(rw / tile) * math.ceil(rh / tile)


def _image(w: int, h: int) -> Image.Image:
    return load_image(SAMPLE).resize((w, h))


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (100, 100), (1000, 200)])
def test_full_detail_image_tokens_follow_slicing_rule(engines, smolvlm2_gguf, size) -> None:
    tile, longest, per_tile = _geometry(smolvlm2_gguf.mmproj)
    tiles = _expected_full_tiles(*size, tile, longest)
    g = next(engines("high").ask(_image(*size), ["hi"], GenerationOptions(max_tokens=1)))
    assert g.image.tiles == tiles
    assert g.image.image_tokens == (tiles + 1) * per_tile  # the tiles + the overview
    assert g.image.encoder_passes == tiles + 1


@pytest.mark.parametrize("size", [(451, 300), (1000, 200)])
def test_low_detail_is_one_overview(engines, smolvlm2_gguf, size) -> None:
    _, _, per_tile = _geometry(smolvlm2_gguf.mmproj)
    g = next(engines("low").ask(_image(*size), ["hi"], GenerationOptions(max_tokens=1)))
    assert (g.image.detail, g.image.tiles, g.image.encoder_passes) == ("low", 0, 1)
    assert g.image.image_tokens == per_tile
    full = next(engines("high").ask(_image(*size), ["hi"], GenerationOptions(max_tokens=1)))
    assert g.prompt_tokens < full.prompt_tokens


@pytest.mark.parametrize("cap", [1, 2, 4])
def test_max_tiles_caps_the_tiling(engines, smolvlm2_gguf, cap) -> None:
    _, _, per_tile = _geometry(smolvlm2_gguf.mmproj)
    g = next(engines("auto", cap).ask(_image(1000, 700), ["hi"], GenerationOptions(max_tokens=1)))
    assert 1 <= g.image.tiles <= cap
    assert g.image.image_tokens == (g.image.tiles + 1) * per_tile


def test_auto_uses_low_for_small_images_and_caps_large_ones(engines, smolvlm2_gguf) -> None:
    tile, longest, _ = _geometry(smolvlm2_gguf.mmproj)
    small = next(engines("auto").ask(_image(tile, tile // 2), ["hi"], GenerationOptions(max_tokens=1)))
    assert small.image.detail == "low"
    big = next(engines("auto").ask(_image(tile * 6, tile * 4), ["hi"], GenerationOptions(max_tokens=1)))
    assert big.image.detail == "tiles" and 2 <= big.image.tiles <= 4
    assert big.image.tiles < _expected_full_tiles(tile * 6, tile * 4, tile, longest)


def test_greedy_is_deterministic_and_generates(engines) -> None:
    image = load_image(SAMPLE)
    a = next(engines().ask(image, ["What is this?"], GenerationOptions(max_tokens=8)))
    b = next(engines().ask(image, ["What is this?"], GenerationOptions(max_tokens=8)))
    assert a.generated_tokens == 8 and a.text
    assert a.text == b.text


def test_several_prompts_reuse_the_image_and_match_single_runs(engines) -> None:
    image = load_image(SAMPLE)
    opts = GenerationOptions(max_tokens=6)
    both = list(engines().ask(image, ["What is this?", "Is it a cat?"], opts))
    alone = next(engines().ask(image, ["Is it a cat?"], opts))
    assert both[1].text == alone.text
    assert both[1].prompt_tokens == alone.prompt_tokens
    # The image was encoded once: the second answer spent no time in the vision encoder.
    assert both[0].timings.image_encode_ms > 0 and both[1].timings.image_encode_ms == 0


def test_text_rows_decode_as_their_token_ids(engines) -> None:
    """The prompt goes to llama.cpp as embedding rows (prompt_rows.py): a text token's row gives the very
    logits its id gives, as llama.cpp's get_rows would look it up (Q8_0 rows dequantized by ggml)."""
    engine = engines()
    tokens = engine.tokenize("<|im_start|>User: What is in the picture? Describe it in detail.<end_of_utterance>")
    memory = llama.llama_get_memory(engine._ctx)
    try:
        llama.llama_memory_clear(memory, True)
        engine._decode_tokens(tokens, 0, "last")
        by_id = engine._logits_row(-1).copy()
        llama.llama_memory_clear(memory, True)
        rows = engine._prompt_input().rows(engine._ctx, 0)
        rows.add_tokens(tokens)
        assert rows.flush(logits_last=True) == len(tokens)
        np.testing.assert_array_equal(engine._logits_row(-1), by_id)
    finally:
        llama.llama_memory_clear(memory, True)
        engine._kv = []


def test_image_rows_decode_as_mtmds_helper_does(engines) -> None:
    """Cut where mtmd's helper cuts (a batch per image chunk and per run of text), the prompt's rows give
    the helper's logits to the bit: the same positions, sequence and causal decoding for image rows."""
    engine = engines()
    rgb = np.ascontiguousarray(np.asarray(load_image(SAMPLE).convert("RGB"), dtype=np.uint8))
    prompt = "User:" + mtmd.mtmd_default_marker().decode() + "What is this?<end_of_utterance>\nAssistant:"
    chunks_ptr, chunks = engine._tokenize_with_image(rgb, prompt, engine._token_cap(None))
    projector, width = engine._mtmd_context(engine._token_cap(None)), engine._prompt_input().width
    memory = llama.llama_get_memory(engine._ctx)
    try:
        assert chunks[-1].kind == "text" and sum(c.kind == "image" for c in chunks) > 1
        embds = [
            engine.image_encoder.encode(projector, c.ptr, c.n_tokens, width, engine.n_threads)
            if c.kind == "image"
            else None
            for c in chunks
        ]
        llama.llama_memory_clear(memory, True)
        n_past = 0
        for c, embd in zip(chunks, embds):
            if embd is None:
                n_past = engine._decode_tokens(c.tokens, n_past, "last" if c is chunks[-1] else "none")
                continue
            new_n_past = llama.llama_pos(n_past)
            rc = mtmd.mtmd_helper_decode_image_chunk(
                projector,
                engine._ctx,
                c.ptr,
                embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                n_past,
                0,
                engine.options.n_batch,
                ctypes.byref(new_n_past),
                mtmd.mtmd_helper_post_decode_callback(),  # none
                None,
            )
            assert rc == 0
            n_past = new_n_past.value
        helpers = engine._logits_row(-1).copy()
        llama.llama_memory_clear(memory, True)
        rows = engine._prompt_input().rows(engine._ctx, 0)
        for c, embd in zip(chunks, embds):
            rows.add_tokens(c.tokens) if embd is None else rows.add_embeddings(embd)
            rows.flush(logits_last=c is chunks[-1])
        assert rows.n_past == n_past
        np.testing.assert_array_equal(engine._logits_row(-1), helpers)
    finally:
        mtmd.mtmd_input_chunks_free(chunks_ptr)
        llama.llama_memory_clear(memory, True)
        engine._kv = []


@pytest.mark.parametrize("n_batch", [1, 7])
def test_small_batches_answer(smolvlm2_gguf, n_batch: int) -> None:
    """Batches smaller than an image chunk, and a prompt that ends on a whole batch (every prompt, at 1):
    the last batch still keeps the row generation starts from."""
    options = EngineOptions(detail="high", n_batch=n_batch, n_ctx=2048)
    with VlmEngine(smolvlm2_gguf.model, smolvlm2_gguf.mmproj, options) as engine:
        answers = list(
            engine.ask(load_image(SAMPLE), ["What is this?", "Is it a cat?"], GenerationOptions(max_tokens=4))
        )
    assert [a.generated_tokens for a in answers] == [4, 4]


def test_sampling_with_seed_is_reproducible(engines) -> None:
    image = load_image(SAMPLE)
    opts = GenerationOptions(max_tokens=8, temperature=1.5, top_p=0.95, seed=7)
    a = next(engines().ask(image, ["Describe it."], opts))
    b = next(engines().ask(image, ["Describe it."], opts))
    assert a.text == b.text


def test_streaming_callback_sees_the_answer_and_can_stop(engines) -> None:
    image = load_image(SAMPLE)
    pieces: list[str] = []
    g = next(engines().ask(image, ["Describe it."], GenerationOptions(max_tokens=8), on_token=pieces.append))
    assert "".join(pieces) == g.text
    stopped = next(engines().ask(image, ["Describe it."], GenerationOptions(max_tokens=8), on_token=lambda s: False))
    assert stopped.stop_reason == "stopped" and stopped.generated_tokens == 1


def test_generation_stops_at_end_of_utterance(engines) -> None:
    e = engines()
    assert e.tokenize("<end_of_utterance>") == [49279]
    assert 49279 in e.eos_ids


def test_prompt_is_the_smolvlm2_chat_template(engines) -> None:
    e = engines()
    assert (
        render_user_turn(e.chat_template, "What is this?")
        == "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"
    )
    chat = ChatPrompt.from_template(e.chat_template)
    assert chat.before_image == "<|im_start|>User:"
    g = next(e.ask(load_image(SAMPLE), ["What is this?"], GenerationOptions(max_tokens=1)))
    assert g.prompt == "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"


def test_prompt_longer_than_context_is_refused(smolvlm2_gguf) -> None:
    with VlmEngine(smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(n_ctx=256, detail="low")) as e:
        with pytest.raises(VlmError, match="context"):
            next(e.ask(load_image(SAMPLE), ["word " * 400], GenerationOptions(max_tokens=4)))


def test_projector_of_another_model_is_refused(smolvlm2_gguf, tmp_path: Path) -> None:
    from fixtures.smolvlm2 import build_smolvlm2_checkpoint, make_config

    from vlmcli.convert.smolvlm2 import convert_smolvlm2
    from vlmcli.errors import ModelError

    config = make_config(size="tiny")
    config["text_config"]["hidden_size"] = 128  # a wider text model: its projector makes 128-wide rows
    wider = convert_smolvlm2(
        build_smolvlm2_checkpoint(tmp_path / "SmolVLM2-wide", config, size="real"), tmp_path / "out", quant="F16"
    )
    with pytest.raises(ModelError, match="not a pair") as e:
        VlmEngine(smolvlm2_gguf.model, wider.mmproj)
    assert str(wider.mmproj) in str(e.value)


def test_encode_progress_counts_every_encoder_pass(engines) -> None:
    seen: list[tuple[int, int]] = []
    g = next(
        engines("high").ask(
            load_image(SAMPLE), ["hi"], GenerationOptions(max_tokens=1), on_progress=lambda d, t: seen.append((d, t))
        )
    )
    total = g.image.encoder_passes
    assert seen == [(i, total) for i in range(total + 1)]
