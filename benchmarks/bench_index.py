"""Vector search for the photo index: exact numpy search (float32, float16) against approximate indexes.

For each collection size: query time (p50 / p95 of single queries, as `vlm search` and the page ask),
build time, the memory the searchable form holds (the rows for exact search; usearch's own count,
faiss's serialized index), and recall@10 against exact float32 search.

Data: unit vectors of CLIP's size (512). `--data clustered` (the default) draws them around random
centres, as photo collections sit in CLIP's space (many near neighbours); `--data uniform` draws
them uniformly on the sphere, the worst case for any approximate index (no neighbour is much nearer
than the rest). Queries are new points from the same distribution.

    python benchmarks/bench_index.py --n 100000
    python benchmarks/bench_index.py --n 1000000 --methods exact-f32,usearch-exact-f16,faiss-ivf-f16
    python benchmarks/bench_index.py --throughput 48     # vlm embed / vlm index images/s, 12 MP JPEGs
    python benchmarks/bench_index.py --reindex 10000     # re-indexing an unchanged tree of 10k files

Methods: exact-f32 (numpy/BLAS matrix-vector product), exact-f16 (numpy, float16 rows converted in
blocks), usearch-exact-f16 (usearch's SIMD brute force over float16), usearch-f16 / usearch-i8 (HNSW;
pip install usearch), faiss-hnsw-sq8 (HNSW over 8-bit scalar-quantized rows), faiss-ivf-f16 /
faiss-ivf-sq8 (inverted lists over float16 / 8-bit rows; pip install faiss-cpu).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # the model fixtures build the random-weight CLIPs
from report import print_table  # noqa: E402 - benchmarks/ is not a package

K = 10


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, dim: int, kind: str, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        data = np.empty((n, dim), np.float32)
        for i in range(0, n, 100_000):
            data[i : i + 100_000] = unit(rng.standard_normal((min(100_000, n - i), dim), dtype=np.float32))
        return data, unit(rng.standard_normal((n_queries, dim), dtype=np.float32))
    # Clusters of ~100 images around random centres; a point's cosine with its centre is about 0.8.
    centres = unit(rng.standard_normal((max(1, n // 100), dim), dtype=np.float32))
    spread = 0.75 / np.sqrt(dim)
    data = np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        pick = rng.integers(0, len(centres), m)
        data[i : i + m] = unit(centres[pick] + spread * rng.standard_normal((m, dim), dtype=np.float32))
    pick = rng.integers(0, len(centres), n_queries)
    queries = unit(centres[pick] + spread * rng.standard_normal((n_queries, dim), dtype=np.float32))
    return data, queries


def exact_top(matrix: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    scores = matrix @ q
    top = np.argpartition(scores, len(scores) - k)[-k:]
    return top[np.argsort(-scores[top])]


@dataclass
class Result:
    method: str
    build_s: float
    memory: int
    times: list[float]
    recall: float

    def row(self, n: int) -> list[str]:
        ms = sorted(t * 1000 for t in self.times)
        p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
        return [
            f"{n:,}",
            self.method,
            f"{statistics.median(ms):.2f} ms",
            f"{p95:.2f} ms",
            f"{self.build_s:.1f} s" if self.build_s else "-",
            f"{self.memory / 2**30:.2f} GiB",
            f"{self.recall:.3f}",
        ]


Searcher = Callable[[np.ndarray], np.ndarray]


def exact_f32(data: np.ndarray) -> tuple[Searcher, float, int]:
    return (lambda q: exact_top(data, q)), 0.0, data.nbytes


def exact_f16(data: np.ndarray) -> tuple[Searcher, float, int]:
    t0 = time.perf_counter()
    half = data.astype(np.float16)
    build = time.perf_counter() - t0
    block = 65536

    def search(q: np.ndarray) -> np.ndarray:
        # numpy has no float16 BLAS: convert a block at a time (the rows stay float16 in memory).
        scores = np.empty(len(half), np.float32)
        for i in range(0, len(half), block):
            scores[i : i + block] = half[i : i + block].astype(np.float32) @ q
        top = np.argpartition(scores, len(scores) - K)[-K:]
        return top[np.argsort(-scores[top])]

    return search, build, half.nbytes


def usearch_index(dtype: str, expansion_search: int) -> Callable[[np.ndarray], tuple[Searcher, float, int]]:
    def build(data: np.ndarray) -> tuple[Searcher, float, int]:
        from usearch.index import Index

        index = Index(ndim=data.shape[1], metric="cos", dtype=dtype, connectivity=16, expansion_add=128)
        t0 = time.perf_counter()
        index.add(np.arange(len(data), dtype=np.uint64), data, threads=os.cpu_count() or 1)
        built = time.perf_counter() - t0
        index.expansion_search = expansion_search
        memory = int(index.memory_usage)

        def search(q: np.ndarray) -> np.ndarray:
            return np.asarray(index.search(q, K, threads=1).keys, np.int64)

        return search, built, memory

    return build


def faiss_hnsw_sq8(ef_search: int) -> Callable[[np.ndarray], tuple[Searcher, float, int]]:
    def build(data: np.ndarray) -> tuple[Searcher, float, int]:
        import faiss

        index = faiss.IndexHNSWSQ(data.shape[1], faiss.ScalarQuantizer.QT_8bit, 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 128
        t0 = time.perf_counter()
        index.train(data[: min(len(data), 100_000)])
        index.add(data)
        built = time.perf_counter() - t0
        index.hnsw.efSearch = ef_search
        memory = len(faiss.serialize_index(index))  # its vectors, codes, graph or lists

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q[None, :], K)[1][0].astype(np.int64)

        return search, built, memory

    return build


def usearch_exact_f16(data: np.ndarray) -> tuple[Searcher, float, int]:
    from usearch.index import MetricKind
    from usearch.index import search as brute_force

    t0 = time.perf_counter()
    half = data.astype(np.float16)
    build = time.perf_counter() - t0
    threads = os.cpu_count() or 1

    def search(q: np.ndarray) -> np.ndarray:
        found = brute_force(half, q.astype(np.float16), K, MetricKind.Cos, exact=True, threads=threads)
        return np.asarray(found.keys, np.int64)

    return search, build, half.nbytes


def faiss_ivf(kind: str, nprobes: list[int], factor: float) -> Callable[[np.ndarray], Any]:
    """Build once; one searcher per number of lists probed (the index's setting at query time)."""

    def build(data: np.ndarray) -> tuple[list[tuple[str, Searcher]], float, int]:
        import faiss

        lists = max(1, int(factor * np.sqrt(len(data))))
        quantizer = faiss.IndexFlatIP(data.shape[1])
        qtype = faiss.ScalarQuantizer.QT_fp16 if kind == "f16" else faiss.ScalarQuantizer.QT_8bit
        index = faiss.IndexIVFScalarQuantizer(quantizer, data.shape[1], lists, qtype, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        index.train(data[np.random.default_rng(1).permutation(len(data))[: min(len(data), 64 * lists)]])
        index.add(data)
        built = time.perf_counter() - t0
        memory = len(faiss.serialize_index(index))

        def probing(nprobe: int) -> Searcher:
            def search(q: np.ndarray) -> np.ndarray:
                index.nprobe = nprobe
                return index.search(q[None, :], K)[1][0].astype(np.int64)

            return search

        suffix = len(nprobes) > 1
        return [(f", {p} probed" if suffix else "", probing(p)) for p in nprobes], built, memory

    return build


def methods(ef: int, nprobe: list[int], factor: float) -> dict[str, Callable[[np.ndarray], Any]]:
    return {
        "exact-f32": exact_f32,
        "exact-f16": exact_f16,
        "usearch-exact-f16": usearch_exact_f16,
        "usearch-f16": usearch_index("f16", ef),
        "usearch-i8": usearch_index("i8", ef),
        "faiss-hnsw-sq8": faiss_hnsw_sq8(ef),
        "faiss-ivf-f16": faiss_ivf("f16", nprobe, factor),
        "faiss-ivf-sq8": faiss_ivf("sq8", nprobe, factor),
    }


def measure(name: str, make: Callable[[np.ndarray], Any], data, queries, truth) -> list[Result]:
    gc.collect()
    made, built, memory = make(data)
    variants = made if isinstance(made, list) else [("", made)]
    results = []
    for label, search in variants:
        search(queries[0])  # warm-up: first-touch pages, thread pools
        times, hits = [], 0
        for q, want in zip(queries, truth):
            t0 = time.perf_counter()
            got = search(q)
            times.append(time.perf_counter() - t0)
            hits += len(set(got.tolist()) & set(want.tolist()))
        results.append(Result(name + label, built, memory, times, hits / (K * len(queries))))
    return results


# ----------------------------------------------------------------------------- indexing through the CLI


def vlm(*args: str, home: Path) -> tuple[float, str]:
    """Run the real CLI; (wall seconds, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_HOME": str(home)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "vlmcli", *args], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"vlm {' '.join(args)} failed:\n{r.stderr}")
    return wall, r.stderr


def images_per_s(stderr: str) -> float:
    m = re.search(r"([0-9.]+) images/s", stderr.strip().splitlines()[-1])
    return float(m.group(1)) if m else 0.0


def throughput(n: int, cache: Path, work: Path, rounds: int) -> None:
    """images/s of `vlm embed FOLDER --out` and `vlm index FOLDER` on real-size JPEGs, real-size CLIP."""
    from bench_batch import make_photo, real_clip

    model = real_clip(cache)
    folder = cache / f"photos-12mp-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(4032, 3024), (3024, 4032), (4000, 3000), (3000, 2000)]
    for i in range(n):
        p = folder / f"IMG_{i:04d}.jpg"
        if not p.exists():
            make_photo(p, sizes[i % len(sizes)], i)
    runs: dict[str, list[tuple[float, float]]] = {"vlm embed FOLDER --out x.npy": [], "vlm index FOLDER": []}
    for round_ in range(rounds):  # in turn, so that other load on the machine falls on both alike
        out = work / f"embed-{round_}.npy"
        wall, err = vlm("embed", str(folder), "--out", str(out), "-m", str(model), home=work)
        runs["vlm embed FOLDER --out x.npy"].append((images_per_s(err), wall))
        wall, err = vlm("index", str(folder), "--db", str(work / f"i{round_}.sqlite"), "-m", str(model), home=work)
        runs["vlm index FOLDER"].append((images_per_s(err), wall))
    rows = [
        [
            command,
            f"{statistics.median(r for r, _ in got):.1f}",
            f"{min(r for r, _ in got):.1f}-{max(r for r, _ in got):.1f}",
            f"{statistics.median(w for _, w in got):.1f} s",
        ]
        for command, got in runs.items()
    ]
    mb = sum(p.stat().st_size for p in folder.iterdir()) / n / 2**20
    print_table(
        "Indexing throughput, real-size CLIP ViT-B/32",
        ["command", "images/s (median)", "images/s (range)", "wall time (median)"],
        rows,
        note=f"{n} JPEGs of 12 MP (4032x3024 and similar, {mb:.1f} MB each); random-weight ViT-B/32 F16, "
        f"default threads and batch; {rounds} rounds, in turn; images/s as the summary line reports it "
        "(the runner's time, model load excluded)",
    )


def reindex(n: int, cache: Path, work: Path) -> None:
    """Seconds to re-index an unchanged tree of n small files, and after moves and touches."""
    from fixtures.clip import build_clip_checkpoint
    from PIL import Image

    from vlmcli.convert.clip import convert_clip

    model = cache / "clip-tiny" / "clip-tiny-F16.gguf"
    if not model.exists():
        convert_clip(build_clip_checkpoint(cache / "clip-tiny-hf" / "clip-tiny", seed=0), model.parent, "F16")
    tree = work / "tree"
    rng = np.random.default_rng(0)
    for i in range(n):
        p = tree / f"{i // 500:03d}" / f"{i:05d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(p, quality=80)
    db = str(work / "tree.sqlite")
    rows = []
    wall, err = vlm("index", str(tree), "--db", db, "-m", str(model), home=work)
    rows.append(["first run (all embedded, tiny model)", f"{wall:.1f} s", err.splitlines()[0].split(": ", 2)[-1]])
    walls = [vlm("index", str(tree), "--db", db, "-m", str(model), home=work)[0] for _ in range(3)]
    rows.append(["unchanged (median of 3)", f"{statistics.median(walls):.2f} s", f"{n} unchanged"])
    moved = sorted(tree.rglob("*.jpg"))[:: max(1, n // 100)]
    (tree / "moved").mkdir()
    for p in moved:
        p.rename(tree / "moved" / p.name)
    for p in sorted(tree.rglob("*.jpg"))[1 :: max(1, n // 100)]:
        os.utime(p)
    wall, err = vlm("index", str(tree), "--db", db, "-m", str(model), home=work)
    rows.append(["1% moved, 1% touched", f"{wall:.2f} s", err.splitlines()[0].split(": ", 2)[-1]])
    print_table(
        f"Re-indexing a tree of {n:,} files",
        ["run", "wall time", "what it found"],
        rows,
        note="small JPEGs (32x24) in folders of 500; wall time of the whole command (start-up included)",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--throughput", type=int, metavar="N", help="Instead: indexing images/s on N 12 MP JPEGs.")
    ap.add_argument("--reindex", type=int, metavar="N", help="Instead: re-indexing a tree of N small files.")
    ap.add_argument("--rounds", type=int, default=5, help="With --throughput: rounds of each command.")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"), help="Models, photos.")
    ap.add_argument("--n", default="100000", help="Collection sizes, comma-separated.")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    ap.add_argument(
        "--methods",
        default="exact-f32,exact-f16,usearch-exact-f16,usearch-f16,usearch-i8,faiss-hnsw-sq8,faiss-ivf-f16,faiss-ivf-sq8",
    )
    ap.add_argument("--ef", type=int, default=64, help="HNSW: the search breadth (expansion).")
    ap.add_argument("--nprobe", default="16", help="IVF: lists searched per query (a comma list: one row each).")
    ap.add_argument("--lists", type=float, default=4.0, help="IVF: lists per sqrt(n) (vlmcli/index/ann.py: 1).")
    args = ap.parse_args()
    if args.throughput or args.reindex:
        work = Path(tempfile.mkdtemp(prefix="bench-index-"))
        try:
            if args.throughput:
                throughput(args.throughput, Path(args.cache), work, args.rounds)
            if args.reindex:
                reindex(args.reindex, Path(args.cache), work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    table = methods(args.ef, [int(p) for p in args.nprobe.split(",")], args.lists)
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        data, queries = make_data(n, args.dim, args.data, args.queries)
        truth = [exact_top(data, q) for q in queries]
        for name in args.methods.split(","):
            for r in measure(name, table[name], data, queries, truth):
                rows.append(r.row(n))
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        del data
    sizes = " and ".join(f"{int(x):,}" for x in args.n.split(","))
    title = f"Vector search, {sizes} {args.dim}-d vectors, {args.data} data"
    if "faiss-ivf" in args.methods:  # tables of one size and data differ in their IVF setting
        title += f", IVF {args.lists:g} sqrt(n) lists, {args.nprobe} probed"
    print_table(
        title,
        ["vectors", "method", "query p50", "query p95", "build", "memory", "recall@10"],
        rows,
        note=f"{args.queries} single queries after one warm-up; HNSW: M=16, build breadth 128, search breadth "
        f"{args.ef}; IVF: {args.lists:g} sqrt(n) lists, {args.nprobe} searched; recall@10 against exact float32",
    )


if __name__ == "__main__":
    main()
