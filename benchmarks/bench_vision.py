"""SmolVLM2's vision encoder: one 512 px pass on vlm's kernels against mtmd's, on the same mmproj and tile.

Builds (once, cached) the real-size random-weight SmolVLM2 as bench_vlm.py does, opens it in vlm's
engine, lets mtmd preprocess the sample photo at full detail, and encodes the same tile (one image
chunk: 1024 patches, 64 tokens) with mtmd_encode_chunk and with vlm's SigLIP encoder, rounds
interleaved, in one process and at one thread count. Reports the medians, their ratio and the lowest
per-token cosine between the two encoders' embeddings over every chunk of the photo.

--ask compares whole commands instead, each run a fresh process, rounds interleaved: `vlm ask` at full
detail (encoding cache off) and llama.cpp's `llama-mtmd-cli` (built by llama_tools.py from the pinned
llama-cpp-python), on the same GGUFs, photo, prompt, threads and token budget, greedy; with
--with-mtmd-encoder also `vlm ask` with VLM_VISION_KERNELS=mtmd (llama.cpp's encoder in vlm).

    python benchmarks/bench_vision.py --threads 2 --runs 7
    VLM_VISION_KERNELS=i16-avx2 python benchmarks/bench_vision.py     # a given form of vlm's kernels
    python benchmarks/bench_vision.py --forms i16-vnni,i16-avx2,bf16   # several, in one run
    python benchmarks/bench_vision.py --ask --threads 2 --runs 3 --tokens 32
    perf record -g python benchmarks/bench_vision.py --vlm-only --runs 20   # where vlm's pass goes

--vlm-only runs vlm's encoder alone on the tile (no mtmd passes, no cosine), so a profiler sees
nothing else once the model is loaded; it prints the median wall and CPU time of a pass.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

SAMPLE = ROOT / "vlmcli" / "data" / "chelsea.jpg"
PROMPT = "Describe this image."


def ask_commands(
    model: Path, mmproj: Path, threads: int, tokens: int, home: Path, mtmd_row: bool, llama_build: tuple[str, ...] = ()
) -> dict[str, tuple[list[str], dict]]:
    """name -> (command, environment) for --ask; llama_build: the cmake arguments of the llama-mtmd-cli build."""
    from llama_tools import tool

    vlm = str(Path(sys.executable).with_name("vlm"))
    ask = [vlm, "ask", "-i", str(SAMPLE), PROMPT, "-m", str(model), "--mmproj", str(mmproj), "--detail", "high"]
    ask += ["-t", str(threads), "-n", str(tokens), "--no-cache", "-q"]
    env = {**os.environ, "VLM_HOME": str(home)}  # VLM_VISION_KERNELS, where set, picks vlm's form
    cli = [str(tool("llama-mtmd-cli", llama_build)), "-m", str(model), "--mmproj", str(mmproj), "--image", str(SAMPLE)]
    cli += ["-p", f"<__media__>{PROMPT}", "-n", str(tokens), "-t", str(threads), "--temp", "0", "-c", "8192"]
    commands = {"vlm ask": (ask, env), "llama-mtmd-cli": (cli, env)}
    if mtmd_row:
        commands["vlm ask, VLM_VISION_KERNELS=mtmd"] = (ask, {**env, "VLM_VISION_KERNELS": "mtmd"})
    return commands


def ask_walls(args: argparse.Namespace, model: Path, mmproj: Path) -> None:
    home = Path(args.cache) / "vlm-home"
    build = tuple(args.llama_cmake_arg)
    commands = ask_commands(model, mmproj, args.threads, args.tokens, home, args.with_mtmd_encoder, build)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, (cmd, env) in commands.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            walls[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(v) for name, v in walls.items()}
    peer = medians["llama-mtmd-cli"]
    for name, (cmd, _env) in commands.items():
        ratio = peer / medians[name]
        print(f"{name:36s} median {medians[name]:7.2f} s  ({ratio:.2f}x llama-mtmd-cli)  runs {walls[name]}")
        print("   ", " ".join(cmd))


def vlm_only(encoder, ctx, tile, width: int, args: argparse.Namespace) -> None:
    """--vlm-only: args.runs passes of vlm's encoder on one tile; the median wall and CPU seconds."""
    walls, cpus = [], []
    for _ in range(args.runs):
        c0, t0 = time.process_time(), time.perf_counter()
        encoder.encode(ctx, tile.ptr, tile.n_tokens, width, args.threads)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    median = {"wall": round(statistics.median(walls), 3), "cpu": round(statistics.median(cpus), 3)}
    print(json.dumps({"threads": args.threads, "runs": args.runs, "median_s": median}))


def main() -> None:
    from llama_tools import add_build_option

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256m", choices=("256m", "500m"))
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    ap.add_argument("--ask", action="store_true", help="whole commands: vlm ask against llama-mtmd-cli")
    ap.add_argument("--tokens", type=int, default=32, help="with --ask: most tokens generated")
    ap.add_argument("--with-mtmd-encoder", action="store_true", help="with --ask: also vlm ask on mtmd's encoder")
    ap.add_argument("--vlm-only", action="store_true", help="vlm's encoder alone, for a profiler")
    add_build_option(ap)  # with --ask: llama-mtmd-cli's build
    ap.add_argument("--forms", help="kernel forms to time, comma-separated (default: the one vlm picks here)")
    args = ap.parse_args()

    from bench_vlm import build_model

    from vlmcli.engines import clip_kernels
    from vlmcli.engines.llama import EngineOptions, VlmEngine
    from vlmcli.engines.llama_native import mtmd
    from vlmcli.engines.siglip_chunks import MtmdEncoder, VlmEncoder
    from vlmcli.engines.vision_path import choose_vision_path, kernels_path
    from vlmcli.images import load_image

    model, mmproj = build_model(args.size, args.quant, Path(args.cache))
    if args.ask:
        return ask_walls(args, model, mmproj)
    engine = VlmEngine(model, mmproj, EngineOptions(detail="high", n_threads=args.threads, n_ctx=4096))
    path = choose_vision_path(True, engine.mmproj_info)
    forms = args.forms.split(",") if args.forms else [path.form]
    if forms == [None]:
        sys.exit(f"vlm's kernels do not run this projector here: {path.reason}")
    for form in forms:
        if form not in clip_kernels.FORMS or not clip_kernels.available(form):
            sys.exit(f"--forms: this CPU does not run vlm's {form!r} form")
        runs = kernels_path(form, engine.mmproj_info)
        if runs.form is None:
            sys.exit(f"--forms: the {form} form does not run here: {runs.reason}")
    encoders = {form: VlmEncoder.load(mmproj, engine.mmproj_info, form, args.threads) for form in forms}
    ours = encoders[forms[0]]
    theirs = MtmdEncoder()
    width = ours.siglip.config.projection_dim
    rgb = np.ascontiguousarray(np.asarray(load_image(SAMPLE).convert("RGB"), dtype=np.uint8))
    ctx = engine._mtmd_context(-1)
    chunks_ptr, chunks = engine._tokenize_with_image(rgb, "User:" + mtmd.mtmd_default_marker().decode(), -1)
    images = [c for c in chunks if c.kind == "image"]
    if args.vlm_only:
        vlm_only(ours, ctx, images[0], width, args)
        mtmd.mtmd_input_chunks_free(chunks_ptr)
        for enc in encoders.values():
            enc.close()
        engine.close()
        return

    lowest = dict.fromkeys(forms, 1.0)
    for c in images:
        a = theirs.encode(ctx, c.ptr, c.n_tokens, width, args.threads)
        for form, enc in encoders.items():
            b = enc.encode(ctx, c.ptr, c.n_tokens, width, args.threads)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            lowest[form] = min(lowest[form], float(cos.min()))

    tile = images[0]
    times: dict[str, list[float]] = {"mtmd": [], **{f"vlm {form}": [] for form in forms}}
    for _ in range(args.runs):
        for name, enc in (("mtmd", theirs), *((f"vlm {form}", e) for form, e in encoders.items())):
            t0 = time.perf_counter()
            enc.encode(ctx, tile.ptr, tile.n_tokens, width, args.threads)
            times[name].append(time.perf_counter() - t0)
    mtmd.mtmd_input_chunks_free(chunks_ptr)
    for enc in encoders.values():
        enc.close()
    engine.close()
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "model": Path(mmproj).name,
                "vlm_forms": forms,
                "threads": args.threads,
                "runs": args.runs,
                "chunks": len(images),
                "median_s": {k: round(v, 3) for k, v in medians.items()},
                "speedup": {form: round(medians["mtmd"] / medians[f"vlm {form}"], 2) for form in forms},
                "lowest_token_cosine": lowest,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
