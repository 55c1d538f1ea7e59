"""`vlm index --ray`: the same runner and task as `vlm embed --ray`, the index written by the driver; a
real local Ray cluster (2 CPUs), the tiny CLIP fixture."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from photo_fixtures import write_photo

ray = pytest.importorskip("ray", reason="--ray needs the ray extra")

from vlmcli.cli import main  # noqa: E402 - after the skip

RAY = ["--ray", "--ray-workers", "2", "--ray-cpus", "1"]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        object_store_memory=200 * 1024 * 1024,
    )
    yield
    ray.shutdown()


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    return int(e.value.code or 0), capsys.readouterr().err


def _vectors(db: Path) -> dict[str, np.ndarray]:
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT f.path, v.data FROM files f JOIN vectors v ON v.sha256 = f.sha256").fetchall()
    return {p: np.frombuffer(d, "<f4") for p, d in rows}


def test_index_on_ray_writes_the_index_a_local_run_writes(clip_gguf: Path, tmp_path: Path, capsys) -> None:
    photos = tmp_path / "photos"
    for i in range(10):
        write_photo(photos / f"r{i}.jpg", 900 + i, (48, 36))
    local, remote = tmp_path / "local.sqlite", tmp_path / "ray.sqlite"
    code, err = _run(["index", str(photos), "--db", str(local), "-m", str(clip_gguf)], capsys)
    assert code == 0, err
    code, err = _run(["index", str(photos), "--db", str(remote), "-m", str(clip_gguf), *RAY], capsys)
    assert code == 0, err
    assert "index: 10 done, 0 skipped, 0 failed" in err
    a, b = _vectors(local), _vectors(remote)
    assert sorted(a) == sorted(b) and len(a) == 10
    for p in a:
        np.testing.assert_allclose(a[p], b[p], atol=1e-5)
    # A rerun on Ray starts no pool: nothing changed.
    code, err = _run(["index", str(photos), "--db", str(remote), "-m", str(clip_gguf), *RAY], capsys)
    assert code == 0 and "10 unchanged" in err and "index: 0 done, 10 skipped" in err
