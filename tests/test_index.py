"""`vlm index`, `vlm search`, `vlm dupes` end to end: the real CLI in subprocesses, a real SQLite file, the
tiny CLIP fixture on the real engine. Rankings are checked against `vlm embed`'s own vectors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from photo_fixtures import write_photo
from PIL import Image

QUERY = "a dog on the beach"


def vlm(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_HOME": str(home)}
    env.pop("VLM_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "vlmcli", *args], capture_output=True, text=True, env=env, timeout=600, cwd=home
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(8):
        write_photo(root / ("sub" if i % 3 == 0 else "") / f"p{i}.jpg", 100 + i, (40 + 8 * i, 30 + 4 * i))
    write_photo(root / "a b.png", 200)
    return root


def _embed(model: Path, home: Path, tree: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`vlm embed`'s vectors of every image under the tree, and of the query text."""
    out = home / "embed.npy"
    out.unlink(missing_ok=True)
    out.with_suffix(".jsonl").unlink(missing_ok=True)
    vlm("embed", str(tree), "--out", str(out), "-m", str(model), "-q", home=home)
    rows = np.load(out)
    images = {os.path.abspath(r["path"]): rows[r["row"]] for r in _lines(out.with_suffix(".jsonl").read_text())}
    text = _lines(vlm("embed", "--text", QUERY, "-m", str(model), "-q", home=home).stdout)[0]
    return images, np.asarray(text["embedding"], np.float32)


def _expected_order(images: dict[str, np.ndarray], q: np.ndarray) -> list[tuple[str, float]]:
    scored = sorted(((p, float(v @ q)) for p, v in images.items()), key=lambda x: (-x[1], x[0]))
    return scored


def _check_ranking(got: list[dict], expected: list[tuple[str, float]], tol: float = 2e-6) -> None:
    """Same paths in the same order, except that images whose exact scores tie within `tol` may swap."""
    assert sorted(r["path"] for r in got) == sorted(p for p, _ in expected)
    exact = dict(expected)
    for (p, s), r in zip(expected, got):
        assert abs(r["score"] - s) <= tol + 1e-6, (r, p, s)
        assert abs(exact[r["path"]] - s) <= tol, "a different image at this rank"


def test_rankings_equal_exact_cosine_over_embeds_vectors_through_incremental_updates(
    clip_gguf: Path, tree: Path, tmp_path: Path
) -> None:
    home, db = tmp_path, str(tmp_path / "index.sqlite")
    first = vlm("index", str(tree), "--db", db, "-m", str(clip_gguf), home=home)
    assert "9 to embed" in first.stderr and "index: 9 done, 0 skipped, 0 failed" in first.stderr

    def check() -> None:
        images, q = _embed(clip_gguf, home, tree)
        got = _lines(vlm("search", QUERY, "--db", db, "-n", "100", "--json", home=home).stdout)
        _check_ranking(got, _expected_order(images, q))
        assert {r["model"] for r in got} == {clip_gguf.stem}
        probe = sorted(images)[0]  # image-to-image: the same ranking with the image's own vector as the query
        by_image = _lines(vlm("search", "--image", probe, "--db", db, "-n", "100", "--json", home=home).stdout)
        _check_ranking(by_image, _expected_order(images, images[probe]))
        assert by_image[0]["path"] == probe and by_image[0]["score"] == pytest.approx(1.0, abs=1e-5)

    check()
    # add, change, move (and rename), copy, delete
    write_photo(tree / "new.jpg", 300, (64, 64))
    write_photo(tree / "p1.jpg", 301, (50, 50))
    (tree / "sub" / "deeper").mkdir()
    shutil.move(tree / "p2.jpg", tree / "sub" / "deeper" / "renamed.jpg")
    shutil.copy2(tree / "p4.jpg", tree / "p4 copy.jpg")
    (tree / "p5.jpg").unlink()
    second = vlm("index", str(tree), "--db", db, "-m", str(clip_gguf), home=home)
    assert "6 unchanged, 2 moved or renamed, 2 to embed, 2 removed" in second.stderr
    assert "index: 2 done, 8 skipped, 0 failed" in second.stderr
    check()
    with sqlite3.connect(db) as c:
        n_files, n_shas = c.execute("SELECT COUNT(*), COUNT(DISTINCT sha256) FROM files").fetchone()
        n_vectors = c.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    assert (n_files, n_shas, n_vectors) == (10, 9, 9)  # the copy shares its original's vector; none left over

    third = vlm("index", str(tree), "--db", db, "-m", str(clip_gguf), home=home)
    assert "10 unchanged, 0 moved or renamed, 0 to embed, 0 removed" in third.stderr


def test_search_forms_filters_and_errors(clip_gguf: Path, tree: Path, tmp_path: Path) -> None:
    home, db = tmp_path, str(tmp_path / "index.sqlite")
    vlm("index", str(tree), "--db", db, "-m", str(clip_gguf), "-q", home=home)
    paths = vlm("search", "dog", "+", "beach", "-", "night", "--db", db, "--paths", "-n", "3", home=home).stdout
    assert len(paths.splitlines()) == 3 and all(os.path.isfile(p) for p in paths.splitlines())
    table = vlm("search", "dog", "--db", db, "-n", "2", home=home).stdout.splitlines()
    assert len(table) == 2 and table[0].split("  ", 1)[1] in paths.splitlines() + [
        os.path.abspath(p) for p in tree.rglob("*")
    ]
    sub = _lines(vlm("search", "dog", "--db", db, "--in", str(tree / "sub"), "--json", home=home).stdout)
    assert sorted(Path(r["path"]).name for r in sub) == ["p0.jpg", "p3.jpg", "p6.jpg"]
    assert vlm("search", "dog", "--db", db, "--since", "2999-01-01", "--json", home=home).stdout == ""

    missing = vlm("search", "dog", "--db", str(tmp_path / "none.sqlite"), home=home, check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"vlm: error: {tmp_path / 'none.sqlite'}: no index here yet (build one with `vlm index PATH`)"
    ]
    empty = vlm("search", "--db", db, home=home, check=False)
    assert empty.returncode == 2 and "the query is empty" in empty.stderr
    bad_date = vlm("search", "x", "--db", db, "--since", "yesterday", home=home, check=False)
    assert bad_date.returncode == 2 and "--since: not a date" in bad_date.stderr


def test_a_broken_file_is_reported_and_the_rest_indexed(clip_gguf: Path, tree: Path, tmp_path: Path) -> None:
    (tree / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = vlm("index", str(tree), "--db", str(tmp_path / "i.sqlite"), "-m", str(clip_gguf), home=tmp_path, check=False)
    assert r.returncode == 3
    assert f"vlm: error: {tree / 'broken.jpg'}: cannot decode image" in r.stderr
    assert "index: 9 done, 0 skipped, 1 failed" in r.stderr


def test_dupes_groups_copies_and_resized_versions_and_keeps_the_largest(
    clip_gguf: Path, tree: Path, tmp_path: Path
) -> None:
    original = tree / "p7.jpg"
    with Image.open(original) as im:
        im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC).save(tree / "p7 large.jpg", quality=95)
    shutil.copy(original, tree / "sub" / "p7 again.jpg")
    home, db = tmp_path, str(tmp_path / "index.sqlite")
    vlm("index", str(tree), "--db", db, "-m", str(clip_gguf), "-q", home=home)
    groups = _lines(vlm("dupes", "--db", db, "--threshold", "0.995", "--json", home=home).stdout)
    mine = [g for g in groups if str(original) in [f["path"] for f in g["files"]]]
    assert len(mine) == 1
    group = mine[0]
    assert {Path(f["path"]).name for f in group["files"]} == {"p7.jpg", "p7 large.jpg", "p7 again.jpg"}
    assert group["keeper"] == str(tree / "p7 large.jpg")
    assert {"a": str(original), "b": str(tree / "sub" / "p7 again.jpg"), "score": 1.0} in group["pairs"]
    table = vlm("dupes", "--db", db, "--threshold", "0.995", home=home)
    assert "keep" in table.stdout and str(tree / "p7 large.jpg") in table.stdout
    assert "of near-duplicates among" in table.stderr
    assert all(Path(f["path"]).exists() for g in groups for f in g["files"])  # never deletes


def test_kill_9_during_a_run_loses_nothing_and_the_rerun_finishes_without_duplicates(
    clip_gguf: Path, tmp_path: Path
) -> None:
    root = tmp_path / "many"
    for i in range(400):
        write_photo(root / f"{i // 100}" / f"{i:03d}.png", 1000 + i, (32, 32))
    db = tmp_path / "index.sqlite"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "vlmcli", "index", str(root), "--db", str(db), "-m", str(clip_gguf), "-b", "4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as c:
                    committed = c.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
            except sqlite3.OperationalError:
                committed = 0
        if committed >= 8:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        kept = c.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        assert kept == c.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    assert 8 <= kept < 400
    rerun = vlm("index", str(root), "--db", str(db), "-m", str(clip_gguf), home=tmp_path)
    assert f"{kept} unchanged, 0 moved or renamed, {400 - kept} to embed, 0 removed" in rerun.stderr
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*), COUNT(DISTINCT path), COUNT(DISTINCT sha256) FROM files").fetchone() == (
            400,
            400,
            400,
        )
        assert c.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == 400
    # what survived the kill ranks exactly as a fresh embed of the same files
    images, q = _embed(clip_gguf, tmp_path, root)
    got = _lines(vlm("search", QUERY, "--db", str(db), "-n", "400", "--json", home=tmp_path).stdout)
    _check_ranking(got, _expected_order(images, q))


def test_captions_are_stored_once_per_content_and_searchable_as_full_text(
    clip_gguf: Path, smolvlm2_gguf, tmp_path: Path
) -> None:
    root = tmp_path / "few"
    for i in range(3):
        write_photo(root / f"c{i}.jpg", 400 + i, (64, 48))
    shutil.copy(root / "c0.jpg", root / "c0 copy.jpg")
    db = str(tmp_path / "index.sqlite")
    vlm_folder = str(Path(smolvlm2_gguf.model).parent)
    args = ["index", str(root), "--db", db, "-m", str(clip_gguf), "--captions", "--caption-model", vlm_folder]
    first = vlm(*args, "--threads", "1", home=tmp_path)
    assert "captioning 3 images" in first.stderr  # the copy shares its original's caption
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT sha256, model, detail, text FROM captions").fetchall()
    assert len(rows) == 3 and {r[2] for r in rows} == {"auto"}
    again = vlm(*args, "--threads", "1", home=tmp_path)
    assert "captioning" not in again.stderr

    sha, _, _, text = next(r for r in rows if any(ch.isalnum() for ch in r[3]))
    word = next(w for w in text.split() if any(ch.isalnum() for ch in w))
    got = _lines(vlm("search", word, "--db", db, "-n", "10", "--json", home=tmp_path).stdout)
    matched = [r for r in got if r.get("text_score")]
    assert matched, got
    for r in got:
        assert r["score"] == pytest.approx(r["clip_score"] + 0.1 * r["text_score"], abs=2e-6)
        assert "caption" in r


def test_two_models_share_one_index(clip_gguf: Path, clip_gguf_gelu: Path, tree: Path, tmp_path: Path) -> None:
    home, db = tmp_path, str(tmp_path / "index.sqlite")
    vlm("index", str(tree), "--db", db, "-m", str(clip_gguf), "-q", home=home)
    second = vlm("index", str(tree), "--db", db, "-m", str(clip_gguf_gelu), home=home)
    assert "0 unchanged, 0 moved or renamed, 9 to embed" in second.stderr  # same files, new model
    with sqlite3.connect(db) as c:
        per_model = dict(c.execute("SELECT model, COUNT(*) FROM vectors GROUP BY model").fetchall())
        assert c.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 9
    assert per_model == {clip_gguf.stem: 9, clip_gguf_gelu.stem: 9}

    both = vlm("search", "dog", "--db", db, home=home, check=False)
    assert both.returncode == 1 and "several models" in both.stderr and "--model" in both.stderr
    for model in (clip_gguf, clip_gguf_gelu):
        got = _lines(vlm("search", "dog", "--db", db, "-m", str(model), "--json", "-n", "3", home=home).stdout)
        assert {r["model"] for r in got} == {model.stem}
        assert vlm("dupes", "--db", db, "-m", str(model), "--json", home=home).returncode == 0
    # Re-indexing with one model leaves the other's vectors alone.
    (tree / "p1.jpg").unlink()
    vlm("index", str(tree), "--db", db, "-m", str(clip_gguf), "-q", home=home)
    with sqlite3.connect(db) as c:
        kept = dict(c.execute("SELECT model, COUNT(*) FROM vectors GROUP BY model").fetchall())
    assert kept == {clip_gguf.stem: 8, clip_gguf_gelu.stem: 8}  # p1's content is gone from both
