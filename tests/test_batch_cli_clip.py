"""`vlm classify` / `vlm embed` in batch mode on the tiny CLIP (real ggml, real files, real processes):
folders, stdin lists, CSV, .npy + metadata alignment after a killed run, texts with resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def vlm(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "vlmcli", *args], capture_output=True, input=stdin, timeout=600)


def _img(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40 + seed % 7, 50, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "pics"
    for i in range(6):
        _img(root / ("deep" if i % 2 else "") / f"p{i}.jpg", i)
    (root / "deep" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    return root


def jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_classify_folder_csv_resume_and_exit_codes(folder: Path, tmp_path: Path, clip_gguf: Path) -> None:
    out = tmp_path / "labels.csv"
    args = ["classify", str(folder), "--labels", "cat,dog,car", "-k", "2", "--out", str(out), "--model", str(clip_gguf)]
    r = vlm(*args)
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"" and b"6 done, 0 skipped, 1 failed" in r.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and sum(bool(x["error"]) for x in rows) == 1
    good = [x for x in rows if not x["error"]]
    assert all(x["label"] in ("cat", "dog", "car") and 0 < float(x["score"]) <= 1 for x in good)
    r = vlm(*args)
    assert r.returncode == 3 and b"0 done, 6 skipped, 1 failed" in r.stderr
    # JSONL to stdout for a folder; a table for a named file.
    r = vlm("classify", str(folder), "--labels", "cat,dog", "--model", str(clip_gguf), "--quiet")
    recs = jsonl(r.stdout)
    # Sorted by name at each level, folders in their place among the files ("deep" < "p0.jpg").
    assert [os.path.relpath(x["path"], folder) for x in recs] == [
        "deep/p1.jpg",
        "deep/p3.jpg",
        "deep/p5.jpg",
        "deep/zz_bad.jpg",
        "p0.jpg",
        "p2.jpg",
        "p4.jpg",
    ]
    assert all(x["labels"][0]["label"] == x["label"] for x in recs if "error" not in x)


def test_embed_stdin_nul_list(tmp_path: Path, clip_gguf: Path) -> None:
    names = [_img(tmp_path / "a b.png", 1), _img(tmp_path / "new\nline.png", 2)]
    r = vlm("embed", "-", "-0", "--model", str(clip_gguf), stdin=b"\0".join(os.fsencode(p) for p in names))
    assert r.returncode == 0, r.stderr
    recs = jsonl(r.stdout)
    assert [x["path"] for x in recs] == [str(p) for p in names] and [x["row"] for x in recs] == [0, 1]
    assert all(abs(np.linalg.norm(x["embedding"]) - 1) < 1e-5 for x in recs)


def test_embed_killed_mid_run_resumes_with_rows_aligned(tmp_path: Path, clip_gguf: Path) -> None:
    root = tmp_path / "many"
    n = 240
    for i in range(n):
        _img(root / f"{i:03d}.png", i)
    (root / "100_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "emb.npy"
    meta = tmp_path / "emb.jsonl"
    args = ["embed", str(root), "--out", str(out), "--batch-size", "4", "--threads", "1", "--model", str(clip_gguf)]
    proc = subprocess.Popen([sys.executable, "-m", "vlmcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        if meta.exists() and meta.read_bytes().count(b"\n") >= 12:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    n_meta = meta.read_bytes().count(b"\n")
    assert 12 <= n_meta < n + 1, "the run finished before it could be killed"
    r = vlm(*args)
    assert r.returncode == 3, r.stderr
    arr = np.load(out)
    recs = jsonl(meta.read_bytes())
    assert sorted(x["path"] for x in recs) == sorted(str(p) for p in root.iterdir())  # none missing, none twice
    good = [x for x in recs if x["row"] is not None]
    assert arr.shape[0] == len(good) == n and sorted(x["row"] for x in good) == list(range(n))
    # Each row is the embedding of its own file: compare a few with a fresh single-image run.
    for x in (good[0], good[len(good) // 2], good[-1]):
        one = jsonl(vlm("embed", x["path"], "--model", str(clip_gguf)).stdout)[0]
        np.testing.assert_allclose(
            arr[x["row"]], one["embedding"], rtol=0, atol=0.5e-7 + 2**-24
        )  # JSON keeps 7 decimals; float32 read back


def test_embed_images_and_texts_resume_without_duplicates(folder: Path, tmp_path: Path, clip_gguf: Path) -> None:
    out = tmp_path / "e.npy"
    args = ["embed", str(folder), "--text", "a cat", "--text", "a dog", "--out", str(out), "--model", str(clip_gguf)]
    assert vlm(*args).returncode == 3
    r = vlm(*args, "--text", "a car")
    assert r.returncode == 3 and b"1 done, 8 skipped, 1 failed" in r.stderr
    recs = jsonl((tmp_path / "e.jsonl").read_bytes())
    texts = [x["input"] for x in recs if x["kind"] == "text"]
    assert texts == ["a cat", "a dog", "a car"]
    assert np.load(out).shape[0] == 9 == len([x for x in recs if x["row"] is not None])
    # Another model's rows never mix into the same matrix.
    other = tmp_path / "other.gguf"
    other.write_bytes(clip_gguf.read_bytes())
    r = vlm("embed", str(folder), "--out", str(out), "--model", str(other))
    assert r.returncode == 1 and b"another model or settings" in r.stderr
