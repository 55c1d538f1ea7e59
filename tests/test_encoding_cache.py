"""The image-encoding cache: entries, checks and eviction (engines/encoding_cache.py) and, through
`vlm ask` as a user runs it, hits, misses, --no-cache, corruption, a changed projector, the size
bound and concurrent processes. Answers with and without the cache must be the same tokens."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmcli.engines.encoding_cache import MAGIC, EncodingCache, parse_size, read_entry

KEY = {"v": 1, "kind": "embd", "image": "ab" * 32, "mmproj": "cd" * 32, "level": "high", "cap": 4, "chunk": 0}


def _entry_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("??/*.enc"))


def _kind(path: Path) -> str:
    entry = read_entry(path)
    assert entry is not None, path
    return entry[0]["kind"]


# ----------------------------------------------------------------------------- the store of entries


def test_round_trip_and_miss(tmp_path: Path) -> None:
    cache = EncodingCache(tmp_path)
    assert cache.get(KEY) is None
    payload = np.arange(1000, dtype=np.float32).tobytes()
    cache.put(KEY, {"tokens": 10}, payload)
    hit = cache.get(KEY)
    assert hit is not None and hit.payload == payload and hit.meta == {"tokens": 10}
    assert cache.get({**KEY, "chunk": 1}) is None
    assert cache.stats().entries == 1 and cache.stats().bytes > len(payload)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty"])
def test_a_damaged_entry_is_a_miss_and_is_removed(tmp_path: Path, damage: str) -> None:
    cache = EncodingCache(tmp_path)
    cache.put(KEY, {}, b"\x01" * 4096)
    (path,) = _entry_files(tmp_path)
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-100] ^= 0xFF
    elif damage == "truncate":
        blob = blob[:-1]
    elif damage == "header":
        blob[len(MAGIC) + 10] = ord("{")
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    assert cache.get(KEY) is None
    assert not path.exists()


def test_a_foreign_entry_under_the_key_is_refused(tmp_path: Path) -> None:
    """A file at the key's path whose header holds another key (a collision, a file copied in)."""
    cache = EncodingCache(tmp_path)
    other = {**KEY, "image": "ee" * 32}
    cache.put(other, {}, b"x" * 64)
    (src,) = _entry_files(tmp_path)
    dst = cache._path(KEY)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    assert cache.get(KEY) is None and cache.get(other) is not None


def test_least_recently_used_entries_go_first(tmp_path: Path) -> None:
    cache = EncodingCache(tmp_path, max_bytes=3 * 1500)  # entries are ~1.3 kB with their header
    keys = [{**KEY, "chunk": i} for i in range(4)]
    for i, k in enumerate(keys[:3]):
        cache.put(k, {}, bytes([i]) * 1000)
        os.utime(cache._path(k), (time.time() - 100 + i, time.time() - 100 + i))
    assert cache.get(keys[0]) is not None  # now the most recently used
    cache.put(keys[3], {}, b"\x03" * 1000)
    assert cache.get(keys[1]) is None  # the oldest untouched one was evicted
    assert all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    assert cache.stats().bytes <= cache.max_bytes


def _writer(root: str, worker: int, rounds: int) -> int:
    cache = EncodingCache(Path(root), max_bytes=40_000)
    bad = 0
    for r in range(rounds):
        k = {**KEY, "chunk": (worker + r) % 6}
        payload = bytes([k["chunk"]]) * (3000 + 500 * k["chunk"])
        cache.put(k, {"chunk": k["chunk"]}, payload)
        for c in range(6):
            hit = cache.get({**KEY, "chunk": c})
            if hit is not None and hit.payload != bytes([c]) * (3000 + 500 * c):
                bad += 1
    return bad


def test_concurrent_writers_and_readers_see_whole_entries(tmp_path: Path) -> None:
    """Four processes write, read and evict in one folder: every hit is exactly what was written."""
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        bad = pool.starmap(_writer, [(str(tmp_path), w, 60) for w in range(4)])
    assert bad == [0, 0, 0, 0]
    assert not list(tmp_path.glob("??/.tmp-*"))
    assert EncodingCache(tmp_path, 40_000).stats().bytes <= 40_000


def test_file_hash_is_remembered_until_the_file_changes(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "m.gguf"
    f.write_bytes(b"a" * 10_000)
    cache = EncodingCache(tmp_path / "c")
    assert cache.file_sha256(f) == hashlib.sha256(b"a" * 10_000).hexdigest()
    assert EncodingCache(tmp_path / "c").file_sha256(f) == hashlib.sha256(b"a" * 10_000).hexdigest()  # from the memo
    f.write_bytes(b"b" * 10_001)
    assert EncodingCache(tmp_path / "c").file_sha256(f) == hashlib.sha256(b"b" * 10_001).hexdigest()


def test_parse_size() -> None:
    assert parse_size("2G") == 2 * 1024**3 and parse_size("500MB") == 500 * 1024**2 and parse_size("0") == 0
    assert parse_size("1.5k") == 1536 and parse_size("4096") == 4096 and parse_size("1GiB") == 1024**3
    for bad in ("", "lots", "-1G", "G"):
        with pytest.raises(ValueError):
            parse_size(bad)


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    path = tmp_path / "photo.png"
    Image.fromarray((rng.random((300, 700, 3)) * 255).astype(np.uint8)).save(path)  # tiles at high detail
    return path


def _ask(
    smolvlm2_gguf, image: Path, cache: Path, *extra: str, mmproj: Path | None = None, size: str | None = None
) -> dict:
    env = {**os.environ, "VLM_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("VLM_CACHE_SIZE", None)
    if size is not None:
        env["VLM_CACHE_SIZE"] = size
    cmd = [
        sys.executable,
        "-m",
        "vlmcli",
        "ask",
        str(image),
        "What is this?",
        "-m",
        str(smolvlm2_gguf.model),
        "--mmproj",
        str(mmproj or smolvlm2_gguf.mmproj),
        "-n",
        "6",
        "-t",
        "1",
        "--detail",
        "high",
        "--json",
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _answer(rec: dict) -> str:
    return rec["answers"][0]["answer"]


def test_cli_hit_miss_no_cache_and_the_embedding_level(smolvlm2_gguf, photo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = _ask(smolvlm2_gguf, photo, cache)
    assert cold["cache"] is None and cold["timings"]["image_encode_ms"] > 0 and cold["tiles"] > 0
    kinds = sorted(_kind(p) for p in _entry_files(cache))
    assert kinds.count("kv") == 1 and kinds.count("embd") == cold["tiles"] + 1  # every tile and the overview

    warm = _ask(smolvlm2_gguf, photo, cache)
    assert warm["cache"] == "kv" and warm["timings"]["image_encode_ms"] == 0
    assert _answer(warm) == _answer(cold) and warm["tokens"] == cold["tokens"] and warm["tiles"] == cold["tiles"]

    off = _ask(smolvlm2_gguf, photo, cache, "--no-cache")
    assert off["cache"] is None and _answer(off) == _answer(cold)

    for p in _entry_files(cache):  # another language model beside the same projector: only "embd" entries apply
        if _kind(p) == "kv":
            p.unlink()
    embd = _ask(smolvlm2_gguf, photo, cache)
    assert embd["cache"] == "embd" and embd["timings"]["image_encode_ms"] < cold["timings"]["image_encode_ms"]
    assert _answer(embd) == _answer(cold)


def test_cli_corrupt_entries_are_recomputed_never_used(smolvlm2_gguf, photo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = _ask(smolvlm2_gguf, photo, cache)
    for p in _entry_files(cache):
        blob = bytearray(p.read_bytes())
        blob[-3] ^= 0x5A
        p.write_bytes(bytes(blob))
    again = _ask(smolvlm2_gguf, photo, cache)
    assert again["cache"] is None and _answer(again) == _answer(cold)
    assert _ask(smolvlm2_gguf, photo, cache)["cache"] == "kv"  # rewritten whole


def test_cli_a_changed_projector_misses(smolvlm2_gguf, photo: Path, tmp_path: Path) -> None:
    """The key holds the projector's SHA-256: a different mmproj file never gets the old embeddings."""
    cache = tmp_path / "cache"
    _ask(smolvlm2_gguf, photo, cache)
    other = tmp_path / "mmproj-other.gguf"
    shutil.copy(smolvlm2_gguf.mmproj, other)
    blob = bytearray(other.read_bytes())
    blob[-64] ^= 0x01  # a bit of the last tensor's data
    other.write_bytes(bytes(blob))
    changed = _ask(smolvlm2_gguf, photo, cache, mmproj=other)
    assert changed["cache"] is None
    assert _ask(smolvlm2_gguf, photo, cache, mmproj=other)["cache"] == "kv"


def test_cli_size_bound_and_concurrent_processes(smolvlm2_gguf, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    rng = np.random.default_rng(1)
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray((rng.random((200, 260, 3)) * 255).astype(np.uint8)).save(images[-1])
    for image in images:
        _ask(smolvlm2_gguf, image, cache, size="60K")
    assert EncodingCache(cache).stats().bytes <= 60 * 1024

    # two processes on one image and one cache folder at once: both answer, a third gets a whole hit
    env = {**os.environ, "VLM_CACHE_DIR": str(tmp_path / "shared"), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "vlmcli",
        "ask",
        str(images[0]),
        "What is this?",
        "-m",
        str(smolvlm2_gguf.model),
        "--mmproj",
        str(smolvlm2_gguf.mmproj),
        "-n",
        "6",
        "-t",
        "1",
        "--detail",
        "high",
        "--json",
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    answers = {_answer(json.loads(o)) for o, _ in outs}
    third = _ask(smolvlm2_gguf, images[0], tmp_path / "shared")
    assert len(answers) == 1 and third["cache"] == "kv" and _answer(third) in answers
