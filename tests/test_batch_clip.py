"""The batch machinery with the real CLIP engine (tiny fixture): embed rows and classify records
equal the CLIP tasks' own results, rows stay aligned with the metadata, texts resume too."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmcli.tasks.classify import ClassifyTask, encode_labels, label_probabilities
from vlmcli.tasks.embed import EmbedImagesTask, EmbedTextsTask, embed_texts, l2_normalize, prepare_image
from vlmcli.tasks.npy import NpySink
from vlmcli.tasks.runner import BatchOptions, run_batch
from vlmcli.tasks.sinks import JsonlSink, read_jsonl


@pytest.fixture(scope="module")
def model(clip_gguf: Path):
    from vlmcli.engines.clip import ClipModel

    m = ClipModel.load(clip_gguf, n_threads=1)
    yield m
    m.close()


@pytest.fixture()
def images(tmp_path: Path) -> list[str]:
    paths = []
    for i in range(7):
        p = tmp_path / "imgs" / f"{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((90 + 10 * i, 120, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    bad = tmp_path / "imgs" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnope")
    paths.insert(3, str(bad))
    return paths


def opts(**kw) -> BatchOptions:
    return BatchOptions(handle_sigint=False, **kw)


def engine_vectors(model, paths: list[str]) -> dict[str, np.ndarray]:
    """The engine's own embeddings of the good images, one image per call (no batch machinery)."""
    out = {}
    for p in paths:
        try:
            pixels = prepare_image(p, model.config)
        except Exception:
            continue
        out[p] = l2_normalize(model.encode_images(pixels[None]))[0]
    return out


def test_embed_rows_match_the_engine_and_stay_aligned(model, images, tmp_path: Path) -> None:
    npy = tmp_path / "emb.npy"
    s = run_batch(EmbedImagesTask(model, batch_size=3), images[:5], NpySink(npy), opts())
    assert (s.done, s.failed) == (4, 1)
    s = run_batch(EmbedImagesTask(model, batch_size=3), images, NpySink(npy), opts())
    assert (s.done, s.skipped, s.failed) == (3, 4, 1)
    arr = np.load(npy)
    meta = read_jsonl(tmp_path / "emb.jsonl")
    expected = engine_vectors(model, images)
    assert arr.shape == (7, model.config.projection_dim)
    rows = [m for m in meta if m["row"] is not None]
    assert sorted(m["path"] for m in rows) == sorted(expected)
    assert [m for m in meta if m["row"] is None] == [m for m in meta if "error" in m]
    assert len([m for m in meta if "error" in m]) == 1  # the retried failure replaced its old record
    for m in rows:
        assert m["kind"] == "image" and m["input"] == m["path"] and m["quant"] == model.config.file_type
        np.testing.assert_array_equal(arr[m["row"]], expected[m["path"]])  # batch-independent vectors


def test_texts_append_to_the_same_matrix_and_resume(model, images, tmp_path: Path) -> None:
    npy = tmp_path / "emb.npy"
    image_task = EmbedImagesTask(model, batch_size=4)
    texts = ["a photo of a cat", "a dog", "x " * 100]
    run_batch(image_task, images[:2], NpySink(npy), opts())
    s = run_batch(EmbedTextsTask(image_task), texts, NpySink(npy), opts())
    assert s.done == 3
    s = run_batch(EmbedTextsTask(image_task), texts + ["new"], NpySink(npy), opts())
    assert (s.done, s.skipped) == (1, 3)
    arr, meta = np.load(npy), read_jsonl(tmp_path / "emb.jsonl")
    assert [m["kind"] for m in meta] == ["image", "image", "text", "text", "text", "text"]
    assert [m["row"] for m in meta] == list(range(6))
    want, _ = embed_texts(model, texts + ["new"])
    np.testing.assert_array_equal(arr[2:], want)
    assert meta[4]["truncated"] is True


def test_classify_records_match_the_engine(model, images, tmp_path: Path) -> None:
    names = ["cat", "dog", "car", "tree"]
    labels = encode_labels(model, names)
    out = tmp_path / "c.jsonl"
    s = run_batch(ClassifyTask(model, labels, top_k=2, batch_size=3), images, JsonlSink(out), opts())
    assert (s.done, s.failed) == (7, 1)
    recs = read_jsonl(out)
    expected = engine_vectors(model, images)
    assert [r["path"] for r in recs] == images
    for rec in recs:
        if rec["path"] in expected:
            probs = label_probabilities(expected[rec["path"]][None], labels)[0]
            best = np.argsort(-probs, kind="stable")[:2]
            assert [x["label"] for x in rec["labels"]] == [names[j] for j in best]
            np.testing.assert_allclose(
                [x["score"] for x in rec["labels"]], probs[best], rtol=1e-12, atol=0
            )  # float64 softmax
            assert rec["label"] == names[best[0]] and rec["candidates"] == names
        else:
            assert "error" in rec and "labels" not in rec
    # Other labels are other task inputs: nothing is skipped.
    other = encode_labels(model, ["cat", "dog"])
    s = run_batch(ClassifyTask(model, other), images, JsonlSink(out), opts())
    assert s.skipped == 0 and s.done == 7
    s = run_batch(ClassifyTask(model, other), images, JsonlSink(out), opts())
    assert s.skipped == 7 and s.done == 0
    assert os.path.getsize(out) > 0
