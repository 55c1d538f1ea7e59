"""`vlm classify` and `vlm embed` end to end (subprocesses running the real ggml engine on the tiny
fixture converted by the real converter), plus the task functions they are built on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmcli.engines.clip_tokenizer import default_tokenizer
from vlmcli.tasks.sinks import Sink

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"
JSON_ROUNDING = 0.5e-7 + 2**-24  # JSON rounds components to 7 decimals (tasks/sinks.py), read back as float32
LONG_TEXT = " ".join(["a very long caption"] * 40)  # well over 77 tokens


def vlm(*args: str, cwd: Path | None = None, kernels: str | None = None) -> subprocess.CompletedProcess:
    """The CLI; kernels sets VLM_CLIP_KERNELS ("auto": what a user's machine runs, the default)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_HOME": str(cwd or Path.cwd())}
    env.pop("VLM_DEBUG", None)
    if kernels:
        env["VLM_CLIP_KERNELS"] = kernels
    return subprocess.run(
        [sys.executable, "-m", "vlmcli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clip-images")
    cat = d / "cat.jpg"
    cat.write_bytes(SAMPLE.read_bytes())
    a = np.zeros((180, 320, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 320)[None, :]
    a[..., 2] = np.linspace(255, 0, 180)[:, None]
    grad = d / "gradient.png"
    Image.fromarray(a).save(grad)
    bad = d / "broken.jpg"
    bad.write_bytes(b"this is not an image")
    return {"cat": cat, "gradient": grad, "bad": bad, "missing": d / "missing.png"}


@pytest.fixture(scope="module")
def model(clip_gguf: Path):
    from vlmcli.engines.clip import ClipModel

    with ClipModel.load(clip_gguf, n_threads=2) as m:
        yield m


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("vlm: error:")]


# --- tasks (in-process, real engine) ----------------------------------------------------------------------


class ListSink(Sink):
    """Every record, in order, in a list (the runner's real output path, without a file)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write_batch(self, records: list[dict]) -> None:
        self.records += records


def _classify(model, paths, labels, k: int, batch_size: int = 8) -> list[dict]:
    from vlmcli.tasks.classify import ClassifyTask
    from vlmcli.tasks.runner import BatchOptions, run_batch

    sink = ListSink()
    run_batch(
        ClassifyTask(model, labels, k, batch_size=batch_size),
        [str(p) for p in paths],
        sink,
        BatchOptions(handle_sigint=False),
    )
    return sink.records


def test_classify_is_softmax_of_scaled_cosines(model, images) -> None:
    from vlmcli.tasks.classify import encode_labels
    from vlmcli.tasks.embed import prepare_image

    labels = encode_labels(model, ["cat", "dog", "car", "tree"])
    records = _classify(model, [images["cat"], images["gradient"]], labels, k=4)

    pixels = np.stack([prepare_image(images["cat"], model.config), prepare_image(images["gradient"], model.config)])
    img = model.encode_images(pixels)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = model.encode_texts(
        default_tokenizer().tokenize([f"a photo of a {x}." for x in ["cat", "dog", "car", "tree"]])[0]
    )
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    logits = 100.0 * img @ txt.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert labels.logit_scale == pytest.approx(100.0, rel=1e-5)
    for row, rec in zip(probs, records):
        assert [x["label"] for x in rec["labels"]] == [["cat", "dog", "car", "tree"][j] for j in np.argsort(-row)]
        np.testing.assert_allclose([x["score"] for x in rec["labels"]], np.sort(row)[::-1], rtol=1e-4, atol=1e-6)
        assert sum(x["score"] for x in rec["labels"]) == pytest.approx(1.0, abs=1e-6)
        assert (rec["label"], rec["score"]) == (rec["labels"][0]["label"], rec["labels"][0]["score"])


def test_template_ensemble_is_mean_of_normalised_prompts(model) -> None:
    from vlmcli.tasks.classify import encode_labels
    from vlmcli.tasks.embed import embed_texts

    templates = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    ens = encode_labels(model, ["cat", "dog"], templates)
    single, _ = embed_texts(model, [t.replace("{}", "dog") for t in templates])
    expected = single.mean(0) / np.linalg.norm(single.mean(0))
    np.testing.assert_allclose(ens.vectors[1], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ens.vectors, axis=1), 1.0, rtol=1e-6)


def test_templates_need_a_placeholder(model) -> None:
    from vlmcli.errors import VlmError
    from vlmcli.tasks.classify import encode_labels

    with pytest.raises(VlmError, match="no \\{\\}"):
        encode_labels(model, ["cat"], ["a photo"])
    with pytest.raises(VlmError, match="no labels"):
        encode_labels(model, [])


def test_bad_image_keeps_its_place(model, images) -> None:
    from vlmcli.tasks.classify import encode_labels

    labels = encode_labels(model, ["cat", "dog"])
    paths = [images["cat"], images["bad"], images["gradient"], images["missing"], images["cat"]]
    records = _classify(model, paths, labels, k=1, batch_size=2)
    assert [r["path"] for r in records] == [str(p) for p in paths]
    assert ["error" in r for r in records] == [False, True, False, True, False]
    assert "not a supported image" in records[1]["error"] and "no such file" in records[3]["error"]
    # the same image in another batch gives the same answer
    assert records[0]["label"] == records[4]["label"]
    assert records[0]["score"] == pytest.approx(records[4]["score"], abs=1e-4)


def test_embed_texts_flags_truncation(model) -> None:
    from vlmcli.tasks.embed import embed_texts

    vectors, truncated = embed_texts(model, ["a cat", LONG_TEXT], batch_size=1)
    assert truncated == [False, True]
    assert vectors.shape == (2, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)


def test_batch_size_does_not_change_embeddings(model, images) -> None:
    from vlmcli.tasks.embed import EmbedImagesTask
    from vlmcli.tasks.runner import BatchOptions, run_batch

    paths = [str(images["cat"]), str(images["gradient"]), str(images["cat"])]
    runs = []
    for batch_size in (1, 3):
        sink = ListSink()
        run_batch(EmbedImagesTask(model, batch_size), paths, sink, BatchOptions(handle_sigint=False))
        runs.append(np.stack([r["embedding"] for r in sink.records]))
    np.testing.assert_array_equal(runs[0], runs[1])  # a vector does not depend on its batch (engines/clip.py)


# --- vlm classify -----------------------------------------------------------------------------------------


def test_classify_table_with_a_bad_image(clip_gguf: Path, images, tmp_path: Path) -> None:
    r = vlm(
        "classify",
        str(images["cat"]),
        str(images["bad"]),
        str(images["gradient"]),
        "--labels",
        "cat, dog,car",
        "--model",
        str(clip_gguf),
        cwd=tmp_path,
    )
    assert r.returncode == 3, r.stderr  # finished, but an input failed
    assert "Traceback" not in r.stderr
    assert _error_lines(r.stderr) == [f"vlm: error: {images['bad']}: not a supported image (unrecognised format)"]
    out = r.stdout
    assert out.count("label") == 2 and str(images["cat"]) in out and str(images["gradient"]) in out
    assert str(images["bad"]) not in out
    for label in ("cat", "dog", "car"):
        assert out.count(f" {label} ") == 2
    scores = [float(tok) for tok in out.split() if tok.count(".") == 1 and tok.replace(".", "").isdigit()]
    assert len(scores) == 6 and sum(scores) == pytest.approx(2.0, abs=2e-3)


def test_classify_json_labels_file_templates_top_k(clip_gguf: Path, images, model, tmp_path: Path) -> None:
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# animals\ncat\n\ndog\ncar\ntraffic light\n", encoding="utf-8")
    templates = ["a photo of a {}.", "itap of a {}."]
    r = vlm(
        "classify",
        str(images["cat"]),
        str(images["gradient"]),
        "--labels-file",
        str(labels_file),
        "--template",
        templates[0],
        "--template",
        templates[1],
        "--top-k",
        "2",
        "--json",
        "--model",
        str(clip_gguf),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    records = _json_lines(r.stdout)
    assert [rec["path"] for rec in records] == [str(images["cat"]), str(images["gradient"])]

    from vlmcli.tasks.classify import encode_labels

    expected = _classify(
        model,
        [images["cat"], images["gradient"]],
        encode_labels(model, ["cat", "dog", "car", "traffic light"], templates),
        k=2,
    )
    for rec, exp in zip(records, expected):
        assert rec["model"] == clip_gguf.stem
        assert len(rec["labels"]) == 2
        assert [x["label"] for x in rec["labels"]] == [x["label"] for x in exp["labels"]]
        np.testing.assert_allclose(
            [x["score"] for x in rec["labels"]], [x["score"] for x in exp["labels"]], rtol=1e-3, atol=1e-6
        )
        assert rec["labels"][0]["score"] >= rec["labels"][1]["score"]


def test_classify_all_images_bad(clip_gguf: Path, images, tmp_path: Path) -> None:
    r = vlm(
        "classify",
        str(images["bad"]),
        str(images["missing"]),
        "--labels",
        "cat,dog",
        "--json",
        "--model",
        str(clip_gguf),
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert len(_error_lines(r.stderr)) == 2 and "Traceback" not in r.stderr
    records = _json_lines(r.stdout)
    assert [rec["path"] for rec in records] == [str(images["bad"]), str(images["missing"])]
    assert all("error" in rec and "labels" not in rec for rec in records)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--labels", " , ,"], "label list is empty"),
        ([], "--labels"),
    ],
)
def test_classify_refuses_missing_labels(
    clip_gguf: Path, images, tmp_path: Path, args: list[str], message: str
) -> None:
    r = vlm("classify", str(images["cat"]), *args, "--model", str(clip_gguf), cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.startswith("vlm: error:") and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_classify_empty_labels_file(clip_gguf: Path, images, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    r = vlm("classify", str(images["cat"]), "--labels-file", str(empty), "--model", str(clip_gguf), cwd=tmp_path)
    assert r.returncode == 2 and f"vlm: error: {empty}: the label list is empty" in r.stderr


# --- vlm embed --------------------------------------------------------------------------------------------


def test_embed_npy_and_sidecar(clip_gguf: Path, images, tmp_path: Path) -> None:
    out = tmp_path / "emb" / "vectors.npy"
    r = vlm(
        "embed",
        str(images["cat"]),
        str(images["bad"]),
        str(images["gradient"]),
        "--text",
        "a photo of a cat",
        "--text",
        LONG_TEXT,
        "--out",
        str(out),
        "--verbose",
        "--model",
        str(clip_gguf),
        cwd=tmp_path,
    )
    assert r.returncode == 3, r.stderr
    assert _error_lines(r.stderr) == [f"vlm: error: {images['bad']}: not a supported image (unrecognised format)"]
    assert "truncated to 77 tokens" in r.stderr
    vectors = np.load(out)
    assert vectors.shape == (4, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    meta = _json_lines(out.with_suffix(".jsonl").read_text(encoding="utf-8"))
    assert [{k: m[k] for k in ("row", "input", "kind", "model")} for m in meta if m["row"] is not None] == [
        {"row": 0, "input": str(images["cat"]), "kind": "image", "model": clip_gguf.stem},
        {"row": 1, "input": str(images["gradient"]), "kind": "image", "model": clip_gguf.stem},
        {"row": 2, "input": "a photo of a cat", "kind": "text", "model": clip_gguf.stem},
        {"row": 3, "input": LONG_TEXT, "kind": "text", "model": clip_gguf.stem},
    ]
    failed = [m for m in meta if m["row"] is None]
    assert len(failed) == 1 and failed[0]["input"] == str(images["bad"]) and failed[0]["error"]
    assert r.stdout == ""
    # the rows are what separate runs produce: image and text embedded on their own (JSONL on stdout)
    texts = tmp_path / "texts.txt"
    texts.write_text("a photo of a cat\n\n", encoding="utf-8")
    img_run = vlm("embed", str(images["cat"]), "--model", str(clip_gguf), cwd=tmp_path)
    txt_run = vlm("embed", "--text-file", str(texts), "--model", str(clip_gguf), cwd=tmp_path)
    assert img_run.returncode == 0 and txt_run.returncode == 0, img_run.stderr + txt_run.stderr
    (img_rec,), (txt_rec,) = _json_lines(img_run.stdout), _json_lines(txt_run.stdout)
    assert img_rec["kind"] == "image" and img_rec["row"] == 0 and img_rec["input"] == str(images["cat"])
    assert txt_rec["kind"] == "text" and txt_rec["input"] == "a photo of a cat" and txt_rec["model"] == clip_gguf.stem
    img, txt = np.array(img_rec["embedding"], np.float32), np.array(txt_rec["embedding"], np.float32)
    assert np.linalg.norm(img) == pytest.approx(1.0, abs=1e-5) and np.linalg.norm(txt) == pytest.approx(1.0, abs=1e-5)
    # The same vectors (batch-independent), up to the 7 decimals JSON records keep.
    np.testing.assert_allclose(img, vectors[0], rtol=0, atol=JSON_ROUNDING)
    np.testing.assert_allclose(txt, vectors[2], rtol=0, atol=JSON_ROUNDING)
    assert float(img @ txt) == pytest.approx(float(vectors[0] @ vectors[2]), abs=2 * JSON_ROUNDING * len(img))


def test_embed_on_this_cpus_default_kernels(clip_gguf: Path, images, tmp_path: Path, monkeypatch) -> None:
    """What a user runs (VLM_CLIP_KERNELS unset: vlm's kernels where the CPU has them): the same rows in a
    batch as alone, and within BF16's reach of ggml's ops on the file's own types (cosine 0.999, issue 14's bar)."""
    out = tmp_path / "auto.npy"
    inputs = [
        str(images["cat"]),
        str(images["gradient"]),
        "--text",
        "a photo of a cat",
        "--text",
        "a gradient, blue to red",
    ]
    r = vlm("embed", *inputs, "--out", str(out), "--model", str(clip_gguf), cwd=tmp_path, kernels="auto")
    assert r.returncode == 0, r.stderr
    batch = np.load(out)
    alone = vlm(
        "embed",
        str(images["gradient"]),
        "--text",
        "a gradient, blue to red",
        "--model",
        str(clip_gguf),
        cwd=tmp_path,
        kernels="auto",
    )
    assert alone.returncode == 0, alone.stderr
    rows = np.array([rec["embedding"] for rec in _json_lines(alone.stdout)], np.float32)
    np.testing.assert_allclose(rows, batch[[1, 3]], rtol=0, atol=JSON_ROUNDING)
    stored = tmp_path / "ggml.npy"
    r = vlm("embed", *inputs, "--out", str(stored), "--model", str(clip_gguf), cwd=tmp_path, kernels="ggml")
    assert r.returncode == 0, r.stderr
    assert (np.sum(batch * np.load(stored), axis=1) >= 0.999).all()  # both L2-normalised
    from vlmcli.engines.clip_path import choose_path

    monkeypatch.delenv("VLM_CLIP_KERNELS", raising=False)
    if choose_path(on_cpu=True).form is not None:  # vlm's kernels ran, not ggml's ops: other bits
        assert not np.array_equal(batch, np.load(stored))


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "nothing to embed"),
        (["--text", "x", "--out", "e.jsonl"], "sidecar"),
    ],
)
def test_embed_usage_errors(clip_gguf: Path, tmp_path: Path, args: list[str], message: str) -> None:
    r = vlm("embed", *args, "--model", str(clip_gguf), cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_text_arguments_must_be_utf8(clip_gguf: Path, images, tmp_path: Path) -> None:
    for option, args in (
        ("--text", [b"embed", b"--text", b"\xffcat"]),
        ("--labels", [b"classify", str(images["cat"]).encode(), b"--labels", b"cat,d\xf6g"]),
    ):
        r = subprocess.run(
            [sys.executable.encode(), b"-m", b"vlmcli", *args, b"--model", str(clip_gguf).encode()],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr == f"vlm: error: {option}: the text is not valid UTF-8\n"


def test_wrong_model_file(images, tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf at all")
    r = vlm("embed", "--text", "x", "--model", str(not_gguf), cwd=tmp_path)
    assert r.returncode == 1 and f"vlm: error: {not_gguf}:" in r.stderr and "Traceback" not in r.stderr


def test_labels_are_printed_verbatim_not_as_markup(clip_gguf: Path, images) -> None:
    # Rich would read "[/cat]" as a closing tag (and crash) and "[red]" as a style.
    r = vlm("classify", str(images["cat"]), "--labels", "[/cat],[red]car,dog", "--model", str(clip_gguf))
    assert r.returncode == 0, r.stderr
    assert "[/cat]" in r.stdout and "[red]car" in r.stdout
