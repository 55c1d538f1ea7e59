"""`vlm serve` throughput and latency: requests/s and p50/p95 at concurrency 1, 2, 4, against the CLI in a loop.

Builds (once, cached) the real-size random-weight SmolVLM2 256M (Q8_0 + F16 mmproj, bench_vlm.py) and
CLIP ViT-B/32 (F16, bench_clip.py): the cost per request is the real models', the words are noise.
Starts one `vlm serve` holding both (--workers per model, sharing the cores per request unless
--threads is given, --detail low), then for each model and concurrency sends --requests requests
from that many client threads:
- chat: the 451x300 sample as a data: URL + a question, --tokens generated tokens (greedy);
- embeddings: the same image as a data: URL (one CLIP image pass per request).
The baseline is what a script without a server does: `vlm ask IMAGE Q -n TOKENS --detail low` and
`vlm embed IMAGE` run in a loop, a fresh process (and model load) per request, with all the cores.
Every request sends the same image, so the store's image-encoding cache is switched off
(VLM_CACHE_SIZE=0) for the server and the CLI alike: the figures are those of distinct images.

    python benchmarks/bench_serve.py                           # 8 requests per level, 32 tokens
    python benchmarks/bench_serve.py --requests 4 --levels 1,2 --workers 1 --threads 2
Writes benchmarks/out/bench_serve.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from machine import cpu_description  # noqa: E402
from report import print_table  # noqa: E402

SAMPLE = ROOT / "vlmcli" / "data" / "chelsea.jpg"
OUT = ROOT / "benchmarks" / "out"
QUESTION = "Describe this image."


def build(cache: Path) -> tuple[Path, Path]:
    """The 256M's folder (model + mmproj) and the CLIP F16 GGUF."""
    from bench_clip import build_models as build_clip
    from bench_vlm import build_model as build_vlm

    model, _ = build_vlm("256m", "Q8_0", cache)
    _, ggufs = build_clip(cache / "clip")
    clip = ggufs["F16"]
    return model.parent, clip


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (small samples: no interpolation between two requests)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def post(url: str, body: dict) -> float:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
    return time.perf_counter() - t0


def load(url: str, body: dict, requests: int, concurrency: int) -> dict:
    post(url, body)  # warm: the first request of a worker touches pages the later ones reuse
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda _: post(url, body), range(requests)))
    wall = time.perf_counter() - t0
    return {
        "requests": requests,
        "concurrency": concurrency,
        "req_s": requests / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 95),
    }


ENV = {**os.environ, "VLM_CACHE_SIZE": "0"}  # no image-encoding cache: each request encodes its image


def cli_loop(args: list[str], runs: int) -> dict:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vlmcli", *args], check=True, capture_output=True, env=ENV)
        times.append(time.perf_counter() - t0)
    return {
        "requests": runs,
        "concurrency": 1,
        "req_s": 1 / statistics.median(times),
        "p50_s": statistics.median(times),
        "p95_s": percentile(times, 95),
    }


def start_server(vlm_dir: Path, clip: Path, workers: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "vlmcli",
        "serve",
        "--model",
        str(vlm_dir),
        "--model",
        str(clip),
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--detail",
        "low",
        "--queue",
        "64",
        "--max-n",
        "1",
        "--offline",
    ]
    cmd += ["--threads", str(threads)] if threads else []
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=5).read()
            return process, base
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit("the server did not start") from None
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    ap.add_argument("--levels", default="1,2,4")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="worker processes per model")
    ap.add_argument("--threads", type=int, default=None, help="threads per worker (default: shared per request)")
    ap.add_argument("--cli-runs", type=int, default=3)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    args = ap.parse_args()

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    vlm_dir, clip = build(cache)
    cpu = cpu_description()
    data_url = "data:image/jpeg;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()
    chat_body = {
        "model": vlm_dir.name,
        "max_tokens": args.tokens,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": QUESTION}],
            }
        ],
    }
    embed_body = {"model": clip.stem, "input": [data_url]}

    rows = []
    ask = [
        "ask",
        str(SAMPLE),
        QUESTION,
        "--model",
        str(vlm_dir),
        "--detail",
        "low",
        "-n",
        str(args.tokens),
        "--offline",
    ]
    rows.append({"model": "smolvlm2-256m", "how": "vlm ask loop", **cli_loop(ask, args.cli_runs)})
    rows.append(
        {
            "model": "clip-b32",
            "how": "vlm embed loop",
            **cli_loop(["embed", str(SAMPLE), "--model", str(clip)], args.cli_runs),
        }
    )
    process, base = start_server(vlm_dir, clip, args.workers, args.threads)
    try:
        for model, route, body in (
            ("smolvlm2-256m", "/v1/chat/completions", chat_body),
            ("clip-b32", "/v1/embeddings", embed_body),
        ):
            threads = f"{args.threads} threads" if args.threads else "shared cores"
            for level in [int(x) for x in args.levels.split(",")]:
                rows.append(
                    {
                        "model": model,
                        "how": f"serve ({args.workers} workers, {threads})",
                        **load(base + route, body, args.requests, level),
                    }
                )
    finally:
        process.terminate()
        process.wait(60)
    print_table(
        "`vlm serve` against the CLI in a loop",
        ["model", "how", "concurrency", "requests/s", "p50", "p95", "requests"],
        [
            [
                r["model"],
                r["how"],
                r["concurrency"],
                f"{r['req_s']:.2f}",
                f"{r['p50_s']:.2f} s",
                f"{r['p95_s']:.2f} s",
                r["requests"],
            ]
            for r in rows
        ],
        note=f"the small photo as a data: URL, {args.tokens} greedy tokens; latency includes queueing",
    )
    OUT.mkdir(parents=True, exist_ok=True)
    dest = OUT / "bench_serve.json"
    dest.write_text(json.dumps({"cpu": cpu, "tokens": args.tokens, "rows": rows}, indent=1))
    print(f"written to {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
