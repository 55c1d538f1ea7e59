"""POST /v1/search on a real `vlm serve --index` (a subprocess with its CLIP worker): the same ranking
as `vlm search` on the same index."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from photo_fixtures import write_photo
from serving import start_server, stop_server

pytest.importorskip("fastapi", reason="vlm serve needs the serve extra")


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_HOME": str(home)}
    env.pop("VLM_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def served(clip_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    home = tmp_path_factory.mktemp("index-serve")
    photos = home / "photos"
    for i in range(6):
        write_photo(photos / ("sub" if i % 2 else "") / f"s{i}.jpg", 700 + i, (56, 40))
    db = home / "index.sqlite"
    subprocess.run(
        [sys.executable, "-m", "vlmcli", "index", str(photos), "--db", str(db), "-m", str(clip_gguf), "-q"],
        env=_env(home),
        check=True,
        timeout=600,
    )
    with _server(clip_gguf, db, home) as url:
        yield url, db, photos


@contextlib.contextmanager
def _server(clip_gguf: Path, db: Path, home: Path) -> Iterator[str]:
    """A `vlm serve --index db` with one CLIP worker, until the block ends: its URL."""
    with open(home / f"server-{db.stem}.log", "w+") as log:
        args = ["--model", str(clip_gguf), "--workers", "1", "--index", str(db)]
        process, url = start_server(args, log, env=_env(home))
        try:
            yield url
        finally:
            stop_server(process)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/v1/search", json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _cli(db: Path, *args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "vlmcli", "search", *args, "--db", str(db), "--json", "-n", "50"],
        env=_env(db.parent),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_search_as_json_ranks_as_the_cli_does(served) -> None:
    url, db, photos = served
    status, body = _post(url, {"query": "dog + beach - night", "n": 50})
    assert status == 200, body
    cli = _cli(db, "dog + beach - night")
    assert [r["path"] for r in body["data"]] == [r["path"] for r in cli]
    for a, b in zip(body["data"], cli):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)

    image = photos / "s0.jpg"
    data_url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
    status, body = _post(url, {"images": [data_url], "n": 3, "in": [str(photos)]})
    assert status == 200 and body["data"][0]["path"] == str(image)
    assert body["data"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    status, body = _post(url, {"query": "x", "in": [str(photos / "sub")], "n": 50})
    assert status == 200 and {Path(r["path"]).parent.name for r in body["data"]} == {"sub"}


def test_search_errors_in_the_openai_shape(served) -> None:
    url, _, _ = served
    status, body = _post(url, {"query": "  "})
    assert status == 400 and body["error"]["param"] == "query"
    status, body = _post(url, {"query": "x", "since": "yesterday"})
    assert status == 400 and body["error"]["param"] == "since"
    status, body = _post(url, {"query": "x", "n": 0})
    assert status == 400


_HOLD_LOCK = (
    "import sqlite3, sys\n"
    "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "c.execute('PRAGMA locking_mode=EXCLUSIVE')\n"
    "c.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_an_index_locked_by_another_process_is_a_503(served, clip_gguf: Path) -> None:
    """A server that meets the index held by another process (vlm index writing it, a backup) answers
    503 with a named error once its wait is over, and serves again when the lock is gone."""
    _, served_db, _ = served
    db = served_db.with_name("locked.sqlite")  # a copy: the module's server keeps the first one open
    with contextlib.closing(sqlite3.connect(served_db)) as src, contextlib.closing(sqlite3.connect(db)) as dst:
        src.backup(dst)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with _server(clip_gguf, db, db.parent) as url:
            status, body = _post(url, {"query": "dog", "n": 3})
            assert status == 503 and body["error"]["code"] == "index_locked", body
            assert "locked by another process" in body["error"]["message"]
            holder.communicate("", timeout=30)
            status, body = _post(url, {"query": "dog", "n": 3})  # the lock gone, the same server answers
            assert status == 200 and body["data"]
    finally:
        if holder.poll() is None:
            holder.kill()
