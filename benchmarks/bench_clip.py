"""CLIP ViT-B/32 speed against what users would pick instead: transformers' CLIPModel, in one run.

Builds a real-size random-weight openai/clip-vit-base-patch32 checkpoint (the cost per image and per
text is the same as with trained weights) from tests/data/configs with the test fixture builder,
converts it to F16 and Q8_0 with vlmcli's converter, and measures, each in a fresh process (so load
time and peak RSS are its own) and on the same threads:
- vlm (F16 and Q8_0 files) on ggml's ops and on each form of its own kernels the CPU runs (bf16 with
  AVX512_BF16, i16 with AVX512_VNNI or AVX2; the first of them vlm's default), by VLM_CLIP_KERNELS;
- transformers' CLIPModel (PyTorch CPU, torch.set_num_threads) on the checkpoint the GGUFs came from;
- open_clip's ViT-B-32-quickgelu (where open_clip installs: --open-clip-python), the same architecture
  with open_clip's own random initialisation (it reads only its own weight format), texts at the 77
  positions its tokenizer always pads to;
images/s at batch 1 and 32, texts/s at batch 32 (32 prompts, padded to the longest as a processor
with padding=True does). Every variant runs once per round and the rounds are interleaved, so a
neighbour's load hits them alike; the figures are medians over rounds. Each variant's embeddings are
compared with transformers' (cosine; F32 weights there) as a quality check.

PyTorch and transformers are benchmark-only (the `bench` extra, or a separate venv via --torch-python);
without them the transformers rows are left out.

    python benchmarks/bench_clip.py                                   # 3 rounds, all cores
    python benchmarks/bench_clip.py --rounds 5 --threads 2 --keep /tmp/clip-bench \\
        --torch-python /tmp/torchenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIG = ROOT / "tests" / "data" / "configs" / "clip-vit-base-patch32-openai.config.json"
OUT = ROOT / "benchmarks" / "out"
BATCH = 32


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_models(work: Path) -> tuple[Path, dict[str, Path]]:
    """The real-size checkpoint (built once into work/) and its F16 and Q8_0 conversions."""
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
    return ckpt, out


def write_inputs(path: Path) -> None:
    """The same pixels and token ids for every worker (the torch venv need not have vlmcli)."""
    from labels import LABELS

    from vlmcli.engines.clip_tokenizer import default_tokenizer

    pixels = np.random.default_rng(0).standard_normal((BATCH, 3, 224, 224)).astype(np.float32)
    tokens, _ = default_tokenizer().tokenize([f"a photo of a {label}." for label in LABELS])
    n_ctx = int(tokens.argmax(1).max()) + 1  # padded to the longest prompt, as padding=True does
    np.savez(path, pixels=pixels, tokens=tokens[:, :n_ctx].astype(np.int64))


def timed(fn, runs: int) -> float:
    """Median seconds of fn() over runs, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --isa avx2: PyTorch's kernels held to AVX2 (ATen's vectorised ops, MKL's sgemm, oneDNN), vlm to its AVX2
# kernels (i16-avx2; no BF16 or VNNI rows). ggml's other ops (norms, adds: a few % of a batch) keep the build's ISA.
# A proxy for an AVX2-only CPU, not one: clock, caches and the execution ports stay this CPU's.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def worker(kind: str, model: Path, inputs: Path, runs: int, threads: int, embeddings: Path) -> dict:
    """Runs in its own process (kind: vlm, torch or open_clip); prints one JSON object."""
    data = np.load(inputs)
    pixels, tokens = data["pixels"], data["tokens"]
    extra = {}
    t0 = time.perf_counter()
    if kind == "torch":
        import torch
        from transformers import CLIPModel

        torch.set_num_threads(threads)
        hf = CLIPModel.from_pretrained(model).eval()
        px, ids = torch.from_numpy(pixels), torch.from_numpy(tokens)

        def images(n: int) -> np.ndarray:
            with torch.inference_mode():
                out = hf.get_image_features(pixel_values=px[:n])
                return getattr(out, "pooler_output", out).numpy()

        def texts() -> np.ndarray:
            with torch.inference_mode():
                out = hf.get_text_features(input_ids=ids)
                return getattr(out, "pooler_output", out).numpy()

        extra = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    elif kind == "open_clip":
        import open_clip
        import torch

        torch.set_num_threads(threads)
        # open_clip loads open_clip-format weights only, so the same architecture (OpenAI's ViT-B/32,
        # quick_gelu) with its own random initialisation: the same cost per image, other embeddings.
        oc = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
        px = torch.from_numpy(pixels)
        ids = torch.zeros((len(tokens), 77), dtype=torch.long)  # its tokenizer pads every text to 77
        ids[:, : tokens.shape[1]] = torch.from_numpy(tokens)

        def images(n: int) -> np.ndarray:
            with torch.inference_mode():
                return oc.encode_image(px[:n]).numpy()

        def texts() -> np.ndarray:
            with torch.inference_mode():
                return oc.encode_text(ids).numpy()

        extra = {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "torch_threads": torch.get_num_threads(),
        }
    else:
        from vlmcli.engines.clip import ClipModel

        m = ClipModel.load(model, n_threads=threads)  # on what VLM_CLIP_KERNELS says

        def images(n: int) -> np.ndarray:
            return m.encode_images(pixels[:n])

        def texts() -> np.ndarray:
            return m.encode_texts(tokens.astype(np.int32))

        extra = {"kernels": m.kernels.describe(), "weights_mb": m.weights_bytes / 2**20}
    load_s = time.perf_counter() - t0
    one = timed(lambda: images(1), runs)
    batch = timed(lambda: images(BATCH), runs)
    text = timed(texts, runs)
    np.savez(embeddings, images=images(BATCH), texts=texts())
    return {
        "kind": kind,
        "model": str(model),
        "load_s": load_s,
        "images_per_s_batch1": 1 / one,
        "images_per_s_batch32": BATCH / batch,
        "texts_per_s_batch32": len(tokens) / text,
        "text_positions": int(tokens.shape[1]),
        "peak_rss_mb": peak_rss_mb(),
        "threads": threads,
        **extra,
    }


def python_with(modules: str, explicit: str | None) -> str | None:
    """An interpreter that imports modules ("torch, transformers"): the explicit one, else this one."""
    python = explicit or sys.executable
    probe = subprocess.run([python, "-c", f"import {modules}"], capture_output=True)
    if probe.returncode == 0:
        return python
    print(f"no {modules} in {python}: {probe.stderr.decode().strip().splitlines()[-1:]}", file=sys.stderr)
    return None


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (figures are medians over them)")
    ap.add_argument("--runs", type=int, default=3, help="timed calls per round, after one warm-up")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep", type=Path, default=None, help="build/reuse the models in this folder")
    ap.add_argument("--torch-python", default=None, help="a Python with torch + transformers (default: this one)")
    ap.add_argument(
        "--extra",
        type=Path,
        action="append",
        default=[],
        help="another CLIP GGUF of the same checkpoint to measure too (e.g. a BF16 conversion)",
    )
    ap.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: an AVX2-only CPU's choices on an AVX-512 one (a proxy, see AVX2_ONLY)",
    )
    ap.add_argument(
        "--only", default=None, help='comma-separated parts of variant labels to run, e.g. "kernels,Q8_0 on ggml"'
    )
    ap.add_argument("--open-clip-python", default=None, help="a Python with torch + open_clip (default: this one)")
    ap.add_argument("--worker", choices=["vlm", "torch", "open_clip"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--embeddings", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.inputs, args.runs, args.threads, args.embeddings)))
        return 0

    from machine import cpu_description
    from report import print_table

    from vlmcli.engines import clip_kernels
    from vlmcli.engines.clip_path import KERNELS_ENV, PACKED_FROM, choose_path

    forms = [f for f in clip_kernels.FORMS if clip_kernels.available(f) and (f == "i16-avx2" or args.isa == "native")]
    if args.isa == "avx2" and forms:  # the header names what an AVX2-only CPU runs by default
        os.environ[KERNELS_ENV] = "i16-avx2"
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-clip-"))
    try:
        ckpt, models = build_models(work)
        inputs = work / "inputs.npz"
        write_inputs(inputs)
        # (label, kind, model, environment changes): None removes the variable for that worker
        variants = []
        for extra in args.extra:
            models[extra.stem.rsplit("-", 1)[-1]] = extra
        for q in models:
            variants.append((f"vlm {q} on ggml", "vlm", models[q], {KERNELS_ENV: "ggml"}))
            for form in forms if q in PACKED_FROM else []:  # vlm's own kernels (the default: the first)
                variants.append((f"vlm {q} on vlm's {form} kernels", "vlm", models[q], {KERNELS_ENV: form}))
        pythons = {
            "torch": python_with("torch, transformers", args.torch_python),
            "open_clip": python_with("torch, open_clip", args.open_clip_python),
        }
        torch_env = AVX2_ONLY if args.isa == "avx2" else {}
        if pythons["torch"]:
            variants.append(("transformers CLIPModel F32", "torch", ckpt, torch_env))
        if pythons["open_clip"]:
            variants.append(("open_clip F32 (own random weights)", "open_clip", ckpt, {}))
        if args.only:  # transformers stays: every ratio is against it
            variants = [v for v in variants if v[1] == "torch" or any(o in v[0] for o in args.only.split(","))]
        runs: dict[str, list[dict]] = {v[0]: [] for v in variants}
        for r in range(args.rounds):
            for label, kind, model, env_change in variants:
                print(f"round {r + 1}/{args.rounds}: {label} ...", file=sys.stderr)
                env = dict(os.environ)
                for key, value in env_change.items():
                    env.pop(key, None) if value is None else env.__setitem__(key, value)
                emb = work / f"emb-{label.replace(' ', '_').replace('(', '').replace(')', '')}.npz"
                python = pythons.get(kind) or sys.executable
                cmd = [
                    python,
                    __file__,
                    "--worker",
                    kind,
                    "--model",
                    str(model),
                    "--inputs",
                    str(inputs),
                    "--runs",
                    str(args.runs),
                    "--threads",
                    str(args.threads),
                    "--embeddings",
                    str(emb),
                ]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["embeddings"] = str(emb)
                runs[label].append(row)
        rows = []
        keys = ("load_s", "images_per_s_batch1", "images_per_s_batch32", "texts_per_s_batch32", "peak_rss_mb")
        for label, rs in runs.items():
            row = {**rs[0], "name": label, "rounds": len(rs)}
            for key in keys:
                row[key] = statistics.median(x[key] for x in rs)
                row[f"{key}_all"] = [x[key] for x in rs]
            rows.append(row)
        base = next((r for r in rows if r["kind"] == "torch"), None)
        if base is not None:
            ref = np.load(base["embeddings"])
            for r in rows:
                if r["kind"] != "open_clip":  # its weights are its own
                    got = np.load(r["embeddings"])
                    r["cosine_images_min"] = float(cosine(got["images"], ref["images"]).min())
                    r["cosine_texts_min"] = float(cosine(got["texts"], ref["texts"]).min())
                for key in ("images_per_s_batch1", "images_per_s_batch32", "texts_per_s_batch32"):
                    r[f"{key}_vs_transformers"] = r[key] / base[key]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    def rate(r: dict, key: str) -> str:
        return f"{r[key]:.1f}" + (f" ({r[key + '_vs_transformers']:.2f}x)" if base is not None else "")

    def lowest_cosine(r: dict) -> str:
        return f"{min(r['cosine_images_min'], r['cosine_texts_min']):.5f}" if "cosine_images_min" in r else "-"

    load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    proxy = " ".join(f"{k}={v}" for k, v in AVX2_ONLY.items())
    print_table(
        "CLIP ViT-B/32 against transformers" + (", AVX2 proxy" if args.isa == "avx2" else ""),
        [
            f"CLIP ViT-B/32, {args.threads} threads",
            "img/s, batch 32",
            "img/s, batch 1",
            "texts/s, batch 32",
            "cosine to F32",
            "load",
            "peak RSS",
        ],
        [
            [
                r["name"],
                rate(r, "images_per_s_batch32"),
                rate(r, "images_per_s_batch1"),
                rate(r, "texts_per_s_batch32"),
                lowest_cosine(r),
                f"{r['load_s']:.1f} s",
                f"{r['peak_rss_mb']:,.0f} MB",
            ]
            for r in rows
        ],
        note=(f"held to AVX2 (vlm's i16-avx2 kernels; PyTorch with {proxy}); " if args.isa == "avx2" else "")
        + f"vlm's default for an F16 file here: {choose_path(on_cpu=True).describe()}; real-size random weights, "
        f"each variant in a fresh process, medians of {args.rounds} interleaved rounds of {args.runs} timed calls",
        footer=f"(Nx: against transformers; cosine: the lowest over images and texts, to transformers' "
        f"embeddings; texts: 32 prompts 'a photo of a <label>.', {rows[0]['text_positions']} positions; "
        f"load average before {load_before}, after {load_after})",
    )
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"bench_clip-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "model": "clip-vit-base-patch32 (random weights)",
                "cpu": cpu_description(),
                "threads": args.threads,
                "rounds": args.rounds,
                "isa": args.isa,
                "load_average_before": load_before,
                "load_average_after": load_after,
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
