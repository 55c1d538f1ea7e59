"""The photo index's pure parts on real SQLite files: schema, rows, vectors, ranking, queries, duplicates."""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vlmcli.errors import VlmError
from vlmcli.index.db import SCHEMA_VERSION, FileRow, IndexDB, ModelRef
from vlmcli.index.dupes import find_duplicates
from vlmcli.index.search import Filters, Searcher, Term, parse_query, rank

PACKAGE = Path(__file__).resolve().parents[1] / "vlmcli"
MODEL = ModelRef("clip-test", "ab" * 32, "/models/clip-test.gguf")


def _unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _fill(db: IndexDB, paths: list[str], vectors: np.ndarray, model: ModelRef = MODEL) -> None:
    db.put_model(model)
    with db.transaction() as c:
        for i, (p, v) in enumerate(zip(paths, vectors)):
            sha = f"{i:064x}"
            IndexDB.put_vector(c, sha, model, v)
            IndexDB.put_files(c, [FileRow(p, 100 + i, 1_000_000_000 * (i + 1), sha)])


def test_the_index_package_imports_nothing_above_it() -> None:
    allowed = ("vlmcli.errors", "vlmcli.files", "vlmcli.index")
    for path in sorted((PACKAGE / "index").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else []
            )
            bad = [n for n in names if n.startswith("vlmcli") and not n.startswith(allowed)]
            assert bad == [], f"{path.name} imports {bad}"


def test_schema_version_wal_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "i.sqlite"
    with IndexDB(path) as db:
        _fill(db, ["/p/a.jpg"], _unit(np.random.default_rng(0), 1))
    with IndexDB(path, create=False) as db:
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        assert db.counts() == {"files": 1, "vectors": 1, "captions": 0}


def test_a_newer_schema_a_missing_index_and_not_a_database_are_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "i.sqlite"
    IndexDB(path).close()
    with sqlite3.connect(path) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(VlmError, match="schema version 99"):
        IndexDB(path)
    with pytest.raises(VlmError, match="no index here yet") as e:
        IndexDB(tmp_path / "none.sqlite", create=False)
    assert e.value.path == str(tmp_path / "none.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(VlmError, match="cannot open the index"):
        IndexDB(junk)


def test_a_lock_held_past_the_wait_is_one_named_error_at_the_open_and_in_a_transaction(tmp_path: Path) -> None:
    """Another connection's exclusive lock (SQLite locks connections of one process against each other
    as against other processes): past `wait_s` the index says it is locked, from the open or a write."""
    path = tmp_path / "i.sqlite"
    IndexDB(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(VlmError, match=r"locked by another process \(gave up after 0.2 s") as e:
        IndexDB(path, wait_s=0.2)
    assert e.value.path == str(path)
    other.close()

    with pytest.raises(VlmError, match="locked by another process") as e, IndexDB(path, wait_s=0.2) as db:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # a second writer between this one's open and its write
        db.put_model(MODEL)
    other.close()
    assert e.value.path == str(path)


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    with IndexDB(tmp_path / "i.sqlite") as db:
        with pytest.raises(RuntimeError), db.transaction() as c:
            IndexDB.put_files(c, [FileRow("/p/a.jpg", 1, 1, "00")])
            raise RuntimeError("killed")
        assert db.counts()["files"] == 0


def test_rank_is_exact_cosine_order_with_ties_in_row_order() -> None:
    rng = np.random.default_rng(1)
    m = _unit(rng, 500)
    m[10] = m[20] = m[3]  # three equal rows: equal scores, kept in row order
    q = m[3]
    order, scores = rank(m, q, 7)
    expected = np.lexsort((np.arange(500), -(m @ q)))[:7]
    assert order.tolist() == expected.tolist()
    assert order[:3].tolist() == [3, 10, 20]
    assert np.allclose(scores, (m @ q)[expected])
    assert rank(m, q, None)[0].tolist() == np.lexsort((np.arange(500), -(m @ q))).tolist()


class FixedEncoder:
    """Texts and images as fixed vectors (the pure layer's side of tasks/index.ClipQueryEncoder)."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    @property
    def model(self) -> ModelRef:
        return MODEL

    def texts(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.table[t] for t in texts])

    def images(self, images: list[str | bytes]) -> np.ndarray:
        return np.stack([self.table[str(i)] for i in images])


def test_search_filters_on_folders_and_times(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    paths = ["/p/a/1.jpg", "/p/a/2.jpg", "/p/ab/3.jpg", "/p/b/4.jpg"]
    m = _unit(rng, 4)
    with IndexDB(tmp_path / "i.sqlite") as db:
        _fill(db, paths, m)
        s = Searcher(db, FixedEncoder({"x": m[0]}))
        hits = s.search([Term(1.0, text="x")], None)
        assert [h.path for h in hits] == [paths[i] for i in np.lexsort((np.arange(4), -(m @ m[0])))]
        assert {h.path for h in s.search([Term(1.0, text="x")], None, Filters(["/p/a"]))} == set(paths[:2])
        # mtimes are 1, 2, 3, 4 s after the epoch
        got = s.search([Term(1.0, text="x")], None, Filters(since_ns=2_000_000_000, until_ns=4_000_000_000))
        assert {h.path for h in got} == {paths[1], paths[2]}


def test_weighted_query_arithmetic(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    m = _unit(rng, 50)
    table = {"dog": m[0], "beach": m[1], "night": m[2], "/x.jpg": m[3]}
    with IndexDB(tmp_path / "i.sqlite") as db:
        _fill(db, [f"/p/{i:02d}.jpg" for i in range(50)], m)
        s = Searcher(db, FixedEncoder(table))
        terms = parse_query(['"dog" + 2*beach - "night"'], ["/x.jpg"], is_image=lambda w: w.endswith(".jpg"))
        assert [t.describe() for t in terms] == ["+1*dog", "+2*beach", "-1*night", "+1*/x.jpg"]
        q = m[0] + 2 * m[1] - m[2] + m[3]
        q /= np.linalg.norm(q)
        expected = np.lexsort((np.arange(50), -(m @ q)))[:10]
        assert [h.path for h in s.search(terms, 10)] == [f"/p/{i:02d}.jpg" for i in expected]


def test_parse_query_forms() -> None:
    def words(*w: str) -> list[str]:
        return [t.describe() for t in parse_query(list(w), is_image=lambda _: False)]

    assert words("dog", "+", "beach", "-", "night") == ["+1*dog", "+1*beach", "-1*night"]
    assert words("a dog on the beach") == ["+1*a dog on the beach"]
    assert words("well-lit room - night") == ["+1*well-lit room", "-1*night"]
    assert words("0.5*sunset") == ["+0.5*sunset"]
    with pytest.raises(VlmError, match="empty"):
        parse_query([])
    with pytest.raises(VlmError, match="only subtracts"):
        words("-", "night")


def test_captions_mix_full_text_into_the_ranking(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    m = _unit(rng, 20)
    with IndexDB(tmp_path / "i.sqlite") as db:
        _fill(db, [f"/p/{i:02d}.jpg" for i in range(20)], m)
        s = Searcher(db, FixedEncoder({"red kayak": m[0]}), caption_weight=10.0)
        last = s.search([Term(1.0, text="red kayak")], None)[-1]
        with db.transaction() as c:
            IndexDB.put_caption(c, last.sha256, "smolvlm2", "auto", "A red kayak on a lake.")
        hits = s.with_captions(s.search([Term(1.0, text="red kayak")], 3))
        assert hits[0].path == last.path
        assert hits[0].caption == "A red kayak on a lake."
        assert hits[0].text_score == 1.0 and hits[0].record()["clip_score"] == round(last.clip_score, 6)


def test_near_duplicate_groups_and_the_largest_keeper() -> None:
    from vlmcli.index.db import Vectors

    rng = np.random.default_rng(5)
    base = _unit(rng, 6, 64)
    rows = [base[0], base[0], base[0] + 0.05 * base[1], base[2], base[3], base[3] + 0.02 * base[4], base[5]]
    m = np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)
    files = [FileRow(f"/p/{i}.jpg", 1000 + i, 0, f"{i}") for i in range(7)]
    dims = {"/p/0.jpg": (100, 100), "/p/1.jpg": (100, 100), "/p/2.jpg": (400, 300), "/p/4.jpg": (10, 10)}
    groups = find_duplicates(Vectors(files, m), 0.99, size_of=dims.get)
    assert [[f.path for f in g.files] for g in groups] == [
        ["/p/0.jpg", "/p/1.jpg", "/p/2.jpg"],
        ["/p/4.jpg", "/p/5.jpg"],
    ]
    assert groups[0].files[groups[0].keeper].path == "/p/2.jpg"  # most pixels
    assert groups[1].files[groups[1].keeper].path == "/p/4.jpg"  # the only one readable
    first = groups[0].record(1)
    assert first["keeper"] == "/p/2.jpg"
    assert first["pairs"][0] == {"a": "/p/0.jpg", "b": "/p/1.jpg", "score": 1.0}


def test_the_approximate_index_serves_large_collections_while_fresh(tmp_path: Path) -> None:
    pytest.importorskip("faiss", reason="the approximate index needs faiss-cpu (the index extra)")
    from vlmcli.index import ann

    rng = np.random.default_rng(6)
    centres = _unit(rng, 40, 32)
    m = np.stack([centres[i % 40] + 0.15 * rng.standard_normal(32) for i in range(4000)]).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    paths = [f"/p/{i:05d}.jpg" for i in range(4000)]
    with IndexDB(tmp_path / "i.sqlite") as db:
        _fill(db, paths, m)
        assert ann.refresh(db, MODEL.hash, min_rows=10**6) is None  # small: exact search only
        assert ann.refresh(db, MODEL.hash, min_rows=1000) == 4000
        assert ann.refresh(db, MODEL.hash, min_rows=1000) is None  # fresh: not rebuilt
        queries = _unit(rng, 20, 32)
        table = {f"q{i}": q for i, q in enumerate(queries)}
        approximate = Searcher(db, FixedEncoder(table))
        exact = Searcher(db, FixedEncoder(table), approximate=False)
        assert approximate._fresh_ann() is not None
        found = 0
        for name in table:
            want = {h.path for h in exact.search([Term(1.0, text=name)], 10)}
            got = approximate.search([Term(1.0, text=name)], 10)
            found += len(want & {h.path for h in got})
            assert all(abs(h.score - h.clip_score) < 1e-6 for h in got)
        assert found >= 0.95 * 10 * len(table)
        # Any write makes it stale: searches are exact until `vlm index` rebuilds it.
        with db.transaction() as c:
            IndexDB.delete_files(c, [paths[0]])
        assert approximate._fresh_ann() is None
        assert paths[0] not in {h.path for h in approximate.search([Term(1.0, text="q0")], 4000)}
