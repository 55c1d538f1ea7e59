"""`vlm caption` / `vlm ask` in batch mode on the tiny SmolVLM2 (real llama.cpp, real files, real processes):
every input form, outputs, sidecars, exit codes, resume after a killed run and after Ctrl-C."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from photo_fixtures import write_photo

from vlmcli.cli import main

MAX_TOKENS = "4"


@pytest.fixture()
def model_args(smolvlm2_gguf) -> list[str]:
    # One thread: the tiny model gains nothing from two, and spinning threads on a busy machine cost a lot.
    return ["-m", str(smolvlm2_gguf.model), "--mmproj", str(smolvlm2_gguf.mmproj), "--threads", "1", "-n", MAX_TOKENS]


def run_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stdin: bytes | None = None
) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_caption_folder_jsonl_to_stdout_with_a_corrupt_file(photos, model_args, capsys, monkeypatch) -> None:
    code, out, err = run_cli(["caption", str(photos), *model_args], capsys, monkeypatch)
    recs = jsonl(out)
    assert [os.path.relpath(r["path"], photos) for r in recs] == ["a.jpg", "b b.png", "sub/c.jpg", "sub/d.jpg"]
    assert code == 3  # EXIT_PARTIAL
    good, bad = recs[:3], recs[3]
    assert all(r["caption"] and r["model"].endswith("-Q8_0.gguf") and r["quant"] == "Q8_0" for r in good)
    assert all(r["prompt"] == "Describe this image in one sentence." and r["options"]["max_tokens"] == 4 for r in good)
    assert all(r["tokens"]["generated"] <= 4 and "decode_ms" in r["timings"] for r in good)
    assert "cannot decode" in bad["error"] and "caption" not in bad
    assert f"vlm: error: {photos / 'sub' / 'd.jpg'}" in err
    assert "3 done, 0 skipped, 1 failed" in err and "images/s" in err


def test_single_image_prints_just_the_caption_and_batch_gives_the_same_text(
    photos, model_args, capsys, monkeypatch
) -> None:
    code, out, err = run_cli(["caption", str(photos / "a.jpg"), *model_args], capsys, monkeypatch)
    assert code == 0 and out.count("\n") == 1 and "\t" not in out and "done" not in err
    code, out2, _ = run_cli(["caption", str(photos / "**" / "*.jpg"), *model_args], capsys, monkeypatch)
    first = jsonl(out2)[0]
    assert first["path"].endswith("a.jpg") and " ".join(first["caption"].split()) == out.strip()


def test_single_bad_image_is_a_plain_error(photos, model_args, capsys, monkeypatch) -> None:
    code, out, err = run_cli(["caption", str(photos / "sub" / "d.jpg"), *model_args], capsys, monkeypatch)
    assert code == 1 and out == ""
    assert err.strip().startswith(f"vlm: error: {photos / 'sub' / 'd.jpg'}: cannot decode image")


def test_several_named_files_give_path_tab_caption(photos, model_args, capsys, monkeypatch) -> None:
    code, out, _ = run_cli(
        ["caption", str(photos / "a.jpg"), str(photos / "b b.png"), *model_args], capsys, monkeypatch
    )
    lines = out.splitlines()
    assert code == 0 and [ln.split("\t")[0] for ln in lines] == [str(photos / "a.jpg"), str(photos / "b b.png")]


def test_stdin_nul_separated_names_with_spaces_and_newlines(tmp_path, model_args, capsys, monkeypatch) -> None:
    names = [
        write_photo(tmp_path / "x y.jpg", 4),
        write_photo(tmp_path / "line\nbreak.png", 5),
        write_photo(tmp_path / "plain.jpg", 6),
    ]
    data = b"".join(os.fsencode(p) + b"\0" for p in names)
    code, out, _ = run_cli(["caption", "-", "-0", *model_args], capsys, monkeypatch, stdin=data)
    assert code == 0 and [r["path"] for r in jsonl(out)] == [str(p) for p in names]
    # Newline-separated, and --files-from with an --exclude.
    lst = tmp_path / "list.txt"
    lst.write_text(f"{names[0]}\n{names[2]}\n")
    code, out, _ = run_cli(
        ["caption", "--files-from", str(lst), "--exclude", "plain*", *model_args], capsys, monkeypatch
    )
    assert code == 0 and [r["path"] for r in jsonl(out)] == [str(names[0])]
    code, out, _ = run_cli(
        ["caption", "-", *model_args], capsys, monkeypatch, stdin=f"{names[2]}\n{names[0]}\n".encode()
    )
    assert [r["path"] for r in jsonl(out)] == [str(names[2]), str(names[0])]


def test_csv_out_and_resume(photos, tmp_path, model_args, capsys, monkeypatch) -> None:
    out_csv = tmp_path / "captions.csv"
    code, out, err = run_cli(["caption", str(photos), "--out", str(out_csv), *model_args], capsys, monkeypatch)
    assert code == 3 and out == ""
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [os.path.basename(r["path"]) for r in rows] == ["a.jpg", "b b.png", "c.jpg", "d.jpg"]
    assert all(r["caption"] for r in rows[:3]) and rows[3]["error"] and rows[0]["quant"] == "Q8_0"
    code, _, err = run_cli(["caption", str(photos), "--out", str(out_csv), *model_args], capsys, monkeypatch)
    assert code == 3 and "0 done, 3 skipped, 1 failed" in err
    # Another prompt is other task inputs: nothing is skipped.
    code, _, err = run_cli(
        ["caption", str(photos), "--out", str(out_csv), "-p", "Tags?", *model_args], capsys, monkeypatch
    )
    assert "3 done, 0 skipped, 1 failed" in err
    with open(out_csv, newline="") as f:
        assert len(list(csv.DictReader(f))) == 8


def test_sidecars_never_overwrite_unless_asked(photos, model_args, capsys, monkeypatch) -> None:
    (photos / "a.txt").write_text("hand-written caption\n")
    code, out, err = run_cli(["caption", str(photos), "--sidecar", *model_args], capsys, monkeypatch)
    assert code == 3 and out == ""
    assert (photos / "a.txt").read_text() == "hand-written caption\n"
    assert (photos / "b b.txt").read_text().strip() and (photos / "sub" / "c.txt").exists()
    assert not (photos / "sub" / "d.txt").exists()  # no sidecar for a failed image
    assert "2 done, 1 skipped, 1 failed" in err
    code, _, err = run_cli(["caption", str(photos), "--sidecar", "--overwrite", *model_args], capsys, monkeypatch)
    assert (photos / "a.txt").read_text() != "hand-written caption\n" and "3 done" in err


def test_ask_batch_one_record_per_image_and_single_streams(photos, model_args, capsys, monkeypatch) -> None:
    code, out, err = run_cli(["ask", str(photos), "What is it?", "Colours?", *model_args], capsys, monkeypatch)
    recs = jsonl(out)
    assert code == 3 and len(recs) == 4
    assert [a["prompt"] for a in recs[0]["answers"]] == ["What is it?", "Colours?"]
    assert recs[0]["prompts"] == ["What is it?", "Colours?"] and "error" in recs[3]
    code, out, err = run_cli(["ask", str(photos / "a.jpg"), "What is it?", *model_args], capsys, monkeypatch)
    assert code == 0 and not out.startswith("{") and out.strip() == recs[0]["answers"][0]["answer"].strip()


def test_all_failed_exits_1(tmp_path, model_args, capsys, monkeypatch) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, out, err = run_cli(["caption", str(bad), *model_args], capsys, monkeypatch)
    assert code == 1 and len(jsonl(out)) == 2 and "0 done, 0 skipped, 2 failed" in err


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "vlmcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            count = path.read_bytes().count(b"\n")
            if count >= n:
                return count
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("how", ["sigkill", "sigint"])
def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path, model_args, how) -> None:
    folder = tmp_path / "many"
    n = 40
    for i in range(n):
        write_photo(folder / f"{i:02d}.jpg", 100 + i)
    (folder / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out.jsonl"
    args = ["caption", str(folder), "--out", str(out), *model_args[:-1], "8"]
    proc = _spawn(args)
    seen = _wait_for_lines(out, 3, proc)
    proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert 3 <= seen
    before = out.read_bytes()
    n_before = before.count(b"\n")
    assert n_before < n + 1, "the run finished before it could be interrupted"
    if how == "sigint":
        assert proc.returncode == 130 and b"interrupted" in err
        assert before.endswith(b"\n")  # the first Ctrl-C lets the current image finish
    else:
        assert proc.returncode == -signal.SIGKILL
    rerun = subprocess.run([sys.executable, "-m", "vlmcli", *args], capture_output=True)
    assert rerun.returncode == 3, rerun.stderr
    recs = [json.loads(line) for line in out.read_bytes().splitlines()]
    paths = [r["path"] for r in recs]
    assert sorted(paths) == sorted([str(folder / f"{i:02d}.jpg") for i in range(n)] + [str(folder / "zz_bad.jpg")])
    assert len(set(paths)) == len(paths)
    done_before = sum(1 for line in before.splitlines() if line.endswith(b"}") and b'"error"' not in line)
    assert f"{done_before} skipped".encode() in rerun.stderr
