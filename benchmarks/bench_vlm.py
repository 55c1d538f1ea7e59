"""SmolVLM2 speed and memory on llama.cpp: load, image encode, prefill, decode, peak RSS.

Builds a real-size random-weight SmolVLM2 (the cost per token and per image is the same as with
trained weights) from ../shared/data/configs, converts and quantizes it with vlmcli's converter,
then runs each measurement in a fresh process (so load time and peak RSS are honest) and reports
medians. Detail levels (issue 7) are compared in the same run.

    python benchmarks/bench_vlm.py                      # 256M, Q8_0, 5 runs, detail low/auto/high
    python benchmarks/bench_vlm.py --size 500m --runs 3 --details low,high --images small,large
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SAMPLE = ROOT / "vlmcli" / "data" / "chelsea.jpg"
CONFIGS = ROOT.parent / "shared" / "data" / "configs"
OUT = ROOT / "benchmarks" / "out"


def build_model(size: str, quant: str, cache: Path) -> tuple[Path, Path]:
    """Build (once, cached) the real-size random-weight checkpoint and convert it."""
    from fixtures.smolvlm2 import build_smolvlm2_checkpoint

    from vlmcli.convert import convert_checkpoint

    name = {"256m": "SmolVLM2-256M-Video-Instruct", "500m": "SmolVLM2-500M-Video-Instruct"}[size]
    out = cache / f"{name}-{quant}"
    done = out / "done.json"
    if done.exists():
        files = json.loads(done.read_text())
        return Path(files["model"]), Path(files["mmproj"])
    ckpt = cache / name
    if not (ckpt / "config.json").exists():
        print(f"building real-size random-weight {name} ...", file=sys.stderr)
        build_smolvlm2_checkpoint(ckpt, CONFIGS / f"smolvlm2-{size}.config.json", size="real")
    print(f"converting to GGUF {quant} ...", file=sys.stderr)
    paths = convert_checkpoint(ckpt, out, quant=quant)
    mmproj = next(p for p in paths if p.name.startswith("mmproj"))
    model = next(p for p in paths if not p.name.startswith("mmproj"))
    done.write_text(json.dumps({"model": str(model), "mmproj": str(mmproj)}))
    return model, mmproj


def make_large_photo(path: Path) -> Path:
    """A 2000x1333 photo: the sample upscaled (a camera-sized input for the tiling cost)."""
    from PIL import Image

    if not path.exists():
        Image.open(SAMPLE).resize((2000, 1333), Image.LANCZOS).save(path, quality=92)
    return path


def worker(args: argparse.Namespace) -> None:
    """One measurement in this process: load, one image, `--tokens` generated tokens."""
    from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
    from vlmcli.images import load_image

    t0 = time.perf_counter()
    engine = VlmEngine(args.model, args.mmproj, EngineOptions(n_threads=args.threads, detail=args.detail, n_ctx=8192))
    image = load_image(args.image)
    first_token: list[float] = []
    gen = GenerationOptions(max_tokens=args.tokens, ignore_eos=True)
    start = time.perf_counter()
    g = next(engine.ask(image, ["Describe this image."], gen, on_token=lambda s: first_token.append(time.perf_counter()) if not first_token else None))
    total = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = g.timings
    print(json.dumps({
        "load_ms": engine.load_ms,
        "image_encode_ms": t.image_encode_ms,
        "prefill_ms": t.prefill_ms,
        "prefill_tokens": t.prefill_tokens,
        "prefill_tok_s": t.prefill_tokens_per_s,
        "decode_tok_s": t.decode_tokens_per_s,
        "generated": g.generated_tokens,
        "image_tokens": g.image.image_tokens,
        "encoder_passes": g.image.encoder_passes,
        "ttft_ms": ((first_token[0] if first_token else time.perf_counter()) - start) * 1000,
        "image_total_s": total,
        "peak_rss_mb": rss_mb,
        "wall_ms": (time.perf_counter() - t0) * 1000,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256m", choices=["256m", "500m"])
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--details", default="low,auto,high")
    ap.add_argument("--images", default="small", help="small (the 451x300 sample), large (2000x1333)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--image")
    ap.add_argument("--detail")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, mmproj = build_model(args.size, args.quant, cache)
    images = {"small": SAMPLE, "large": make_large_photo(cache / "large.jpg")}
    rows = []
    for image_name in args.images.split(","):
        for detail in args.details.split(","):
            runs = []
            for _ in range(args.runs):
                cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--mmproj", str(mmproj),
                       "--image", str(images[image_name]), "--detail", detail, "--tokens", str(args.tokens),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            med.update(size=args.size, quant=args.quant, image=image_name, detail=detail, runs=args.runs)
            rows.append(med)
            print(
                f"{args.size} {args.quant} {image_name:5s} {detail:4s}: passes {med['encoder_passes']:.0f}, "
                f"image tokens {med['image_tokens']:.0f}, load {med['load_ms']:.0f} ms, encode {med['image_encode_ms']:.0f} ms, "
                f"prefill {med['prefill_tok_s']:.0f} tok/s, decode {med['decode_tok_s']:.1f} tok/s, "
                f"TTFT {med['ttft_ms']:.0f} ms, image {1 / med['image_total_s']:.3f} img/s, peak RSS {med['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    OUT.mkdir(parents=True, exist_ok=True)
    dest = OUT / f"vlm-{args.size}-{args.quant}.json"
    dest.write_text(json.dumps(rows, indent=1))
    print(f"(medians of {args.runs} runs; written to {dest})")


if __name__ == "__main__":
    main()
