"""Two vlm processes on the same cores (issue 14, goal 3): their total throughput against one alone.

llama.cpp's and ggml's threads meet at a spinning barrier after every op, so two processes that
each start one thread per core slow each other down far more than sharing would. By default each
engine now takes its share of the CPUs before every image or batch (vlmcli/engines/cores.py). Each
scenario runs the batch commands as a user would, in fresh processes:
- alone: one process over the folder;
- shared: two processes started together, each over its own copy of the folder, default threads;
- shared, -t all: the same two, each told to use every CPU (what each did before the share).
Total images/s = the images of all processes / the wall time until the last one ends (model loads
included, one per process). Workloads: `vlm caption` with the real-size random-weight 256M Q8_0 at
--detail low (the encoding cache off), `vlm embed` with the real-size ViT-B/32 F16.

    python benchmarks/bench_shared_cores.py                          # 3 rounds, interleaved
    python benchmarks/bench_shared_cores.py --rounds 1 --caption-images 3 --embed-images 64
Writes benchmarks/out/bench_shared_cores.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from machine import cpu_description  # noqa: E402
from report import print_table  # noqa: E402

PHOTOS = sorted(p for p in (ROOT / "vlmcli" / "data" / "sample").rglob("*.jpg"))
OUT = ROOT / "benchmarks" / "out"
ENV = {**os.environ, "VLM_CACHE_SIZE": "0"}  # every caption encodes its image


def folder_of(dest: Path, n: int) -> Path:
    """n JPEGs (copies of the sample photos under distinct names) in dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = dest / f"{i:04d}-{PHOTOS[i % len(PHOTOS)].name}"
        if not target.exists():
            shutil.copy(PHOTOS[i % len(PHOTOS)], target)
    return dest


def run_together(commands: list[list[str]]) -> float:
    """Start the commands at once; wall seconds until the last one ends."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vlmcli", *c], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV
        )
        for c in commands
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"vlm failed: {err.decode()[-500:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--caption-images", type=int, default=6, help="per process")
    ap.add_argument("--embed-images", type=int, default=192, help="per process")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    args = ap.parse_args()

    from bench_serve import build

    cache = Path(args.cache)
    vlm_dir, clip = build(cache)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="vlm-shared-"))
    workloads = {
        "caption 256M low": (
            args.caption_images,
            lambda d, out: [
                "caption",
                str(d),
                "--model",
                str(vlm_dir),
                "--detail",
                "low",
                "-n",
                str(args.tokens),
                "--offline",
                "--out",
                str(out),
                "--redo",
                "--quiet",
            ],
        ),
        "embed ViT-B/32 F16": (
            args.embed_images,
            lambda d, out: ["embed", str(d), "--model", str(clip), "--offline", "--out", str(out), "--redo", "--quiet"],
        ),
    }
    scenarios = {"alone": (1, []), "shared": (2, []), f"shared, -t {cpus}": (2, ["-t", str(cpus)])}
    results: dict[str, dict[str, list[float]]] = {w: {s: [] for s in scenarios} for w in workloads}
    try:
        for r in range(args.rounds):
            for wname, (n, command) in workloads.items():
                folders = [folder_of(work / f"{wname[:5]}-{i}", n) for i in range(2)]
                for sname, (procs, extra) in scenarios.items():
                    suffix = ".npy" if wname.startswith("embed") else ".jsonl"
                    cmds = [command(folders[i], work / f"out-{i}{suffix}") + extra for i in range(procs)]
                    wall = run_together(cmds)
                    results[wname][sname].append(procs * n / wall)
                    print(
                        f"round {r + 1}: {wname}, {sname}: {procs * n / wall:.2f} images/s in all ({wall:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu = cpu_description()
    table = {}
    rows = []
    for wname, by in results.items():
        alone = statistics.median(by["alone"])
        table[wname] = {s: statistics.median(v) for s, v in by.items()}
        rows.append([wname, *(f"{m:.2f} ({m / alone:.2f}x)" for m in table[wname].values())])
    print_table(
        "Two processes on the same cores",
        ["workload", "one process alone", "two, default threads (each its share)", f"two, each `-t {cpus}`"],
        rows,
        note=f"total images/s of all processes, load included; medians of {args.rounds} rounds",
    )
    OUT.mkdir(parents=True, exist_ok=True)
    dest = OUT / "bench_shared_cores.json"
    dest.write_text(json.dumps({"cpu": cpu, "rounds": args.rounds, "medians": table, "runs": results}, indent=1))
    print(f"written to {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
