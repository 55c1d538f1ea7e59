"""Several images and text-only prompts: vlm's token sequence against the layout transformers' SmolVLM
processor and chat template give, and each image served from the encoding cache on its own.

The reference is written here from transformers' processing_smolvlm.py (an image's prompt string: its
tiles row by row, each `<fake_token_around_image><row_R_col_C>` and its image tokens, a newline after
each row, then a blank line and the overview `<fake_token_around_image><global-img>...`; an unsplit
image is the overview alone) and the chat template rendered with plain jinja2 as transformers renders
it; the text is tokenized with the fixture model's own vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path

import jinja2
import pytest
from fixtures.smolvlm2 import IMAGE_TOKEN_ID
from PIL import Image

from vlmcli.engines.encoding_cache import EncodingCache
from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
from vlmcli.engines.prompt import Turn
from vlmcli.errors import ContextOverflow
from vlmcli.images import load_image

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"
SIZES = [(451, 300), (200, 300), (120, 90)]  # a wide photo, a tall one, one smaller than a tile


@pytest.fixture(scope="module")
def engines(smolvlm2_gguf):
    made: dict[str, VlmEngine] = {}

    def get(detail: str) -> VlmEngine:
        if detail not in made:
            made[detail] = VlmEngine(
                smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(detail=detail, n_ctx=4096, n_threads=2)
            )
        return made[detail]

    yield get
    for e in made.values():
        e.close()


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    base = load_image(SAMPLE)
    return [base.resize(s).rotate(90 * i) if i else base.resize(s) for i, s in enumerate(SIZES)]


def _image_string(rows: int, cols: int, n: int) -> str:
    overview = f"<fake_token_around_image><global-img>{'<image>' * n}<fake_token_around_image>"
    if rows == 0:
        return overview
    grid = "".join(
        "".join(f"<fake_token_around_image><row_{r}_col_{c}>" + "<image>" * n for c in range(1, cols + 1)) + "\n"
        for r in range(1, rows + 1)
    )
    return grid + "\n" + overview


def _full_grid(w: int, h: int, engine: VlmEngine) -> tuple[int, int]:
    """transformers' tiling: the longest edge resized to the preprocessor's, sides rounded up to whole tiles."""
    longest, tile = engine.vision.longest_edge, engine.vision.tile_size
    if w >= h:
        rw, rh = longest, int(longest / (w / h))
    else:
        rw, rh = int(longest * (w / h)), longest
    return math.ceil(rh / tile), math.ceil(rw / tile)


def _grids_in(ids: list[int], engine: VlmEngine) -> list[tuple[int, int]]:
    """Each image's (rows, cols) as the row/col tokens in a token sequence give them ((0, 0): unsplit)."""
    cells = {engine.tokenize(f"<row_{r}_col_{c}>")[0]: (r, c) for r in range(1, 7) for c in range(1, 7)}
    (overview,) = engine.tokenize("<global-img>")
    grids, block = [], []
    for t in ids:
        if t == overview:
            grids.append((max(r for r, _ in block), max(c for _, c in block)) if block else (0, 0))
            block = []
        elif t in cells:
            block.append(cells[t])
    return grids


def reference(engine: VlmEngine, question: str, grids: list[tuple[int, int]]) -> list[int]:
    content = [{"type": "image"} for _ in grids] + [{"type": "text", "text": question}]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(engine.chat_template).render(
        messages=[{"role": "user", "content": content}], add_generation_prompt=True
    )
    pieces = text.split("<image>")
    n = engine.vision.tokens_per_tile
    out = pieces[0]
    for (rows, cols), after in zip(grids, pieces[1:]):
        out += _image_string(rows, cols, n) + after
    return engine.tokenize(out)


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("detail", ["low", "high", "auto"])
def test_several_images_are_laid_out_as_the_processor_does(engines, photos, count: int, detail: str) -> None:
    engine = engines(detail)
    images = photos[:count]
    ids = engine.layout(images, "What changed?")
    if detail == "low":
        grids = [(0, 0)] * count
    elif detail == "high":
        grids = [_full_grid(im.width, im.height, engine) for im in images]
    else:
        # auto on a CPU: at most 4 tiles (mtmd's cap picks the grid), the small image unsplit
        grids = _grids_in(ids, engine)
        assert grids[-1 if count == 3 else 0] == ((0, 0) if count == 3 else grids[0])
        assert all(r * c <= 4 for r, c in grids) and grids[0] != (0, 0)
    assert ids == reference(engine, "What changed?", grids)
    assert ids.count(IMAGE_TOKEN_ID) == sum(r * c + 1 for r, c in grids) * engine.vision.tokens_per_tile


def test_a_text_only_prompt_is_the_template_without_images(engines) -> None:
    engine = engines("low")
    assert engine.layout(None, "Say hi.") == engine.tokenize("<|im_start|>User: Say hi.<end_of_utterance>\nAssistant:")
    g = next(engine.ask(None, ["Say hi."], GenerationOptions(max_tokens=3)))
    assert (g.image.image_tokens, g.media, g.generated_tokens) == (0, [], 3)
    assert g.prompt_tokens == len(engine.layout(None, "Say hi."))


def test_answers_about_several_images_report_each(engines, photos) -> None:
    engine = engines("low")
    g = next(engine.ask(photos[:2], ["What changed?"], GenerationOptions(max_tokens=2)))
    assert [(e.width, e.height, e.detail) for e in g.media] == [(451, 300, "low"), (200, 300, "low")]
    assert g.image.image_tokens == 2 * engine.vision.tokens_per_tile
    assert g.prompt_tokens == len(engine.layout(photos[:2], "What changed?"))
    assert g.prompt.count("<image>") == 2


def test_each_image_is_cached_on_its_own(smolvlm2_gguf, photos, tmp_path: Path) -> None:
    opts = EngineOptions(detail="high", n_ctx=4096, n_threads=2, cache=EncodingCache(tmp_path))
    with VlmEngine(smolvlm2_gguf.model, smolvlm2_gguf.mmproj, opts) as engine:
        a, b = photos[0], photos[1]
        first = next(engine.ask([a, b], ["Same?"], GenerationOptions(max_tokens=2)))
        assert all(e.encoder_passes > 0 and e.cached is None for e in first.media)
        swapped = next(engine.ask([b, a], ["Same?"], GenerationOptions(max_tokens=2)))
        assert [(e.encoder_passes, e.cached) for e in swapped.media] == [(0, "embd"), (0, "embd")]
        again = next(engine.ask([a, b], ["Other question?"], GenerationOptions(max_tokens=2)))
        assert [e.cached for e in again.media] == ["kv", "kv"]  # the whole media prefix from the cache


def test_too_many_images_for_the_context_say_how_many_tokens_they_need(smolvlm2_gguf, photos) -> None:
    with VlmEngine(
        smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(detail="high", n_ctx=128, n_threads=2)
    ) as engine:
        with pytest.raises(ContextOverflow, match=r"for 3 images\), more than the context of") as e:
            next(engine.ask(photos, ["Compare them."]))
        assert e.value.image_tokens == sum(
            (r * c + 1) * engine.vision.tokens_per_tile for r, c in (_full_grid(*s, engine) for s in SIZES)
        )


def test_a_conversation_reuses_its_history_in_the_kv_cache(smolvlm2_gguf, photos) -> None:
    opts = EngineOptions(detail="low", n_ctx=4096, n_threads=2, reuse_kv=True)
    with VlmEngine(smolvlm2_gguf.model, smolvlm2_gguf.mmproj, opts) as engine:
        turns = [Turn("user", ("What is this?",), media=((0, "image"),))]
        g1 = next(engine.chat_turns([photos[0]], turns, GenerationOptions(max_tokens=4)))
        turns += [Turn("assistant", (g1.text,)), Turn("user", ("And this one?",), media=((0, "image"),))]
        g2 = next(engine.chat_turns([photos[0], photos[1]], turns, GenerationOptions(max_tokens=4)))
        assert g2.media[0].cached == "kv" and g2.media[0].encoder_passes == 0  # the first turn's image was kept
        assert g2.media[1].encoder_passes == 1
        assert g2.timings.prefill_tokens < g2.prompt_tokens  # only the new turn was evaluated
    with VlmEngine(
        smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(detail="low", n_ctx=4096, n_threads=2)
    ) as fresh:
        cold = next(fresh.chat_turns([photos[0], photos[1]], turns, GenerationOptions(max_tokens=4)))
    assert (cold.text, cold.prompt_tokens) == (g2.text, g2.prompt_tokens)
