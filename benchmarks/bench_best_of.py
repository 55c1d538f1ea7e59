"""--best-of N cost: wall time of N = 1, 2, 4, 8 candidates (64 tokens each, EOS ignored) on one image.

The image is encoded once and the prompt evaluated once; the N candidates share its KV cells and
decode in one llama.cpp batch per step. Real-size random-weight SmolVLM2-256M (built and converted
once by bench_vlm.build_model), low detail, the sample photo; medians of several runs in one
process, N interleaved so that other load on the machine falls on every N alike.

    python benchmarks/bench_best_of.py [--runs 5] [--tokens 64] [--ns 1,2,4,8] [--no-peer]

The peer: llama.cpp's own llama-batched-bench (built from the pinned sdist by llama_tools.py) on the
same GGUF, with a shared prompt of the same length (-pps, a unified KV cache) and the same N, tokens
and threads: its decode speed per N is what llama.cpp itself reaches for this batched decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import SAMPLE, build_model  # noqa: E402
from llama_tools import add_build_option  # noqa: E402
from machine import cpu_description  # noqa: E402
from report import print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ns", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp's llama-batched-bench")
    add_build_option(ap)  # llama-batched-bench's build
    args = ap.parse_args()
    ns = [int(n) for n in args.ns.split(",")]

    from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
    from vlmcli.images import load_image

    model, mmproj = build_model("256m", "Q8_0", Path(args.cache))
    engine = VlmEngine(model, mmproj, EngineOptions(n_threads=args.threads, detail="low", n_seq_max=max(ns)))
    image = load_image(SAMPLE)
    prompt = "Describe this image in one sentence."
    wall: dict[int, list[float]] = {n: [] for n in ns}
    decode_tps: dict[int, list[float]] = {n: [] for n in ns}
    next(engine.ask(image, [prompt], GenerationOptions(max_tokens=4)))  # warm-up
    for _ in range(args.runs):
        for n in ns:
            gen = GenerationOptions(max_tokens=args.tokens, temperature=0.7, seed=1, ignore_eos=True, n=n)
            t0 = time.perf_counter()
            g = next(engine.ask(image, [prompt], gen))
            wall[n].append(time.perf_counter() - t0)
            decode_tps[n].append(g.timings.decode_tokens / (g.timings.decode_ms / 1000))
    prompt_tokens = g.prompt_tokens
    engine.close()
    build = tuple(args.llama_cmake_arg)
    peer = {}
    if not args.no_peer:
        peer = llama_batched_bench(model, prompt_tokens, args.tokens, ns, args.threads, args.runs, build)
    base = statistics.median(wall[ns[0]])
    rows = []
    cells = []
    for n in ns:
        w, tps = statistics.median(wall[n]), statistics.median(decode_tps[n])
        rows.append(
            {
                "n": n,
                "wall_s": w,
                "ratio": w / base,
                "decode_tokens_per_s": tps,
                "llama_batched_bench_tokens_per_s": peer.get(n),
            }
        )
        theirs = f"{peer[n]:.0f}" if n in peer else "-"
        one_sequence = tps / statistics.median(decode_tps[ns[0]])
        cells.append([n, f"{w:.2f} s", f"{w / base:.2f}x", f"{tps:.0f}", f"{one_sequence:.2f}x", theirs])
    print_table(
        "`--best-of N`" if args.no_peer else "`--best-of N` against llama-batched-bench",
        [
            "N",
            "wall time",
            "vs N=1",
            "decode tokens/s (all candidates)",
            "vs one sequence",
            "llama-batched-bench decode tokens/s",
        ],
        cells,
        note=f"256M Q8_0 (+F16 mmproj) real size, low detail, {args.tokens} tokens per candidate, "
        f"{args.threads} threads, medians of {args.runs}",
    )
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "best_of.json").write_text(json.dumps({"cpu": cpu_description(), "rows": rows}, indent=1))


def llama_batched_bench(
    model: Path, prompt_tokens: int, tokens: int, ns: list[int], threads: int, runs: int, build: tuple[str, ...] = ()
) -> dict[int, float]:
    """llama.cpp's own batched decoding on the same GGUF: N -> decode tokens/s (median of runs)."""
    from llama_tools import tool

    cmd = [
        str(tool("llama-batched-bench", build)),
        "-m",
        str(model),
        "-c",
        str(prompt_tokens + max(ns) * tokens + 64),
        "-npp",
        str(prompt_tokens),
        "-ntg",
        str(tokens),
        "-npl",
        ",".join(map(str, ns)),
        "-pps",
        "-kvu",
        "-t",
        str(threads),
        "--output-format",
        "jsonl",
    ]
    speeds: dict[int, list[float]] = {n: [] for n in ns}
    for _ in range(runs):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                speeds[int(row["pl"])].append(float(row["speed_tg"]))
    return {n: statistics.median(v) for n, v in speeds.items() if v}


if __name__ == "__main__":
    main()
