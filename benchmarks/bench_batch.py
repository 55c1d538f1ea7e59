"""Batch mode speed: images/s through vlmcli.tasks.runner.run_batch, and its overhead against a plain loop.

A generated folder of real-looking JPEGs of mixed sizes (smooth noise + gradients + shapes, not flat
colours) goes through:
- caption on the tiny SmolVLM2 fixture and on a real-size random-weight 256M (Q8_0, --detail low,
  a short --max-tokens): the cost per image is the real model's, the words are noise;
- embed and classify (32 labels) on a real-size random-weight CLIP ViT-B/32 (F16).
For each, the same loaded model runs the same images twice: a plain loop (decode, preprocess, model,
one after another) and run_batch (decode threads ahead of the model, JSONL records written, resume
index, summary). ratio = batch images/s / plain images/s (> 1: the prefetch hides decoding).

It also measures whether llama.cpp multi-sequence decoding would raise caption throughput on CPU:
generated tokens/s of the real-size 256M text model with 1 sequence vs N sequences decoded in one
batch (same prompt length), together with how a caption's time splits into image encoding,
prefill and decode.

And against what a user would script instead (issue 14): `vlm caption FOLDER --out x.jsonl` (one
process, batch mode) against a loop of llama.cpp's `llama-mtmd-cli` (one process per image, built by
llama_tools.py from the pinned llama-cpp-python) on the real-size 256M, the sample photos of
vlmcli/data/sample, the same prompt, -n, threads, full tiling (vlm --detail high; mtmd-cli always
tiles) and no encoding cache (VLM_CACHE_SIZE=0). vlm caption has no --ignore-eos, so neither side
ignores EOS; the generated tokens of both are reported.

    python benchmarks/bench_batch.py                       # 200 images; 20 for the real-size caption
    python benchmarks/bench_batch.py --images 50 --skip-real
    python benchmarks/bench_batch.py --only mtmd-loop --loop-images 6 --loop-tokens 32 --threads 2
Writes benchmarks/out/bench_batch.json.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIGS = ROOT / "tests" / "data" / "configs"
OUT = ROOT / "benchmarks" / "out"
SIZES = [(640, 480), (1024, 768), (1600, 1200), (480, 640), (800, 800), (2048, 1365), (320, 240), (1280, 720)]


# ----------------------------------------------------------------------------- inputs


def make_photo(path: Path, size: tuple[int, int], seed: int) -> None:
    """Smooth multi-scale noise + a gradient + a few soft shapes, saved as a q90 JPEG."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    img = np.zeros((h, w, 3), np.float32)
    for scale, amp in ((8, 0.5), (32, 0.3), (128, 0.2)):
        small = rng.random((scale * h // max(w, h) + 2, scale * w // max(w, h) + 2, 3)).astype(np.float32)
        up = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32) / 255
        img += amp * up
    gx = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    gy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = 0.6 * img + 0.4 * (gx * rng.random(3) + gy * rng.random(3)) / 2
    im = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(radius=1.2))
    noise = rng.normal(0, 4, (h, w, 3))
    arr = np.clip(np.asarray(im, np.float32) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def make_folder(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = folder / f"photo_{i:04d}.jpg"
        if not p.exists():
            make_photo(p, SIZES[i % len(SIZES)], i)
    from vlmcli.tasks.inputs import InputSpec, expand_inputs

    return expand_inputs(InputSpec([str(folder)])).paths[:n]


# ----------------------------------------------------------------------------- models


def tiny_vlm(cache: Path) -> tuple[Path, Path]:
    from fixtures.smolvlm2 import build_smolvlm2_checkpoint

    from vlmcli.convert.smolvlm2 import convert_smolvlm2

    out = cache / "tiny-vlm"
    done = out / "done.json"
    if not done.exists():
        ckpt = build_smolvlm2_checkpoint(cache / "tiny-hf" / "SmolVLM2-256M-Video-Instruct", seed=0)
        r = convert_smolvlm2(ckpt, out, quant="Q8_0", mmproj_quant="F16")
        done.write_text(json.dumps({"model": str(r.model), "mmproj": str(r.mmproj)}))
    files = json.loads(done.read_text())
    return Path(files["model"]), Path(files["mmproj"])


def real_vlm(cache: Path) -> tuple[Path, Path]:
    """Real-size random-weight 256M, Q8_0 (the same cache layout as bench_vlm.py, so it is built once)."""
    from fixtures.smolvlm2 import build_smolvlm2_checkpoint

    from vlmcli.convert import convert_checkpoint

    name = "SmolVLM2-256M-Video-Instruct"
    out = cache / f"{name}-Q8_0"
    done = out / "done.json"
    if not done.exists():
        ckpt = cache / name
        if not (ckpt / "config.json").exists():
            print("building real-size random-weight 256M ...", file=sys.stderr)
            build_smolvlm2_checkpoint(ckpt, CONFIGS / "smolvlm2-256m.config.json", size="real")
        print("converting to GGUF Q8_0 ...", file=sys.stderr)
        paths = convert_checkpoint(ckpt, out, quant="Q8_0")
        done.write_text(
            json.dumps(
                {
                    "model": str(next(p for p in paths if not p.name.startswith("mmproj"))),
                    "mmproj": str(next(p for p in paths if p.name.startswith("mmproj"))),
                }
            )
        )
    files = json.loads(done.read_text())
    return Path(files["model"]), Path(files["mmproj"])


def real_clip(cache: Path) -> Path:
    from fixtures.clip import build_clip_checkpoint

    from vlmcli.convert.clip import convert_clip

    out = cache / "clip-b32-F16"
    done = out / "done.json"
    if not done.exists():
        ckpt = cache / "clip-vit-base-patch32"
        if not (ckpt / "config.json").exists():
            print("building real-size random-weight CLIP ViT-B/32 ...", file=sys.stderr)
            build_clip_checkpoint(ckpt, size="real", config=CONFIGS / "clip-vit-base-patch32-openai.config.json")
        path = convert_clip(ckpt, out, "F16")
        done.write_text(json.dumps({"model": str(path)}))
    return Path(json.loads(done.read_text())["model"])


# ----------------------------------------------------------------------------- measurements


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def batch_run(task: Any, paths: list[str], work: Path) -> tuple[float, Any]:
    from vlmcli.tasks.runner import BatchOptions, run_batch
    from vlmcli.tasks.sinks import JsonlSink

    out = work / f"{task.name}-{time.monotonic_ns()}.jsonl"
    summary = None

    def go() -> None:
        nonlocal summary
        summary = run_batch(task, paths, JsonlSink(out), BatchOptions(handle_sigint=False))

    s = timed(go)
    assert summary is not None and summary.failed == 0, summary
    return s, summary


def alternate(plain: Callable[[], Any], batch: Callable[[], Any], rounds: int) -> tuple[float, float]:
    """Best time of each, measured in turns (plain, batch, plain, ...) so that other load on the
    machine falls on both alike."""
    plain_t, batch_t = [], []
    for _ in range(rounds):
        plain_t.append(timed(plain))
        batch_t.append(timed(batch))
    return min(plain_t), min(batch_t)


def vlm_case(
    label: str, model: Path, mmproj: Path, paths: list[str], threads: int, max_tokens: int, work: Path, rounds: int
) -> dict[str, Any]:
    from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
    from vlmcli.images import load_image
    from vlmcli.tasks.caption import CaptionTask

    engine = VlmEngine(model, mmproj, EngineOptions(n_threads=threads, detail="low"))
    gen = GenerationOptions(max_tokens=max_tokens, ignore_eos=True)
    prompt = "Describe this image in one sentence."
    list(engine.ask(load_image(paths[0]), [prompt], gen))  # warm-up
    phases: dict[str, list[float]] = {"image_encode_ms": [], "prefill_ms": [], "decode_ms": [], "load_image_ms": []}

    def plain() -> None:
        for p in paths:
            t0 = time.perf_counter()
            image = load_image(p)
            phases["load_image_ms"].append((time.perf_counter() - t0) * 1000)
            (g,) = list(engine.ask(image, [prompt], gen))
            for k in ("image_encode_ms", "prefill_ms", "decode_ms"):
                phases[k].append(getattr(g.timings, k))

    plain_s, batch_s = alternate(plain, lambda: batch_run(CaptionTask(engine, gen, prompt, None), paths, work), rounds)
    engine.close()
    n = len(paths)
    return {
        "case": label,
        "images": n,
        "threads": threads,
        "max_tokens": max_tokens,
        "detail": "low",
        "plain_images_per_s": n / plain_s,
        "batch_images_per_s": n / batch_s,
        "ratio": plain_s / batch_s,
        "per_image_ms": {k: statistics.mean(v) for k, v in phases.items()},
    }


def clip_case(
    kind: str, model_path: Path, paths: list[str], threads: int, batch_size: int, work: Path, rounds: int
) -> dict[str, Any]:
    from vlmcli.engines.clip import ClipModel
    from vlmcli.tasks.classify import ClassifyTask, encode_labels, label_probabilities, top_k
    from vlmcli.tasks.embed import EmbedImagesTask, embed_pixels, prepare_image

    model = ClipModel.load(model_path, n_threads=threads)
    labels = None
    if kind == "classify":
        from labels import LABELS

        labels = encode_labels(model, LABELS)
    embed_pixels(model, np.stack([prepare_image(paths[0], model.config)]))  # warm-up

    def plain() -> None:
        for i in range(0, len(paths), batch_size):
            pixels = np.stack([prepare_image(p, model.config) for p in paths[i : i + batch_size]])
            if labels is not None:
                top_k(label_probabilities(embed_pixels(model, pixels), labels), labels.labels, 5)
            else:
                embed_pixels(model, pixels)

    task = (
        ClassifyTask(model, labels, batch_size=batch_size) if labels is not None else EmbedImagesTask(model, batch_size)
    )
    plain_s, batch_s = alternate(plain, lambda: batch_run(task, paths, work), rounds)
    # The parts of the plain loop, for the report: decoding + preprocessing alone, the model alone.
    prep_s = timed(lambda: [prepare_image(p, model.config) for p in paths[: min(len(paths), 64)]]) / min(len(paths), 64)
    pixels = np.stack([prepare_image(p, model.config) for p in paths[:batch_size]])
    model_s = timed(lambda: embed_pixels(model, pixels)) / len(pixels)
    model.close()
    n = len(paths)
    return {
        "case": f"{kind} ViT-B/32 F16",
        "images": n,
        "threads": threads,
        "batch_size": batch_size,
        "plain_images_per_s": n / plain_s,
        "batch_images_per_s": n / batch_s,
        "ratio": plain_s / batch_s,
        "per_image_ms": {"decode_preprocess_ms": prep_s * 1000, "model_ms": model_s * 1000},
    }


def multi_sequence(
    model: Path, threads: int, n_seqs: list[int], steps: int = 32, prompt_tokens: int = 120
) -> dict[str, Any]:
    """Generated tokens/s of the text model with 1..N sequences decoded together (llama.cpp batches)."""
    from vlmcli.engines.llama_native import llama, quiet_native_logs

    quiet_native_logs()
    mparams = llama.llama_model_default_params()
    m = llama.llama_model_load_from_file(str(model).encode(), mparams)
    vocab = llama.llama_model_get_vocab(m)
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    top = max(n_seqs)
    cp = llama.llama_context_default_params()
    cp.n_ctx = (prompt_tokens + steps + 8) * top
    cp.n_batch = cp.n_ubatch = 512
    cp.n_seq_max = top
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = True
    ctx = llama.llama_init_from_model(m, cp)
    batch = llama.llama_batch_init(512, 0, top)
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {}

    def submit(tokens: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(tokens)
        for i, (tok, pos, seq, logits) in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        rc = llama.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    for n in n_seqs:
        llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
        prompt = [int(t) for t in rng.integers(100, n_vocab - 300, prompt_tokens)]
        for s in range(n):  # each sequence its own prompt, as each image would be
            for start in range(0, prompt_tokens, 256):
                part = prompt[start : start + 256]
                submit([(t, start + i, s, False) for i, t in enumerate(part)])
        t0 = time.perf_counter()
        for step in range(steps):
            submit([(int(rng.integers(100, n_vocab - 300)), prompt_tokens + step, s, True) for s in range(n)])
            llama.llama_synchronize(ctx)
        dt = time.perf_counter() - t0
        result[str(n)] = {"tokens_per_s": n * steps / dt, "step_ms": dt / steps * 1000}
    llama.llama_batch_free(batch)
    llama.llama_free(ctx)
    llama.llama_model_free(m)
    base = result[str(min(n_seqs))]["tokens_per_s"]
    for v in result.values():
        v["speedup"] = v["tokens_per_s"] / base
    return result


def sample_folder(folder: Path, n: int) -> list[Path]:
    """n photos from vlmcli/data/sample (copies, cycled, when n exceeds them), flat in folder."""
    photos = sorted((ROOT / "vlmcli" / "data" / "sample").glob("*/*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        dest = folder / f"{i:03d}-{photos[i % len(photos)].name}"
        if not dest.exists():
            shutil.copyfile(photos[i % len(photos)], dest)
        out.append(dest)
    return out


def mtmd_loop_case(
    model: Path,
    mmproj: Path,
    paths: list[Path],
    threads: int,
    max_tokens: int,
    work: Path,
    rounds: int,
    llama_build: tuple[str, ...] = (),
) -> dict[str, Any]:
    """`vlm caption FOLDER --out` against a loop of llama-mtmd-cli processes over the same photos (--perf -lv 4
    only make it print the timings read here for its token counts)."""
    from bench_vlm import mtmd_timings
    from llama_tools import tool

    mtmd = str(tool("llama-mtmd-cli", llama_build))
    prompt, n, t = "Describe this image in one sentence.", str(max_tokens), str(threads)
    env = {**os.environ, "VLM_CACHE_SIZE": "0"}
    loop_runs: list[dict] = []
    vlm_records: list[dict] = []

    def loop() -> None:
        loop_runs.clear()
        for p in paths:
            done = subprocess.run(
                [
                    mtmd,
                    "-m",
                    str(model),
                    "--mmproj",
                    str(mmproj),
                    "--image",
                    str(p),
                    "-p",
                    f"<__media__>{prompt}",
                    "-n",
                    n,
                    "-t",
                    t,
                    "--temp",
                    "0",
                    "-c",
                    "4096",
                    "--perf",
                    "-lv",
                    "4",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            loop_runs.append(mtmd_timings(done.stdout + done.stderr))

    def batch() -> None:
        out = work / f"captions-{time.monotonic_ns()}.jsonl"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "vlmcli",
                "caption",
                str(paths[0].parent),
                "--out",
                str(out),
                "-m",
                str(model),
                "--mmproj",
                str(mmproj),
                "-p",
                prompt,
                "-n",
                n,
                "-t",
                t,
                "--detail",
                "high",
                "-q",
            ],
            check=True,
            env=env,
        )
        vlm_records[:] = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(vlm_records) == len(paths), vlm_records

    loop_s, batch_s = alternate(loop, batch, rounds)
    k = len(paths)
    return {
        "case": "caption 256M: vlm caption vs mtmd-cli loop",
        "images": k,
        "threads": threads,
        "max_tokens": max_tokens,
        "detail": "high",
        "plain_images_per_s": k / loop_s,
        "batch_images_per_s": k / batch_s,
        "ratio": loop_s / batch_s,
        "per_image_ms": {"mtmd_loop_ms": loop_s / k * 1000, "vlm_caption_ms": batch_s / k * 1000},
        # mtmd-cli's perf line leaves out the last decode: runs + 1 tokens (one too many where EOS ended one)
        "generated_tokens": {
            "mtmd_loop": sum(min(r["eval_runs"] + 1, max_tokens) for r in loop_runs),
            "vlm_caption": sum(r["tokens"]["generated"] for r in vlm_records),
        },
        "image_tokens": {
            "mtmd_loop": sum(r["image_tokens"] for r in loop_runs),
            "vlm_caption": sum(r["tokens"]["image"] for r in vlm_records),
        },
    }


def main() -> None:
    from llama_tools import add_build_option

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument(
        "--real-vlm-images", type=int, default=20, help="images for the real-size caption (about 1-3 s each on 2 cores)"
    )
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="plain / batch turns per case (the best of each is kept)")
    ap.add_argument("--skip-real", action="store_true", help="only the tiny VLM (no real-size models)")
    ap.add_argument("--loop-images", type=int, default=6, help="photos for vlm caption vs the llama-mtmd-cli loop")
    ap.add_argument("--loop-tokens", type=int, default=32, help="-n of both in that comparison")
    add_build_option(ap)  # the llama-mtmd-cli loop's build
    ap.add_argument("--only", default="caption-tiny,caption-real,embed,classify,multiseq,mtmd-loop")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    args = ap.parse_args()
    from report import print_table

    only = set(args.only.split(","))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    paths = make_folder(cache / f"photos-{args.images}", args.images) if only - {"mtmd-loop"} else []
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    results: list[dict[str, Any]] = []

    loop_rows: list[dict[str, Any]] = []

    def show(r: dict[str, Any]) -> None:
        print(f"{r['case']}: done", file=sys.stderr, flush=True)
        loop_rows.append(r)
        results.append(r)

    if "caption-tiny" in only:
        model, mmproj = tiny_vlm(cache)
        show(vlm_case("caption tiny fixture", model, mmproj, paths, args.threads, args.max_tokens, work, args.rounds))
    if not args.skip_real:
        if "embed" in only or "classify" in only:
            clip = real_clip(cache)
            for kind in ("embed", "classify"):
                if kind in only:
                    show(clip_case(kind, clip, paths, args.threads, args.batch_size, work, args.rounds))
        if "caption-real" in only or "multiseq" in only:
            model, mmproj = real_vlm(cache)
            if "caption-real" in only:
                show(
                    vlm_case(
                        "caption 256M Q8_0",
                        model,
                        mmproj,
                        paths[: args.real_vlm_images],
                        args.threads,
                        args.max_tokens,
                        work,
                        args.rounds,
                    )
                )
            if "multiseq" in only:
                ms = multi_sequence(model, args.threads, [1, 2, 4, 8])
                print_table(
                    "Multi-sequence decoding",
                    ["sequences", "decode tokens/s", "vs one sequence"],
                    [[n, f"{v['tokens_per_s']:.1f}", f"{v['speedup']:.2f}x"] for n, v in ms.items()],
                    note=f"256M Q8_0 text model, {args.threads} threads",
                )
                results.append({"case": "multi-sequence decode 256M Q8_0", "threads": args.threads, "by_sequences": ms})
        if "mtmd-loop" in only:
            model, mmproj = real_vlm(cache)
            loop_paths = sample_folder(cache / f"sample-photos-{args.loop_images}", args.loop_images)
            build = tuple(args.llama_cmake_arg)
            r = mtmd_loop_case(model, mmproj, loop_paths, args.threads, args.loop_tokens, work, args.rounds, build)
            print_table(
                "`vlm caption FOLDER` against a loop of llama-mtmd-cli",
                ["how", "images/s"],
                [
                    [
                        "`vlm caption FOLDER` (one process, one model load)",
                        f"{r['batch_images_per_s']:.3f} ({r['ratio']:.2f}x)",
                    ],
                    ["llama-mtmd-cli, one call per image", f"{r['plain_images_per_s']:.3f}"],
                ],
                note=f"{r['images']} photos at full tiling, {r['max_tokens']} tokens each, {args.threads} threads; "
                f"generated tokens {r['generated_tokens']}, image tokens {r['image_tokens']}",
            )
            results.append(r)
    if loop_rows:
        print_table(
            "Batch mode against a plain loop",
            ["case", "images", "batch mode", "plain loop over the engine", "batch / plain", "per image, ms"],
            [
                [
                    r["case"],
                    r["images"],
                    f"{r['batch_images_per_s']:.2f} img/s",
                    f"{r['plain_images_per_s']:.2f} img/s",
                    f"{r['ratio']:.2f}x",
                    ", ".join(f"{k} {v:.1f}" for k, v in r["per_image_ms"].items()),
                ]
                for r in loop_rows
            ],
            note=f"{args.threads} threads, the best of {args.rounds} rounds",
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_batch.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {OUT / 'bench_batch.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
