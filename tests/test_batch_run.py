"""The batch runner and its outputs with a small pure-numpy task (mean colour), no model needed:
order, failures, resume keys, --redo, --hash, crash recovery of JSONL / CSV / .npy, sidecars, Ctrl-C, exit codes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlmcli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, VlmError
from vlmcli.images import load_image
from vlmcli.tasks.inputs import InputSpec, expand_inputs
from vlmcli.tasks.npy import NpySink, read_npy_header
from vlmcli.tasks.runner import BatchOptions, exit_code, run_batch
from vlmcli.tasks.sidecars import Sidecars
from vlmcli.tasks.sinks import CsvSink, JsonlSink, TextSink, read_jsonl
from vlmcli.tasks.task import Task


class MeanColour(Task):
    """A real, tiny task: the mean RGB of each image (as an 'embedding') and a text for it."""

    name = "meancolour"

    def __init__(self, batch_size: int = 3, tag: str = "v1", interrupt_on_call: int | None = None):
        self.batch_size = batch_size
        self.identity = {"task": self.name, "model": "mean", "quant": None, "options": {"tag": tag}}
        self.calls: list[int] = []
        self.interrupt_on_call = interrupt_on_call

    def prepare(self, path: str) -> np.ndarray:
        return np.asarray(load_image(path, max_pixels=10_000), dtype=np.float32).reshape(-1, 3).mean(axis=0) / 255

    def run(self, prepared: list[Any]) -> list[dict[str, Any] | VlmError]:
        self.calls.append(len(prepared))
        if self.interrupt_on_call is not None and len(self.calls) == self.interrupt_on_call:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C arriving while the "model" runs
        return [{"embedding": v, "text": f"rgb {v[0]:.3f} {v[1]:.3f} {v[2]:.3f}"} for v in prepared]


def text_of(rec: dict[str, Any]) -> str:
    return rec["text"]


def _img(path: Path, seed: int, size: tuple[int, int] = (16, 12), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(path, format=fmt)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """8 good images and 5 bad ones mixed in (corrupt, truncated, unsupported, too many pixels, dangling link)."""
    root = tmp_path / "in"
    for i in range(8):
        _img(root / f"good{i}.png", i)
    (root / "bad0_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(100))
    full = _img(tmp_path / "full.jpg", 99, (64, 64))
    (root / "bad1_truncated.jpg").write_bytes(full.read_bytes()[:300])
    (root / "bad2_unsupported.heic").write_bytes(b"\0\0\0\x18ftypheic" + os.urandom(40))
    _img(root / "bad3_huge.png", 5, (200, 100))  # 20,000 pixels > the task's 10,000 cap
    os.symlink(root / "gone.png", root / "bad4_dangling.png")
    return root


def _paths(root: Path) -> list[str]:
    return expand_inputs(InputSpec([str(root)])).paths


def _run(paths: list[str], sink: Any, task: MeanColour | None = None, **kw: Any):
    task = task or MeanColour()
    opts = BatchOptions(handle_sigint=kw.pop("handle_sigint", False), **kw)
    return task, run_batch(task, paths, sink, opts)


def test_records_in_input_order_with_errors_and_exit_code(folder: Path, tmp_path: Path) -> None:
    paths = _paths(folder)
    out = tmp_path / "out.jsonl"
    task, s = _run(paths, JsonlSink(out))
    recs = read_jsonl(out)
    assert [r["path"] for r in recs] == paths  # one record per image, input order
    bad = {Path(r["path"]).name: r["error"] for r in recs if "error" in r}
    assert set(bad) == {
        "bad0_corrupt.jpg",
        "bad1_truncated.jpg",
        "bad2_unsupported.heic",
        "bad3_huge.png",
        "bad4_dangling.png",
    }
    assert "pixel limit" in bad["bad3_huge.png"]
    assert "no such file" in bad["bad4_dangling.png"]
    good = [r for r in recs if "error" not in r]
    assert len(good) == 8 and all(len(r["embedding"]) == 3 and r["model"] == "mean" for r in good)
    assert all(r["file"]["size"] > 0 and "prepare_ms" in r["timings"] for r in good)
    # The model saw full batches of good images only (8 = 3 + 3 + 2).
    assert task.calls == [3, 3, 2]
    assert (s.done, s.failed, s.skipped, s.total) == (8, 5, 0, 13)
    assert exit_code(s) == EXIT_PARTIAL


def test_exit_codes(folder: Path, tmp_path: Path) -> None:
    good = [str(folder / f"good{i}.png") for i in range(3)]
    bad = [str(folder / "bad0_corrupt.jpg"), str(folder / "bad1_truncated.jpg")]
    assert exit_code(_run(good, JsonlSink(tmp_path / "a.jsonl"))[1]) == EXIT_OK
    assert exit_code(_run(bad, JsonlSink(tmp_path / "b.jsonl"))[1]) == EXIT_ERROR
    assert exit_code(_run(good + bad, JsonlSink(tmp_path / "c.jsonl"))[1]) == EXIT_PARTIAL
    assert EXIT_PARTIAL == 3 and EXIT_ERROR == 1 and EXIT_INTERRUPTED == 130


def test_resume_skips_done_retries_failed_without_duplicates(folder: Path, tmp_path: Path) -> None:
    paths = _paths(folder)
    out = tmp_path / "out.jsonl"
    _run(paths, JsonlSink(out))
    first = read_jsonl(out)
    # Fix one broken file, then rerun: the 8 done are skipped, the 5 failed are tried again.
    _img(folder / "bad0_corrupt.jpg", 42, fmt="JPEG")
    task, s = _run(paths, JsonlSink(out))
    assert (s.skipped, s.done, s.failed) == (8, 1, 4)
    recs = read_jsonl(out)
    assert sorted(r["path"] for r in recs) == sorted(paths)  # still one record per image
    assert recs[:8] == [r for r in first if "error" not in r]  # earlier results kept as they were
    fixed = [r for r in recs if r["path"].endswith("bad0_corrupt.jpg")]
    assert len(fixed) == 1 and "error" not in fixed[0]


def test_resume_redoes_changed_files_and_other_settings(folder: Path, tmp_path: Path) -> None:
    paths = [str(folder / f"good{i}.png") for i in range(4)]
    out = tmp_path / "out.jsonl"
    _run(paths, JsonlSink(out))
    _img(folder / "good2.png", 77, (20, 20))  # new content, new size and mtime
    _, s = _run(paths, JsonlSink(out))
    assert (s.skipped, s.done) == (3, 1)
    # Other task inputs (a different identity) are not "done": all run, old records stay.
    _, s = _run(paths, JsonlSink(out), MeanColour(tag="v2"))
    assert (s.skipped, s.done) == (0, 4)
    recs = read_jsonl(out)
    assert sum(r["options"]["tag"] == "v2" for r in recs) == 4
    assert sum(r["options"]["tag"] == "v1" for r in recs) == 4  # good2's stale record was replaced


def test_redo_replaces_records(folder: Path, tmp_path: Path) -> None:
    paths = [str(folder / f"good{i}.png") for i in range(4)]
    out = tmp_path / "out.jsonl"
    _run(paths, JsonlSink(out))
    _, s = _run(paths[:2], JsonlSink(out), redo=True)
    assert (s.skipped, s.done) == (0, 2)
    recs = read_jsonl(out)
    assert sorted(r["path"] for r in recs) == sorted(paths)  # replaced, not duplicated


def test_hash_key_recognises_moved_files(folder: Path, tmp_path: Path) -> None:
    paths = [str(folder / f"good{i}.png") for i in range(3)]
    out = tmp_path / "out.jsonl"
    _run(paths, JsonlSink(out), use_hash=True)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved, symlinks=True)
    moved_paths = [str(moved / f"good{i}.png") for i in range(3)]
    _, s = _run(moved_paths, JsonlSink(out), use_hash=True)
    assert (s.skipped, s.done) == (3, 0)
    _, s = _run(moved_paths, JsonlSink(out))  # path keys: new paths are new work
    assert s.done == 3
    assert all(len(r["file"].get("sha256", "")) == 64 for r in read_jsonl(out)[:3])


def test_partial_last_line_is_cut_before_appending(folder: Path, tmp_path: Path) -> None:
    paths = [str(folder / f"good{i}.png") for i in range(4)]
    out = tmp_path / "out.jsonl"
    _run(paths[:3], JsonlSink(out))
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 25])  # a crash in the middle of writing the third record
    _, s = _run(paths, JsonlSink(out))
    assert (s.skipped, s.done) == (2, 2)
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(ln) for ln in lines[:-1])
    assert [r["path"] for r in read_jsonl(out)] == paths


def test_csv_output_and_resume(folder: Path, tmp_path: Path) -> None:
    paths = _paths(folder)
    out = tmp_path / "out.csv"

    def sink() -> CsvSink:
        return CsvSink(out, ["text"], lambda r: {"text": r.get("text", "")})

    _run(paths, sink())
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == paths
    assert all(r["text"].startswith("rgb ") for r in rows if not r["error"])
    assert sum(bool(r["error"]) for r in rows) == 5
    _, s = _run(paths, sink())
    assert (s.skipped, s.failed) == (8, 5)
    with open(out, newline="") as f:
        rows2 = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows2) == sorted(paths)  # failed rows replaced, not repeated
    assert list(rows2[0]) == list(rows[0])  # one header


def test_npy_rows_align_with_metadata(folder: Path, tmp_path: Path) -> None:
    paths = _paths(folder)
    npy = tmp_path / "emb.npy"
    task, s = _run(paths, NpySink(npy))
    meta = read_jsonl(tmp_path / "emb.jsonl")
    arr = np.load(npy)
    assert arr.dtype == np.float32 and arr.shape == (8, 3)
    assert [m["path"] for m in meta] == paths
    for m in meta:
        if "error" in m:
            assert m["row"] is None
        else:
            expect = MeanColour().prepare(m["path"])
            np.testing.assert_allclose(arr[m["row"]], expect, rtol=1e-6)
    assert sorted(m["row"] for m in meta if m["row"] is not None) == list(range(8))


@pytest.mark.parametrize("crash", ["rows_without_metadata", "metadata_without_rows", "partial_metadata_line"])
def test_npy_recovers_from_a_crash_at_any_point(folder: Path, tmp_path: Path, crash: str) -> None:
    paths = [str(folder / f"good{i}.png") for i in range(8)]
    npy, meta_path = tmp_path / "emb.npy", tmp_path / "emb.jsonl"
    _run(paths[:6], NpySink(npy))
    meta = meta_path.read_bytes()
    lines = meta.split(b"\n")
    if crash == "rows_without_metadata":  # killed after appending rows, before their metadata
        meta_path.write_bytes(b"\n".join(lines[:4]) + b"\n")
    elif crash == "metadata_without_rows":  # a lost .npy tail (power loss): metadata points past the rows
        rows, dim, off = read_npy_header(npy)
        with open(npy, "r+b") as f:
            f.truncate(off + 4 * 4 * dim)
    else:
        meta_path.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:20])
    _, s = _run(paths, NpySink(npy))
    arr = np.load(npy)
    meta = read_jsonl(meta_path)
    assert sorted(m["path"] for m in meta) == sorted(paths)  # no duplicates, none missing
    assert arr.shape == (8, 3)
    for m in meta:
        np.testing.assert_allclose(arr[m["row"]], MeanColour().prepare(m["path"]), rtol=1e-6)


def test_npy_redo_and_changed_files_keep_one_row_per_image(folder: Path, tmp_path: Path) -> None:
    paths = [str(folder / f"good{i}.png") for i in range(6)]
    npy, meta_path = tmp_path / "emb.npy", tmp_path / "emb.jsonl"
    _run(paths, NpySink(npy))
    _img(folder / "good1.png", 123)  # changed since: its row must be replaced
    _, s = _run(paths[:3], NpySink(npy), redo=False)
    assert (s.done, s.skipped) == (1, 2)
    _, s = _run(paths[4:], NpySink(npy), redo=True)
    assert s.done == 2
    arr, meta = np.load(npy), read_jsonl(meta_path)
    assert sorted(m["path"] for m in meta) == sorted(paths) and arr.shape == (6, 3)
    assert sorted(m["row"] for m in meta) == list(range(6))
    for m in meta:
        np.testing.assert_allclose(arr[m["row"]], MeanColour().prepare(m["path"]), rtol=1e-6)


def test_npy_compaction_rolls_forward_after_a_crash_between_renames(folder: Path, tmp_path: Path) -> None:
    paths = [str(folder / f"good{i}.png") for i in range(4)]
    npy, meta_path = tmp_path / "emb.npy", tmp_path / "emb.jsonl"
    _run(paths, NpySink(npy))
    # Simulate: compacted .npy already renamed into place, metadata still waiting as .compact.
    arr = np.load(npy)
    meta = read_jsonl(meta_path)
    keep = [m for m in meta if not m["path"].endswith("good0.png")]
    rows = [m["row"] for m in keep]
    from vlmcli.tasks.sinks import to_json_line

    (tmp_path / "emb.jsonl.compact").write_bytes(b"".join(to_json_line({**m, "row": i}) for i, m in enumerate(keep)))
    np.save(npy, arr[rows])
    _, s = _run(paths, NpySink(npy))
    assert (s.skipped, s.done) == (3, 1)
    arr, meta = np.load(npy), read_jsonl(meta_path)
    assert not (tmp_path / "emb.jsonl.compact").exists()
    assert sorted(m["path"] for m in meta) == sorted(paths)
    for m in meta:
        np.testing.assert_allclose(arr[m["row"]], MeanColour().prepare(m["path"]), rtol=1e-6)


def test_npy_refuses_another_identity_unless_redo(folder: Path, tmp_path: Path) -> None:
    paths = [str(folder / f"good{i}.png") for i in range(3)]
    npy = tmp_path / "emb.npy"
    _run(paths, NpySink(npy))
    with pytest.raises(VlmError, match="another model or settings"):
        _run(paths, NpySink(npy), MeanColour(tag="other"))
    _, s = _run(paths[:2], NpySink(npy), MeanColour(tag="other"), redo=True)
    assert np.load(npy).shape == (2, 3) and len(read_jsonl(tmp_path / "emb.jsonl")) == 2


def test_sidecars(folder: Path, tmp_path: Path) -> None:
    paths = [str(folder / f"good{i}.png") for i in range(3)]
    (folder / "good1.txt").write_text("my own caption\n")
    task, s = _run(paths, TextSink(text_of, with_path=True), sidecars=Sidecars(), sidecar_text=text_of)
    # good1 has a sidecar already: skipped, not overwritten, not even decoded.
    assert (s.done, s.skipped) == (2, 1) and task.calls == [2]
    assert (folder / "good1.txt").read_text() == "my own caption\n"
    assert (folder / "good0.txt").read_text().startswith("rgb ")
    _, s = _run(paths, TextSink(text_of, with_path=True), sidecars=Sidecars(overwrite=True), sidecar_text=text_of)
    assert s.done == 3 and (folder / "good1.txt").read_text().startswith("rgb ")
    assert not list(folder.glob("*.tmp*"))


def test_sidecar_name_collision_is_an_error_not_a_clobber(tmp_path: Path) -> None:
    a = _img(tmp_path / "x.png", 1)
    b = _img(tmp_path / "x.jpg", 2, fmt="JPEG")
    out = tmp_path / "o.jsonl"
    _, s = _run([str(a), str(b)], JsonlSink(out), sidecars=Sidecars(overwrite=True), sidecar_text=text_of)
    assert (s.done, s.failed) == (1, 1)
    assert "already written for" in read_jsonl(out)[1]["error"]


def test_ctrl_c_stops_after_the_current_batch_and_rerun_finishes(folder: Path, tmp_path: Path) -> None:
    paths = [str(folder / f"good{i}.png") for i in range(8)]
    npy = tmp_path / "emb.npy"
    task = MeanColour(batch_size=2, interrupt_on_call=2)
    _, s = _run(paths, NpySink(npy), task, handle_sigint=True)
    assert s.interrupted and exit_code(s) == EXIT_INTERRUPTED
    assert s.done == 4 and np.load(npy).shape == (4, 3)  # the batch in flight finished and was written
    _, s = _run(paths, NpySink(npy), MeanColour(batch_size=2))
    assert (s.skipped, s.done) == (4, 4)
    meta = read_jsonl(tmp_path / "emb.jsonl")
    assert [m["path"] for m in meta] == paths and [m["row"] for m in meta] == list(range(8))


def test_plain_progress_lines_and_summary_when_stderr_is_not_a_terminal(folder: Path, tmp_path: Path, capsys) -> None:
    from vlmcli.cli.progress import BatchProgress

    paths = _paths(folder)
    opts = BatchOptions(handle_sigint=False)
    s = run_batch(MeanColour(), paths, JsonlSink(tmp_path / "o.jsonl"), opts, BatchProgress(interval=0.0))
    BatchProgress.summary_line("meancolour", s)
    out, err = capsys.readouterr()
    assert out == ""  # stdout stays for results
    lines = err.splitlines()
    assert any(
        line.startswith("meancolour: ") and f"/{len(paths)} images" in line and "images/s" in line for line in lines
    )
    assert lines[-1].startswith("meancolour: 8 done, 0 skipped, 5 failed,") and "elapsed" in lines[-1]
    # --quiet: failures only.
    run_batch(
        MeanColour(),
        paths,
        JsonlSink(tmp_path / "q.jsonl"),
        BatchOptions(handle_sigint=False),
        BatchProgress(quiet=True),
    )
    err = capsys.readouterr().err
    assert all(line.startswith("vlm: error: ") for line in err.splitlines()) and err.count("\n") == 5
