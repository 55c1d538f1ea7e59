"""SmolVLM2's vision encoder on vlm's kernels (engines/siglip.py) against mtmd's, on the tiny converted fixture.

The same chunks (mtmd's own preprocessing) go through both encoders; every form of the kernels this
CPU runs is checked, the others skip. Tolerance: i16 holds each value of x and w to 1 part in 2 x 4095
of its block's peak and bf16 to 1 part in 2^8; the errors of a block's matmuls add up like noise, so a
token's embedding keeps a cosine far above 0.999 to mtmd's F16/F32 result (the bound the issue sets).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from threading import Event

import numpy as np
import pytest

from vlmcli.engines import clip_kernels, vision_path
from vlmcli.engines.encoding_cache import EncodingCache
from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
from vlmcli.engines.llama_native import mtmd
from vlmcli.engines.siglip import PackedSiglip
from vlmcli.engines.siglip_chunks import MtmdEncoder, VlmEncoder, chunk_tiles, start_chunk_encoder
from vlmcli.engines.vision_path import KERNELS_ENV, choose_vision_path
from vlmcli.errors import VlmError
from vlmcli.gguf.reader import inspect_gguf
from vlmcli.images import load_image

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"
MIN_COSINE = 0.999


def _engine(gguf, monkeypatch: pytest.MonkeyPatch, kernels: str, **options) -> VlmEngine:
    monkeypatch.setenv(KERNELS_ENV, kernels)
    return VlmEngine(gguf.model, gguf.mmproj, EngineOptions(detail="high", n_ctx=2048, **options))


@pytest.fixture(scope="module")
def mtmd_engine(smolvlm2_gguf) -> Iterator[VlmEngine]:
    with pytest.MonkeyPatch.context() as mp:
        engine = _engine(smolvlm2_gguf, mp, "mtmd")
    yield engine
    engine.close()


def _image_chunks(engine: VlmEngine) -> tuple[object, object, list]:
    """(mtmd context, chunk list to free, the image chunks) of the sample photo at full detail."""
    rgb = np.ascontiguousarray(np.asarray(load_image(SAMPLE).convert("RGB"), dtype=np.uint8))
    ctx = engine._mtmd_context(-1)
    chunks_ptr, chunks = engine._tokenize_with_image(rgb, "User:" + mtmd.mtmd_default_marker().decode(), -1)
    return ctx, chunks_ptr, [c for c in chunks if c.kind == "image"]


@pytest.mark.parametrize("form", list(clip_kernels.FORMS))
def test_embeddings_agree_with_mtmd(smolvlm2_gguf, mtmd_engine: VlmEngine, form: str) -> None:
    if not clip_kernels.available(form):
        pytest.skip(f"this CPU lacks {clip_kernels.FORMS[form].isa}")
    info = inspect_gguf(smolvlm2_gguf.mmproj)
    ours = VlmEncoder.load(smolvlm2_gguf.mmproj, info, form, mtmd_engine.n_threads)
    width = info.metadata["clip.vision.projection_dim"]
    ctx, chunks_ptr, images = _image_chunks(mtmd_engine)
    try:
        assert len(images) == 13  # 4 x 3 tiles and the overview
        lowest = 1.0
        for chunk in images:
            assert chunk_tiles(chunk.ptr, ours.siglip.config.image_size) is not None  # the layout check holds
            want = MtmdEncoder().encode(ctx, chunk.ptr, chunk.n_tokens, width, 2)
            got = ours.encode(ctx, chunk.ptr, chunk.n_tokens, width, 2)
            cosine = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
            lowest = min(lowest, float(cosine.min()))
        assert lowest >= MIN_COSINE, lowest
    finally:
        mtmd.mtmd_input_chunks_free(chunks_ptr)
        ours.close()


@pytest.fixture(scope="module")
def smolvlm2_f16(smolvlm2_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The tiny checkpoint with an F16 language model: (model, F16 mmproj, Q8_0 mmproj)."""
    from vlmcli.convert.smolvlm2 import convert_smolvlm2

    f16 = convert_smolvlm2(smolvlm2_checkpoint, tmp_path_factory.mktemp("smolvlm2-f16"), "F16", "F16")
    q8 = convert_smolvlm2(smolvlm2_checkpoint, tmp_path_factory.mktemp("smolvlm2-f16-q8"), "F16", "Q8_0")
    return f16.model, f16.mmproj, q8.mmproj


@pytest.mark.parametrize("form", list(clip_kernels.FORMS))
def test_greedy_answers_follow_mtmd(smolvlm2_f16, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    """mtmd's greedy answers, teacher-forced through vlm's encoder: the logits move less than a quarter as
    far as mtmd's own Q8_0 projector moves them, little enough that vlm's encoder picks mtmd's token at
    most steps by construction (wherever mtmd's top two tokens are further apart than twice that move).

    The language model is F16: a random model's logits are chaotic under Q8_0's 8-bit activations (a
    change of one rounding anywhere moves them by ~2% of their scale, as much as llama.cpp's own choice
    of batch sizes does), which would drown what the encoders' formats do. Teacher forcing keeps a near
    tie at one step from making every later step a comparison of different texts."""
    if not clip_kernels.available(form):
        pytest.skip(f"this CPU does not run vlm's {form} kernels")
    model, mmproj, mmproj_q8 = smolvlm2_f16

    def engine(kernels: str, projector: Path) -> VlmEngine:
        monkeypatch.setenv(KERNELS_ENV, kernels)
        return VlmEngine(model, projector, EngineOptions(detail="high", n_ctx=2048, reuse_kv=True))

    engines = [engine("mtmd", mmproj), engine(form, mmproj), engine("mtmd", mmproj_q8)]
    try:
        mtmd_f16, ours, mtmd_q8 = engines
        assert ours.image_encoder.name == "vlm" and mtmd_f16.image_encoder.name == "mtmd"
        image = load_image(SAMPLE)
        for prompt in ["Describe this image.", "What is in the picture?"]:
            tokens: list[int] = []
            for _ in range(24):  # mtmd's greedy answer (reuse_kv: the image's cells kept from one step to the next)
                tokens.append(int(mtmd_f16.answer_logits(image, prompt, [*tokens, 0])[-1].argmax()))
            want = mtmd_f16.answer_logits(image, prompt, tokens)
            got = ours.answer_logits(image, prompt, tokens)
            moved = float(np.abs(got - want).max())
            moved_q8 = float(np.abs(mtmd_q8.answer_logits(image, prompt, tokens) - want).max())
            assert moved < moved_q8 / 4, (moved, moved_q8)
            # No logit moved more than `moved`, so wherever mtmd's top two are further apart than twice
            # that, vlm's encoder picks mtmd's token: most steps, here.
            top2 = np.sort(want, axis=1)[:, -2:]
            assert (top2[:, 1] - top2[:, 0] > 2 * moved).sum() >= len(tokens) // 2, moved
    finally:
        for e in engines:
            e.close()


def test_packing_in_the_background(smolvlm2_gguf) -> None:
    """The engine packs the projector while llama.cpp loads the model: the encoder it finishes is the one
    loaded in the foreground, and a failed load stops the packing (the weights left are skipped)."""
    info = inspect_gguf(smolvlm2_gguf.mmproj)
    form = choose_vision_path(True, info).form
    if form is None:
        pytest.skip("vlm's kernels do not run here")
    pending = start_chunk_encoder(smolvlm2_gguf.mmproj, info, True, 2)
    ours, again = pending.finish(), VlmEncoder.load(smolvlm2_gguf.mmproj, info, form, 2)
    try:
        assert isinstance(ours, VlmEncoder)
        tiles = np.random.default_rng(0).standard_normal((1, *[ours.siglip.config.image_size] * 2, 3), np.float32)
        np.testing.assert_array_equal(ours.siglip.encode(tiles), again.siglip.encode(tiles))
    finally:
        ours.close()
        again.close()
    stop = Event()
    stop.set()
    with pytest.raises(VlmError, match="stopped"):
        PackedSiglip.read(smolvlm2_gguf.mmproj, info, form, 2, stop)
    assert isinstance(start_chunk_encoder(smolvlm2_gguf.mmproj, info, False, 2).finish(), MtmdEncoder)  # a GPU


def test_embeddings_land_in_the_encoding_cache(smolvlm2_gguf, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    cache = EncodingCache(tmp_path)
    engine = _engine(smolvlm2_gguf, monkeypatch, "auto", cache=cache)
    try:
        image = load_image(SAMPLE)
        options = GenerationOptions(max_tokens=8)
        first = next(iter(engine.ask(image, ["Describe this image."], options)))
        entries = cache._entries()
        assert len(entries) == 14  # the 13 chunks' embeddings and the prefix's KV cells (the largest)
        max(entries, key=lambda e: e[1])[2].unlink()  # so the next question takes the embeddings
        second = next(iter(engine.ask(image, ["Describe this image."], options)))
        assert first.image.encoder_passes == 13 and second.image.encoder_passes == 0
        assert second.image.cached == "embd" and second.text == first.text
    finally:
        engine.close()


def test_the_choice(monkeypatch: pytest.MonkeyPatch, smolvlm2_gguf) -> None:
    info = inspect_gguf(smolvlm2_gguf.mmproj)
    monkeypatch.setenv(KERNELS_ENV, "mtmd")
    assert choose_vision_path(True, info).family == "mtmd"
    monkeypatch.setenv(KERNELS_ENV, "auto")
    assert choose_vision_path(False, info).describe() == "mtmd (GPU)"
    best = vision_path.best_form()
    if best is not None and clip_kernels.attention_available():
        assert choose_vision_path(True, info).form == best
        assert best == ("i16-vnni" if clip_kernels.available("i16-vnni") else "i16-avx2")
    info.metadata["clip.projector_type"] = "gemma3"
    other = choose_vision_path(True, info)
    assert other.form is None and ("projector" in other.reason or not clip_kernels.attention_available())
    monkeypatch.setenv(KERNELS_ENV, "fast")
    with pytest.raises(VlmError, match=KERNELS_ENV):
        choose_vision_path(True, info)
    for form in clip_kernels.FORMS:
        if not clip_kernels.available(form):
            monkeypatch.setenv(KERNELS_ENV, form)
            with pytest.raises(VlmError, match="lacks"):
                choose_vision_path(True, None)


@pytest.mark.parametrize("form", list(clip_kernels.FORMS))
def test_the_kernels_tanh_gelu(form: str) -> None:
    """act "gelu" (2 in the C struct): GELU's tanh form as the matmul's results leave the registers."""
    if not clip_kernels.available(form):
        pytest.skip(f"this CPU lacks {clip_kernels.FORMS[form].isa}")
    from vlmcli.engines.ggml import Backend, Graph

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 64), np.float32), rng.standard_normal((32, 64), np.float32) / 4
    backend = Backend(n_threads=1)
    try:
        with Graph(max_tensors=8, graph_size=16) as g:
            xin = g.input("F32", (64, 8), "x")
            out = g.output(clip_kernels.linear(g, xin, clip_kernels.pack(w, form), act="gelu"))
            backend.allocate(g)
            backend.set(xin, x)
            backend.compute(g)
            got = backend.get(out, 2)
    finally:
        backend.close()
    y = x @ w.T
    want = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
    scale = 2.0**-7 if form == "bf16" else 2.0**-10  # the product's own rounding, not the activation's
    np.testing.assert_allclose(got, want, atol=scale * np.abs(y).max())
