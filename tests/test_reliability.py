"""Reliability, second round (issue 36): what a fault campaign found, each through the real `vlm` CLI.

Images of any shape in bounded memory and time; errors one line, naming the file; a NUL byte in a
path list; a full disk. The server's supervisor is tested in tests/test_reliability_serve.py.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import fuzzing as fz
import pytest

# Peak resident memory of the `vlm` child, read by a small parent of its own (RUSAGE_CHILDREN of this
# test process would hold the peak of every child the test run has waited for).
_MEASURE = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(r.returncode)\n"
)


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_HOME": str(home)}
    env.pop("VLM_DEBUG", None)
    return env


def vlm(
    *args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlmcli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or _env(cwd),
        input=stdin,
        timeout=300,
        **kw,
    )


def vlm_measured(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], int, float]:
    """The run, the child's peak RSS in bytes, and its wall time."""
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", _MEASURE, sys.executable, "-m", "vlmcli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(cwd),
        timeout=300,
    )
    seconds = time.monotonic() - t0
    *lines, peak = r.stderr.rstrip("\n").split("\n")
    r.stderr = "\n".join(lines)
    return r, int(peak) * 1024, seconds


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode > 0, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlm: error: "), r.stderr
    return lines[0]


MB = 2**20


@pytest.fixture(scope="module")
def strips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("strips")
    out = {}
    for name, (w, h) in {"1x64000000": (1, 64_000_000), "16x1000000": (16, 1_000_000)}.items():
        out[name] = d / f"{name}.png"
        out[name].write_bytes(fz.gray_png(w, h))
    return out


# --- 1. any image shape in bounded memory and time ----------------------------------------------------


@pytest.mark.parametrize("command", ["ask", "classify"])
def test_a_1x64000000_png_is_refused_at_once_naming_its_shape(command, strips, smolvlm2_gguf, clip_gguf, tmp_path):
    """110 bytes of PNG, exactly the default pixel cap: 4.5 GB and 16-20 s in mtmd before (1.4 GB in classify)."""
    image = strips["1x64000000"]
    if command == "ask":
        model = ["--model", str(smolvlm2_gguf.model), "--mmproj", str(smolvlm2_gguf.mmproj), "--detail", "low"]
        r, peak, seconds = vlm_measured("ask", str(image), "What is this?", *model, cwd=tmp_path)
    else:
        model = ["--model", str(clip_gguf)]
        r, peak, seconds = vlm_measured("classify", str(image), "--labels", "a,b", *model, cwd=tmp_path)
    line = one_error_line(r)
    assert str(image) in line and "1x64000000" in line and "65,536:1" in line
    assert peak < 400 * MB, peak
    assert seconds < 30


def test_a_16x1000000_strip_is_scaled_down_before_mtmd(strips, smolvlm2_gguf, tmp_path):
    """16 M pixels within every limit: mtmd was handed the whole strip (about 500 MB more, at a low detail
    that uses one 512 px overview); it now gets it scaled to what its resize keeps."""
    image = strips["16x1000000"]
    model = ["--model", str(smolvlm2_gguf.model), "--mmproj", str(smolvlm2_gguf.mmproj)]
    r, peak, _ = vlm_measured("ask", str(image), "What?", *model, "--detail", "low", "--max-tokens", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert peak < 450 * MB, peak


# --- 2. errors quote a short prefix of what a file holds ----------------------------------------------


def _misread(clip_gguf: Path, how: str, out: Path) -> Path:
    layout = fz.parse_gguf(clip_gguf.read_bytes())
    if how == "n_dims":  # one dimension fewer: the next tensor's name is read from tensor data
        t = layout.tensors[2]
        data = fz.splice(layout, t.dims_at, t.dims_at + 4, struct.pack("<I", len(t.dims) - 1))
    else:  # a key's length: its name runs through the rest of the header
        kv = layout.kvs[3]
        size = struct.pack("<Q", len(layout.raw) // 2)
        data = fz.rebuild(layout, layout.raw[: kv.start] + size + layout.raw[kv.start + 8 : layout.infos_end])
    out.write_bytes(data)
    return out


@pytest.mark.parametrize("how", ["n_dims", "key_length"])
def test_a_misread_name_is_not_quoted_whole(how, strips, clip_gguf, tmp_path):
    """A tensor's n_dims one off made the error quote the next 'name': 27 MB of tensor data on stderr
    in 10-20 s and 600 MB of memory, for a CLIP file of a few MB."""
    bad = _misread(Path(clip_gguf), how, tmp_path / "bad-clip.gguf")
    image = tmp_path / "small.png"
    image.write_bytes(fz.png_bytes(8, 8))
    r, peak, seconds = vlm_measured("classify", str(image), "--labels", "a,b", "--model", str(bad), cwd=tmp_path)
    line = one_error_line(r)
    assert "bad-clip.gguf" in line and "corrupt" in line
    assert len(r.stderr) < 300, len(r.stderr)
    assert seconds < 30 and peak < 400 * MB, (seconds, peak)


# --- 3. a NUL byte in a newline-separated path list -------------------------------------------------


@pytest.mark.parametrize(
    "command,via",
    [("ask", "stdin"), ("caption", "files-from"), ("embed", "stdin"), ("embed", "files-from")],
)
def test_a_nul_byte_in_a_path_list_fails_that_line_only(command, via, smolvlm2_gguf, clip_gguf, tmp_path):
    """It stopped the whole batch with `vlm: error: ValueError: embedded null byte`, naming nothing; a
    leading NUL made ask and caption read the line as a group of files."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(fz.png_bytes(16, 12))
    listing = "a.png\nbad\0name.png\n\0b.png\nb.png\n"
    vlm_model = ["--model", str(smolvlm2_gguf.model), "--mmproj", str(smolvlm2_gguf.mmproj), "--max-tokens", "1"]
    args = {
        "ask": ["ask", "-", "What?", *vlm_model, "--out", "out.jsonl"],
        "caption": ["caption", *vlm_model, "--out", "out.jsonl"],
        "embed": ["embed", "--model", str(clip_gguf), "--out", "out.npy"],
    }[command]
    if via == "stdin":
        if command != "ask":
            args.insert(1, "-")
        r = vlm(*args, cwd=tmp_path, stdin=listing)
    else:
        (tmp_path / "list.txt").write_text(listing)
        r = vlm(*args, "--files-from", "list.txt", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "ValueError" not in r.stderr, r.stderr
    where = "standard input" if via == "stdin" else "list.txt"
    assert f"{where} line 2: the path holds a NUL byte" in r.stderr
    assert f"{where} line 3: the path holds a NUL byte" in r.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    by_path = {rec["path"]: rec for rec in records}
    assert set(by_path) == {"a.png", "bad\u2400name.png", "\u2400b.png", "b.png"}
    assert "error" not in by_path["a.png"] and "error" not in by_path["b.png"]
    assert by_path["bad\u2400name.png"]["error"] == by_path["\u2400b.png"]["error"] == "no such file"


# --- 4. a full disk names the file, and the run resumes after it -------------------------------------


class SmallDisk:
    """A 64 KB tmpfs with 12 KB free (root), or else the child's file-size limit at 4 KB (EFBIG, which
    the sinks take as they take ENOSPC; VLM_TEST_NO_MOUNT=1 tries it as root). `free()` makes room for the
    resumed run."""

    def __init__(self, root: Path):
        self.dir = root / "small"
        self.dir.mkdir()
        mounted = (
            os.geteuid() == 0
            and not os.environ.get("VLM_TEST_NO_MOUNT")
            and (
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(self.dir)], capture_output=True)
            ).returncode
            == 0
        )
        self.mounted = mounted
        self.limit: int | None = None
        if mounted:
            (self.dir / "filler").write_bytes(b"\0" * 52 * 1024)
        else:
            self.limit = 4096

    def preexec(self) -> None:
        if self.limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.limit))

    def free(self) -> None:
        if self.mounted:
            (self.dir / "filler").unlink()
        self.limit = None

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.dir)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path)
    yield disk
    disk.close()


@pytest.mark.parametrize("out", ["out.npy", "out.jsonl"])
def test_a_full_disk_names_the_file_and_the_resume_loses_nothing(out, small_disk, clip_gguf, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(60):
        (images / f"{i:02d}.png").write_bytes(fz.png_bytes(16, 12, seed=i))
    target = small_disk.dir / out
    command = ["embed"] if out.endswith(".npy") else ["classify", "--labels", "a,b"]
    args = [*command, str(images), "--model", str(clip_gguf), "--out", str(target), "--batch-size", "4"]
    r = vlm(*args, cwd=tmp_path, preexec_fn=small_disk.preexec)
    line = one_error_line(r)
    assert "No space left on device" in line or "File too large" in line, line
    assert str(small_disk.dir) in line and "kept" in line and "run the same command again" in line
    meta = target.with_suffix(".jsonl")
    first = meta.read_bytes()
    assert first.endswith(b"\n")  # the batch that did not fit was cut: no torn line
    done_first = {json.loads(x)["path"] for x in first.splitlines()}
    assert 0 < len(done_first) < 60

    small_disk.free()
    r = vlm(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in meta.read_bytes().splitlines()]
    paths = [rec["path"] for rec in records]
    assert sorted(paths) == sorted(str(p) for p in images.iterdir())  # none lost, none twice
    assert done_first <= set(paths) and not any("error" in rec for rec in records)
    if out.endswith(".npy"):
        import numpy as np

        assert np.load(target).shape[0] == 60 and sorted(rec["row"] for rec in records) == list(range(60))


# --- 6. library warnings only under --debug -----------------------------------------------------------

DATA = Path(__file__).resolve().parent / "data"


def _bad_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF block points past its end: Pillow warns 'Tag data larger than file'."""
    from PIL import Image

    ifd = struct.pack("<IH", 8, 2) + struct.pack("<HHII", 0x010F, 2, 64, 1000) + struct.pack("<HHII", 0x0112, 3, 1, 1)
    Image.new("RGB", (32, 24), (200, 30, 60)).save(path, "JPEG", exif=b"Exif\0\0II*\0" + ifd + b"\0\0\0\0")
    return path


def test_a_corrupt_tiff_is_one_error_line_libtiff_only_under_debug(clip_gguf, tmp_path):
    """libtiff printed 'tempfile.tif: Using code not yet in table.' on stderr before vlm's own line."""
    image = DATA / "corrupt-lzw.tif"  # an LZW TIFF with 8 bits flipped
    args = ["classify", str(image), "--labels", "a,b", "--model", str(clip_gguf)]
    line = one_error_line(vlm(*args, cwd=tmp_path))
    assert str(image) in line and "cannot decode" in line
    debug = vlm("--debug", *args, cwd=tmp_path)
    assert "Using code not yet in table" in debug.stderr


def test_a_pillow_warning_is_shown_only_under_debug(clip_gguf, tmp_path):
    image = _bad_exif_jpeg(tmp_path / "bad-exif.jpg")
    args = ["classify", str(image), "--labels", "a,b", "--model", str(clip_gguf)]
    r = vlm(*args, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "Tag data larger than file" in vlm("--debug", *args, cwd=tmp_path).stderr


# --- 7. a damaged encoding-cache entry is recomputed, and -v says so ---------------------------------


def test_a_damaged_cache_entry_is_recomputed_and_noted_under_verbose(smolvlm2_gguf, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(fz.png_bytes(64, 48, seed=3))
    cache = tmp_path / "cache"
    env = {"VLM_CACHE_DIR": str(cache)}
    model = ["--model", str(smolvlm2_gguf.model), "--mmproj", str(smolvlm2_gguf.mmproj), "--max-tokens", "4"]
    args = ["ask", str(image), "What is this?", *model, "--json"]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return vlm(*args, *extra, cwd=tmp_path, env={**_env(tmp_path), **env})

    first = run()
    assert first.returncode == 0, first.stderr
    entries = sorted(cache.rglob("*.enc"))
    assert entries

    def damage() -> None:
        for p in cache.rglob("*.enc"):
            data = bytearray(p.read_bytes())
            data[-1] ^= 0xFF  # the payload no longer matches its checksum
            p.write_bytes(bytes(data))

    damage()
    quiet = run()
    assert quiet.returncode == 0 and "note" not in quiet.stderr, quiet.stderr
    damage()
    noted = run("-v")
    assert noted.returncode == 0, noted.stderr
    notes = [line for line in noted.stderr.splitlines() if line.startswith("vlm: note: encoding cache entry")]
    assert notes and all("damaged" in line and "encoded again" in line for line in notes), noted.stderr
    answer = [json.loads(r.stdout)["answers"][0]["answer"] for r in (first, quiet, noted)]
    assert answer[0] == answer[1] == answer[2]


# --- a photo index locked for good by another process ------------------------------------------------

# Another process holding the index: an exclusive lock that no reader gets past, until stdin closes
# (or, given seconds, until they pass).
_HOLD_LOCK = (
    "import sqlite3, sys, time\n"
    "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "c.execute('PRAGMA locking_mode=EXCLUSIVE')\n"
    "c.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "time.sleep(float(sys.argv[2])) if len(sys.argv) > 2 else sys.stdin.read()\n"
)


def _hold_lock(db: Path, *seconds: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(db), *seconds], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


@pytest.fixture
def index_file(tmp_path) -> Path:
    """An index of one image's vector (dupes reads it without loading a model)."""
    import numpy as np

    from vlmcli.index.db import FileRow, IndexDB, ModelRef

    db = tmp_path / "photos.sqlite"
    model = ModelRef("clip-test", "ab" * 32)
    with IndexDB(db) as index:
        index.put_model(model)
        with index.transaction() as c:
            IndexDB.put_vector(c, "cd" * 32, model, np.ones(8, np.float32) / np.sqrt(8))
            IndexDB.put_files(c, [FileRow(str(tmp_path / "a.jpg"), 1, 1, "cd" * 32)])
    return db


def test_a_locked_index_is_one_named_error_within_seconds(index_file, tmp_path):
    """SQLite's 60 s busy timeout made a reader wait a minute for a lock that never went away (search
    and dupes open the index alike; `vlm index` waits WRITE_WAIT_S: tests/test_index_db.py)."""
    from vlmcli.index.db import READ_WAIT_S

    holder = _hold_lock(index_file)
    try:
        t0 = time.monotonic()
        r = vlm("search", "a photo", "--db", str(index_file), cwd=tmp_path)
        seconds = time.monotonic() - t0
    finally:
        holder.communicate("")
    line = one_error_line(r)
    assert str(index_file) in line and "locked by another process" in line, line
    assert READ_WAIT_S <= seconds < 40, seconds  # SQLite's default made it 60 s; the rest is startup


def test_a_short_lock_is_waited_for(index_file, tmp_path):
    """A lock held for a moment (another `vlm index` committing a batch) is no error."""
    holder = _hold_lock(index_file, "2.5")
    r = vlm("dupes", "--db", str(index_file), cwd=tmp_path)
    holder.wait(timeout=30)
    assert r.returncode == 0, r.stderr
    assert "0 groups of near-duplicates among 1 images" in r.stderr
