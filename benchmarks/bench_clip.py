"""CLIP ViT-B/32 speed and memory on ggml vs the plain numpy forward pass, in the same run.

Builds a real-size random-weight openai/clip-vit-base-patch32 (the cost per image and per text is
the same as with trained weights) from ../shared/data/configs with the test fixture builder,
converts it to F16 and Q8_0 with vlmcli's converter, then measures each engine in a fresh process
(so load time and peak RSS are its own): images/s at batch 1 and 32, texts/s at batch 32, medians
of --runs runs. The numpy reference (tests/clip_reference.py, float32 here) is the baseline for the
ratios. Prints a table and writes JSON to benchmarks/out/.

    python benchmarks/bench_clip.py                 # F16 + Q8_0, 5 runs, all cores and 1 thread
    python benchmarks/bench_clip.py --runs 3 --threads 1 --keep /tmp/clip-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CONFIG = ROOT.parent / "shared" / "data" / "configs" / "clip-vit-base-patch32-openai.config.json"
OUT = ROOT / "benchmarks" / "out"
LABELS = ["cat", "dog", "car", "tree", "house", "bird", "boat", "flower", "horse", "pizza", "guitar", "bicycle",
          "mountain", "beach", "city at night", "bowl of soup", "red apple", "laptop", "teddy bear", "clock",
          "train", "airplane", "cup of coffee", "chair", "book", "sunset over the sea", "snowy forest", "robot",
          "violin", "pair of shoes", "hot air balloon", "lighthouse"]


def cpu_info() -> dict:
    """The CPU the figures come from, and what the ggml build uses of it: ggml picks kernels by both."""
    import llama_cpp

    fields = {}
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    build = llama_cpp.llama_print_system_info().decode()
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "cpu_avx2": "avx2" in flags, "cpu_avx512": "avx512f" in flags,
            "ggml_features": re.findall(r"(\w+) = 1", build)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_models(work: Path) -> dict[str, Path]:
    """The real-size checkpoint (built once into work/) converted to F16 and Q8_0."""
    from fixtures.clip import build_clip_checkpoint

    from vlmcli.convert.clip import convert_clip

    ckpt = work / "clip-vit-base-patch32"
    if not (ckpt / "model.safetensors").exists():
        print("building a real-size random-weight ViT-B/32 checkpoint ...", file=sys.stderr)
        build_clip_checkpoint(ckpt, size="real", config=CONFIG, seed=0)
    out = {}
    for quant in ("F16", "Q8_0"):
        path = work / "gguf" / f"clip-vit-base-patch32-{quant}.gguf"
        if not path.exists():
            print(f"converting to {quant} ...", file=sys.stderr)
            path = convert_clip(ckpt, work / "gguf", quant)
        out[quant] = path
    return out


def inputs(n_images: int) -> tuple[np.ndarray, np.ndarray]:
    from vlmcli.engines.clip_tokenizer import default_tokenizer

    pixels = np.random.default_rng(0).standard_normal((n_images, 3, 224, 224)).astype(np.float32)
    tokens, _ = default_tokenizer().tokenize([f"a photo of a {label}." for label in LABELS])
    return pixels, tokens


def timed(fn, runs: int) -> float:
    """Median seconds of fn() over runs, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(kind: str, gguf_path: Path, runs: int, threads: int | None) -> dict:
    """Runs in its own process; prints one JSON object."""
    pixels, tokens = inputs(32)
    t0 = time.perf_counter()
    if kind == "ggml":
        from vlmcli.engines.clip import ClipModel

        model = ClipModel.load(gguf_path, n_threads=threads)
        images, texts = model.encode_images, model.encode_texts
    else:
        from clip_reference import ReferenceClip

        ref = ReferenceClip(gguf_path, dtype=np.float32)
        # About the engine's work: positions after the end token cannot change the pooled states
        # (causal attention); the engine runs each text up to its own end token rounded up to
        # clip.TEXT_LENGTH_STEP, the baseline up to the batch's last end token.
        n_ctx = int(tokens.argmax(1).max()) + 1
        images, texts = ref.encode_images, lambda t: ref.encode_texts(t[:, :n_ctx])
    load_s = time.perf_counter() - t0
    one = timed(lambda: images(pixels[:1]), runs)
    batch = timed(lambda: images(pixels), runs)
    text = timed(lambda: texts(tokens), runs)
    return {
        "engine": kind, "gguf": str(gguf_path), "load_s": load_s,
        "images_per_s_batch1": 1 / one, "images_per_s_batch32": len(pixels) / batch,
        "texts_per_s_batch32": len(tokens) / text, "text_tokens": int(tokens.argmax(1).max()) + 1,
        "peak_rss_mb": peak_rss_mb(), "threads": threads or os.cpu_count(), "runs": runs,
    }


def run_worker(kind: str, path: Path, runs: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--gguf", str(path), "--runs", str(runs)]
    if threads:
        cmd += ["--threads", str(threads)]
    print(f"measuring {kind} on {path.name} ...", file=sys.stderr)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="ggml threads (default: all cores)")
    ap.add_argument("--keep", type=Path, default=None, help="build/reuse the models in this folder")
    ap.add_argument("--worker", choices=["ggml", "numpy"], help=argparse.SUPPRESS)
    ap.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.gguf, args.runs, args.threads)))
        return 0

    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = cpu_info()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-clip-"))
    try:
        models = build_models(work)
        # all cores (the default) and one thread: on a busy machine ggml's threads wait for each
        # other at every op, so both figures say something
        threads = [args.threads] if args.threads else [None, 1]
        rows = [run_worker("ggml", models[q], args.runs, t) for t in threads for q in ("F16", "Q8_0")]
        rows.append(run_worker("numpy", models["F16"], args.runs, None))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    base = rows[-1]
    for r in rows:
        if r["engine"] == "numpy":
            r["name"] = f"numpy float32 (F16 weights) {r['threads']}t"
        else:
            r["name"] = f"ggml {Path(r['gguf']).stem.split('-')[-1]} {r['threads']}t"
        for key in ("images_per_s_batch1", "images_per_s_batch32", "texts_per_s_batch32"):
            r[f"{key}_vs_numpy"] = r[key] / base[key]

    header = f"{'engine':<30} {'load s':>7} {'img/s b1':>12} {'img/s b32':>13} {'texts/s b32':>14} {'peak RSS MB':>12}"
    print(f"CLIP ViT-B/32, real size, random weights; {os.cpu_count()} cores; medians of {args.runs} runs")
    print(f"CPU: {cpu['cpu']} (AVX2 {'yes' if cpu['cpu_avx2'] else 'no'}, AVX-512 {'yes' if cpu['cpu_avx512'] else 'no'}); "
          f"ggml build: {' '.join(cpu['ggml_features'])}")
    print(header)
    for r in rows:
        print(f"{r['name']:<30} {r['load_s']:>7.2f} "
              f"{r['images_per_s_batch1']:>6.1f} x{r['images_per_s_batch1_vs_numpy']:<4.1f} "
              f"{r['images_per_s_batch32']:>6.1f} x{r['images_per_s_batch32_vs_numpy']:<5.1f} "
              f"{r['texts_per_s_batch32']:>7.1f} x{r['texts_per_s_batch32_vs_numpy']:<5.1f} {r['peak_rss_mb']:>12.0f}")
    print(f"(texts: 32 prompts 'a photo of a <label>.', {base['text_tokens']} positions after trimming at the last EOT; "
          f"load average before: {load_before})")
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"bench_clip-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"model": "clip-vit-base-patch32 (random weights)", "cpu_count": os.cpu_count(), **cpu,
                               "load_average_before": load_before, "results": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
