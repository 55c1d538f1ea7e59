"""`vlm serve` throughput and latency: requests/s and p50/p95 at concurrency 1, 2, 4, against the CLI in a loop.

Builds (once, cached) the real-size random-weight SmolVLM2 256M (Q8_0 + F16 mmproj, bench_vlm.py) and
CLIP ViT-B/32 (F16, bench_clip.py): the cost per request is the real models', the words are noise.
Starts one `vlm serve` holding both (--workers per model, sharing the cores per request unless
--threads is given, --detail low), then for each model and concurrency sends --requests requests
from that many client threads:
- chat: the 451x300 sample as a data: URL + a question, --tokens generated tokens (greedy); a distinct
  copy per request (a 4x4 corner block recoloured), since a chat worker keeps its last prompt's KV;
- embeddings: the same image as a data: URL (one CLIP image pass per request).
The baseline is what a script without a server does: `vlm ask IMAGE Q -n TOKENS --detail low` and
`vlm embed IMAGE` run in a loop, a fresh process (and model load) per request, with all the cores.
The store's image-encoding cache is switched off (VLM_CACHE_SIZE=0) for the server and the CLI
alike: the figures are those of distinct images.

    python benchmarks/bench_serve.py                           # 8 requests per level, 32 tokens
    python benchmarks/bench_serve.py --requests 4 --levels 1,2 --workers 1 --threads 2
Writes benchmarks/out/bench_serve.json.

--peer llama-server compares `vlm serve` (SmolVLM2 only) with llama.cpp's own `llama-server`, built
from the pinned llama-cpp-python sdist (llama_tools.py), on the same GGUF and mmproj, through both
servers' /v1/chat/completions, at concurrency 1, 4 and 8. The work is made equal: llama-server has no
overview-only mode, so it runs with `--image-max-tokens 64` (mtmd caps the image at one 512 px tile:
the overview plus one tile, two encoder passes, 128 image tokens) and vlm with `--max-tiles 1` (the
same mtmd cap, the same two passes); `--vlm-detail low` adds vlm at its own low detail (the overview
alone, one pass) beside them. Each request carries a distinct image (the sample with a few pixels
changed), so neither server's prompt or KV cache can skip an encode. The servers run one at a time,
in rounds that alternate them (--rounds); every figure is the median over the rounds, and each row
names the prompt and generated tokens the server reported.

    python benchmarks/bench_serve.py --peer llama-server --rounds 2
    python benchmarks/bench_serve.py --peer llama-server --servers llama-np8,vlm-w1 --levels 1,4
Writes benchmarks/out/bench_serve_llama_server.json.
"""

from __future__ import annotations

import argparse
import base64
import io
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from llama_tools import add_build_option  # noqa: E402
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


def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """bodies[0] warms the server (the first request of a worker touches pages the later ones reuse); the
    rest are measured."""
    post(url, bodies[0])
    requests = len(bodies) - 1
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda body: post(url, body), bodies[1:]))
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(process: subprocess.Popen, base: str, what: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=5).read()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"{what} did not start") from None
            time.sleep(0.5)


def vlm_serve_command(models: list[Path], port: int, options: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "vlmcli", "serve"]
    for model in models:
        cmd += ["--model", str(model)]
    return cmd + ["--port", str(port), *options, "--queue", "64", "--max-n", "1", "--offline"]


def start_server(vlm_dir: Path, clip: Path, workers: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    options = ["--workers", str(workers), "--detail", "low"] + (["--threads", str(threads)] if threads else [])
    cmd = vlm_serve_command([vlm_dir, clip], port, options)
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(process, base, "the server")
    return process, base


PEER_LEVELS = "1,4,8"
SLOT_CTX = 2048  # tokens per llama-server slot with -np 8: the prompt (about 150) and 32 tokens fit many times
# mtmd's cap on the image: one 512 px tile's tokens (SmolVLM2's 1024 patches after its 4x4 pixel shuffle),
# under which mtmd makes the overview and one tile; vlm's --max-tiles 1 sets the same cap.
ONE_TILE_TOKENS = "64"


@dataclass(frozen=True)
class PeerServer:
    key: str  # what --servers names
    label: str  # what the table says
    kind: str  # "llama" (llama-server) or "vlm" (vlm serve)
    args: tuple[str, ...]  # the server's own flags beyond the model, address and threads
    build: tuple[str, ...] = ()  # llama-server: the cmake options of its build (--llama-cmake-arg)


PEER_SERVERS = (
    PeerServer("llama-np8", "llama-server -np 8", "llama", ("-np", "8", "-c", str(8 * SLOT_CTX))),
    PeerServer("llama-auto", "llama-server (-np, -c defaults)", "llama", ()),
    PeerServer("vlm-w1", "vlm serve --workers 1 --max-tiles 1", "vlm", ("--workers", "1", "--max-tiles", "1")),
    PeerServer("vlm-w2", "vlm serve --workers 2 --max-tiles 1", "vlm", ("--workers", "2", "--max-tiles", "1")),
    PeerServer("vlm-low-w1", "vlm serve --workers 1 --detail low", "vlm", ("--workers", "1", "--detail", "low")),
    PeerServer("vlm-low-w2", "vlm serve --workers 2 --detail low", "vlm", ("--workers", "2", "--detail", "low")),
)


def distinct_images(count: int) -> list[str]:
    """The sample as `count` data: URLs that differ in a 4x4 corner block: the same work per request, and
    no prompt, KV or encoding cache of either server can recognise an image it has seen."""
    from PIL import Image

    base = Image.open(SAMPLE).convert("RGB")
    urls = []
    for i in range(count):
        image = base.copy()
        image.paste((i * 37 % 256, i * 91 % 256, i * 53 % 256), (0, 0, 4, 4))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=95)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def chat_body(model: str, url: str, tokens: int) -> dict:
    return {
        "model": model,
        "max_tokens": tokens,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
            }
        ],
    }


def post_chat(url: str, body: dict) -> tuple[float, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - t0, answer


def start_peer(server: PeerServer, vlm_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if server.kind == "llama":
        from llama_tools import tool

        gguf = next(vlm_dir.glob("SmolVLM2*.gguf"))
        mmproj = next(vlm_dir.glob("mmproj-*.gguf"))
        cmd = [str(tool("llama-server", server.build)), "-m", str(gguf), "--mmproj", str(mmproj), "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "-t", str(os.cpu_count() or 1), "--image-max-tokens", ONE_TILE_TOKENS]
        cmd += list(server.args)
    else:
        cmd = vlm_serve_command([vlm_dir], port, list(server.args))
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(process, base, server.label)
    return process, base


def peer_load(url: str, bodies: list[dict], concurrency: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda body: post_chat(url, body), bodies))
    wall = time.perf_counter() - t0
    latencies = [latency for latency, _ in answers]
    usages = [answer["usage"] for _, answer in answers]
    timings = [answer["timings"] for _, answer in answers if "timings" in answer]  # llama-server's own
    return {
        "requests": len(bodies),
        "concurrency": concurrency,
        "req_s": len(bodies) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 95),
        "prompt_tokens": sorted({int(u["prompt_tokens"]) for u in usages}),
        "completion_tokens": sorted({int(u["completion_tokens"]) for u in usages}),
        "server_prompt_ms": statistics.median(t["prompt_ms"] for t in timings) if timings else None,
        "server_decode_ms": statistics.median(t["predicted_ms"] for t in timings) if timings else None,
        "load_avg": os.getloadavg()[0],
    }


def peer_round(server: PeerServer, vlm_dir: Path, levels: list[int], minimum: int, tokens: int) -> list[dict]:
    """One server started, warmed by one request, then every level; the images restart at the same one for
    every server, so both answer the same requests."""
    counts = [max(minimum, 2 * level) for level in levels]
    urls = distinct_images(1 + sum(counts))
    model = vlm_dir.name if server.kind == "vlm" else "smolvlm2"
    bodies = [chat_body(model, u, tokens) for u in urls]
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / f"bench_serve_{server.key}.log"
    process, base = start_peer(server, vlm_dir, log)
    rows = []
    try:
        route = base + "/v1/chat/completions"
        post_chat(route, bodies[0])  # warm: weights paged in, first graphs built
        start = 1
        for level, count in zip(levels, counts, strict=True):
            rows.append({"server": server.key, **peer_load(route, bodies[start : start + count], level)})
            start += count
    finally:
        process.terminate()
        process.wait(60)
    slots = [line.split("load_model:", 1)[1].strip() for line in log.read_text().splitlines() if "n_slots" in line]
    for row in rows:
        row["server_setup"] = slots[0] if slots else ""
    return rows


def peer_llama_server(args: argparse.Namespace) -> None:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    from bench_vlm import build_model as build_vlm

    model, _ = build_vlm("256m", "Q8_0", cache)
    vlm_dir = model.parent
    levels = [int(x) for x in (args.levels or PEER_LEVELS).split(",")]
    chosen = args.servers.split(",")
    build = tuple(args.llama_cmake_arg)
    servers = [replace(s, build=build) for key in chosen for s in PEER_SERVERS if s.key == key]
    if len(servers) != len(chosen):
        raise SystemExit(f"--servers: choose from {', '.join(s.key for s in PEER_SERVERS)}")
    runs: list[dict] = json.loads(Path(args.previous).read_text())["runs"] if args.previous else []
    done = max((x["round"] for x in runs), default=0)
    for r in range(done, done + args.rounds):
        # Alternate the order, so that neither side always runs first in a round on a shared machine.
        for server in servers if r % 2 == 0 else servers[::-1]:
            print(f"round {r + 1}: {server.label} (load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
            runs += [{"round": r + 1, **row} for row in peer_round(server, vlm_dir, levels, args.requests, args.tokens)]
    ran = {x["server"] for x in runs}
    servers = [s for s in PEER_SERVERS if s.key in ran]

    def median_of(key: str, level: int, field: str) -> float:
        return statistics.median(x[field] for x in runs if x["server"] == key and x["concurrency"] == level)

    reference = next((s.key for s in servers if s.kind == "llama"), None)
    table = []
    for server in servers:
        for level in levels:
            mine = [x for x in runs if x["server"] == server.key and x["concurrency"] == level]
            req_s = median_of(server.key, level, "req_s")
            ratio = f"{req_s / median_of(reference, level, 'req_s'):.2f}x" if reference else ""
            table.append(
                [
                    server.label,
                    level,
                    len(mine),
                    f"{req_s:.3f}",
                    ratio,
                    f"{median_of(server.key, level, 'p50_s'):.1f} s",
                    f"{median_of(server.key, level, 'p95_s'):.1f} s",
                    "/".join(str(t) for t in sorted({t for x in mine for t in x["prompt_tokens"]})),
                    "/".join(str(t) for t in sorted({t for x in mine for t in x["completion_tokens"]})),
                    f"{min(x['load_avg'] for x in mine):.1f}-{max(x['load_avg'] for x in mine):.1f}",
                ]
            )
    print_table(
        "`vlm serve` against llama-server",
        [
            "server",
            "concurrency",
            "rounds",
            "requests/s",
            "vs llama",
            "p50",
            "p95",
            "prompt tok",
            "gen tok",
            "load avg",
        ],
        table,
        note=f"distinct copies of the small photo as data: URLs, {args.tokens} greedy tokens; medians over the "
        f"rounds; 'vs llama' is requests/s over {reference}'s",
    )
    dest = OUT / "bench_serve_llama_server.json"
    dest.write_text(json.dumps({"cpu": cpu_description(), "tokens": args.tokens, "runs": runs}, indent=1))
    print(f"written to {dest}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level (--peer: at least)")
    ap.add_argument("--levels", default=None, help="concurrency levels (default 1,2,4; --peer: 1,4,8)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="worker processes per model")
    ap.add_argument("--threads", type=int, default=None, help="threads per worker (default: shared per request)")
    ap.add_argument("--cli-runs", type=int, default=3)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    ap.add_argument("--peer", choices=["llama-server"], default=None, help="compare with llama.cpp's server")
    ap.add_argument("--servers", default="llama-np8,llama-auto,vlm-w1,vlm-w2", help="--peer: the servers to run")
    ap.add_argument("--rounds", type=int, default=2, help="--peer: rounds, each running every server once")
    ap.add_argument("--previous", default=None, help="--peer: a JSON file of earlier rounds to add these to")
    add_build_option(ap)  # --peer: llama-server's build
    args = ap.parse_args()
    if args.peer:
        peer_llama_server(args)
        return
    args.levels = args.levels or "1,2,4"

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    vlm_dir, clip = build(cache)
    cpu = cpu_description()
    data_url = "data:image/jpeg;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()
    levels = [int(x) for x in args.levels.split(",")]
    # A chat worker keeps its last prompt's KV cells for the next one (a conversation's history), so a
    # repeated image would skip its encode: every chat carries a distinct copy of the photo.
    images = distinct_images(len(levels) * (1 + args.requests))
    per_level = [images[i * (1 + args.requests) : (i + 1) * (1 + args.requests)] for i in range(len(levels))]
    chat_bodies = [[chat_body(vlm_dir.name, url, args.tokens) for url in urls] for urls in per_level]
    embed_bodies = [[{"model": clip.stem, "input": [data_url]}] * (1 + args.requests)] * len(levels)

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
        for model, route, bodies in (
            ("smolvlm2-256m", "/v1/chat/completions", chat_bodies),
            ("clip-b32", "/v1/embeddings", embed_bodies),
        ):
            threads = f"{args.threads} threads" if args.threads else "shared cores"
            for level, level_bodies in zip(levels, bodies, strict=True):
                rows.append(
                    {
                        "model": model,
                        "how": f"serve ({args.workers} workers, {threads})",
                        **load(base + route, level_bodies, level),
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
