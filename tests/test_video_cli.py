"""The CLI on videos and several files: a folder mixing photos, videos and bad videos (one error record
each, the batch goes on), --segments (a record per segment, resumed as such), ask -i records listing
every input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_video import _audio_only, write_video  # skips this module too where PyAV is missing

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"


@pytest.fixture(scope="module")
def model_dir(smolvlm2_folder) -> Path:
    return smolvlm2_folder("video-cli-model")


def vlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmcli", *args], capture_output=True, text=True, timeout=600)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_of_photos_and_videos(model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "a.jpg")
    write_video(folder / "b.mp4", frames=10, fps=5)
    (folder / "c.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))  # unreadable
    _audio_only(folder / "d.mkv")  # a container with no video stream
    out = tmp_path / "captions.jsonl"
    r = vlm("caption", str(folder), "--out", str(out), "--model", str(model_dir), "-n", "3", "--detail", "low")
    assert r.returncode == 3, r.stderr  # some inputs failed, the others were done
    by_name = {Path(rec["path"]).name: rec for rec in records(out)}
    assert sorted(by_name) == ["a.jpg", "b.mp4", "c.mp4", "d.mkv"]
    assert "caption" in by_name["a.jpg"] and "media" not in by_name["a.jpg"]  # a photo's record as ever
    video = by_name["b.mp4"]["media"][0]
    assert (video["kind"], video["duration"], video["frames"]) == ("video", 2.0, [0.0, 1.8])
    assert "cannot read this video" in by_name["c.mp4"]["error"]
    assert "no video stream" in by_name["d.mkv"]["error"]
    again = vlm("caption", str(folder), "--out", str(out), "--model", str(model_dir), "-n", "3", "--detail", "low")
    assert "2 skipped" in again.stderr  # the good ones are done; the bad ones are tried again


def test_segments_are_records_and_resume(model_dir: Path, tmp_path: Path) -> None:
    video = write_video(tmp_path / "long.mkv", frames=24, fps=2)  # 12 s
    out = tmp_path / "segments.jsonl"
    args = ("caption", str(video), "--segments", "5s", "--out", str(out), "--model", str(model_dir), "-n", "2")
    r = vlm(*args)
    assert r.returncode == 0, r.stderr
    got = records(out)
    assert [(s["segment"]["start"], s["segment"]["end"]) for s in got] == [(0, 5), (5, 10), (10, 12)]
    assert all(s["path"] == str(video) for s in got)
    assert "3 skipped" in vlm(*args).stderr
    text = vlm("caption", str(video), "--segments", "5s", "--model", str(model_dir), "-n", "2")
    assert [line.split("\t")[1][:13] for line in text.stdout.splitlines()] == [
        "[00:00-00:05]",
        "[00:05-00:10]",
        "[00:10-00:12]",
    ]
    assert vlm("caption", str(video), "--segments", "soon", "--model", str(model_dir)).returncode == 2


def test_ask_with_several_files_and_none(model_dir: Path, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", frames=10, fps=5)
    r = vlm("ask", "-i", str(SAMPLE), "-i", str(clip), "Same cat?", "--json", "--model", str(model_dir), "-n", "2")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["inputs"] == [str(SAMPLE), str(clip)] and rec["prompts"] == ["Same cat?"]
    assert [m["kind"] for m in rec["media"]] == ["image", "video"]
    assert rec["tokens"]["image"] == sum(m["image_tokens"] for m in rec["media"])
    text = vlm("ask", "--no-image", "Say hi.", "--json", "--model", str(model_dir), "-n", "2")
    assert json.loads(text.stdout)["tokens"]["image"] == 0
    bad = vlm("ask", "-i", str(tmp_path / "missing.mp4"), "?", "--model", str(model_dir))
    assert bad.returncode == 1 and bad.stderr.startswith("vlm: error: ") and "missing.mp4" in bad.stderr
    long = vlm("ask", "-i", str(SAMPLE), "-i", str(SAMPLE), "word " * 600, "--model", str(model_dir), "--ctx", "256")
    assert long.stderr.startswith(f"vlm: error: {SAMPLE} + {SAMPLE}: the prompt needs ")  # the files, named
    both = vlm("ask", "-i", str(SAMPLE), "--no-image", "?", "--model", str(model_dir))
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_without_pyav_one_line_says_what_to_install(model_dir: Path, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", frames=4, fps=2)
    code = (
        "import sys; sys.modules['av'] = None; from vlmcli.cli import main; "
        f"sys.argv = ['vlm', 'ask', {str(clip)!r}, '?', '--model', {str(model_dir)!r}]; main()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "vlm: error: reading videos needs PyAV: pip install 'vlmcli[video]' (or: pip install av)"
    ]
