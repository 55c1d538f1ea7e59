"""An approximate vector index for large collections: faiss inverted lists over float16 rows.

Exact search reads every row per query; past a few hundred thousand images that takes longer than a
query should (benchmarks/bench_index.py, docs/performance.md). Then `vlm index` builds this index at
the end of a run, in a file beside the SQLite index, stamped with the index's generation (a counter
every write transaction raises); searches without filters use it while the stamp matches and fall
back to exact search otherwise. faiss is an optional extra (`pip install 'vlmcli[index]'`); without
it every search is exact.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from vlmcli.index.db import FileRow, IndexDB

# Below this many vectors exact search answers in tens of milliseconds: no index to keep.
MIN_ROWS = 200_000
# Lists searched per query: with sqrt(n) lists, 32 keep recall@10 >= 0.95 against exact search at
# 1M clustered vectors in bench_index.py's runs (16 do not).
NPROBE = 32


def available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def ann_path(db_path: Path, model_hash: str) -> Path:
    return db_path.with_name(f"{db_path.name}.ann") / f"{model_hash[:16]}.faiss"


class IvfIndex:
    """Inverted lists (sqrt(n) k-means cells, NPROBE searched) over float16 rows, inner product (the
    rows are unit vectors).
    Row ids are positions in the order the rows were given (the index's path order)."""

    def __init__(self, index: Any, generation: int, rows: int):
        self.index, self.generation, self.rows = index, generation, rows

    @classmethod
    def build(cls, matrix: np.ndarray, generation: int) -> IvfIndex:
        import faiss

        n, dim = matrix.shape
        # sqrt(n) lists: training and adding stay minutes at 1M rows on 2 cores (more lists, slower builds).
        lists = max(1, min(int(math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        sample = np.random.default_rng(0).permutation(n)[: min(n, 64 * lists)]
        rows = np.ascontiguousarray(matrix, dtype=np.float32)
        index.train(rows[sample])
        index.add(rows)
        index.nprobe = NPROBE
        return cls(index, generation, n)

    def save(self, path: Path) -> None:
        import faiss

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        stamp = path.with_suffix(".json")
        stamp_tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
        stamp_tmp.write_text(json.dumps({"generation": self.generation, "rows": self.rows}))
        os.replace(stamp_tmp, stamp)

    @classmethod
    def load(cls, path: Path, generation: int) -> IvfIndex | None:
        """The index saved at `path` if it was built at this generation of the SQLite index, else None."""
        try:
            stamp = json.loads(path.with_suffix(".json").read_text())
            if int(stamp["generation"]) != generation or not path.exists():
                return None
            import faiss

            index: Any = faiss.read_index(str(path))  # an IndexIVF (its stubs type the base class)
        except (OSError, ValueError, KeyError, RuntimeError):
            return None
        index.nprobe = NPROBE
        return cls(index, generation, int(stamp["rows"]))

    def search(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, scores) of about the n nearest rows, best first."""
        scores, ids = self.index.search(np.asarray(q, np.float32)[None, :], min(n, self.rows))
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)


def count_rows(db: IndexDB, model_hash: str) -> int:
    """Searchable rows of the model: files with a vector of it."""
    sql = "SELECT COUNT(*) FROM files f JOIN vectors v ON v.sha256 = f.sha256 WHERE v.model_hash = ?"
    return int(db.conn.execute(sql, (model_hash,)).fetchone()[0])


def refresh(db: IndexDB, model_hash: str, min_rows: int = MIN_ROWS) -> int | None:
    """Build the model's index if the collection is large enough and the saved one is stale; the
    number of rows indexed, or None when nothing was built (small, fresh, or faiss missing)."""
    if not available():
        return None
    generation = db.generation()
    path = ann_path(db.path, model_hash)
    rows = count_rows(db, model_hash)
    if rows < min_rows:
        for stale in (path, path.with_suffix(".json")):
            stale.unlink(missing_ok=True)
        return None
    if IvfIndex.load(path, generation) is not None:
        return None
    IvfIndex.build(db.vectors(model_hash).matrix, generation).save(path)
    return int(rows)


def load_fresh(db: IndexDB, model_hash: str) -> tuple[IvfIndex, list[FileRow]] | None:
    """The saved index with the files its row ids stand for, if it matches the index as it is now."""
    if not available():
        return None
    index = IvfIndex.load(ann_path(db.path, model_hash), db.generation())
    if index is None:
        return None
    files = db.files_with_vectors(model_hash)
    return (index, files) if len(files) == index.rows else None
