"""Batch mode on Ray (`--ray`) against the local batch mode, on this machine's local Ray cluster.

The same images and the same task (built by the CLI's own builders) run five ways:
- local: run_batch in this process, the model with all cores (the default), and with 1 thread;
- ray x1: one Ray actor holding all the CPUs (the model has the threads it has locally), and 1 CPU;
- ray x2: two actors, the CPUs split between them (one model each).
images/s counts from the first record's dispatch to the last write (BatchSession's clock, as the
summary line does): the actors' start and model load are reported apart (`start_s`). The overhead
per item is (1 / ray x1 rate - 1 / local rate) at the same thread count: same CPUs, same model,
so the difference is Ray's (dispatch, serialisation, the driver's writes). Rounds alternate local,
x1, x2 so other load on the machine falls on all alike; medians are reported.

Cases: caption on a real-size random-weight SmolVLM2-256M (Q8_0, --detail low, a few tokens: a
real model's cost per image), and caption + embed on the tiny test fixtures (cheap items, where the
overhead shows).

    python benchmarks/bench_ray.py                     # 3 rounds
    python benchmarks/bench_ray.py --skip-real --rounds 5
Writes benchmarks/out/bench_ray.json.

On a real cluster the same comparison is the CLI's: `ray start --head` on one machine, `ray start
--address HEAD:6379` on the others, then `vlm caption photos/ --out c.jsonl --ray auto` (see README).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

OUT = ROOT / "benchmarks" / "out"


def tiny_clip(cache: Path) -> Path:
    from fixtures.clip import build_clip_checkpoint

    from vlmcli.convert.clip import convert_clip

    out = cache / "tiny-clip"
    done = out / "done.json"
    if not done.exists():
        ckpt = build_clip_checkpoint(cache / "tiny-clip-hf")
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"model": str(convert_clip(ckpt, out, "F16"))}))
    return Path(json.loads(done.read_text())["model"])


def run_local(
    build: Callable[..., Any], spec: Any, args: tuple[Any, ...], paths: list[str], work: Path
) -> dict[str, float]:
    from vlmcli.tasks.runner import BatchOptions, run_batch
    from vlmcli.tasks.sinks import JsonlSink

    t0 = time.perf_counter()
    task = build(spec, *args)
    start = time.perf_counter() - t0
    try:
        s = run_batch(
            task, paths, JsonlSink(work / f"local-{time.monotonic_ns()}.jsonl"), BatchOptions(handle_sigint=False)
        )
    finally:
        task.close()
    assert s.failed == 0 and s.done == len(paths), s
    return {"start_s": start, "images_per_s": s.images_per_s}


def run_ray(
    name: str,
    build: Callable[..., Any],
    spec: Any,
    args: tuple[Any, ...],
    paths: list[str],
    work: Path,
    workers: int,
    cpus: float,
) -> dict[str, float]:
    from vlmcli.tasks.ray_batch import RayOptions, RayPool, TaskRecipe
    from vlmcli.tasks.runner import BatchOptions
    from vlmcli.tasks.sinks import JsonlSink

    t0 = time.perf_counter()
    with RayPool(TaskRecipe(name, build, spec, args), RayOptions(workers=workers, cpus=cpus)) as pool:
        pool._wait_ready(workers)  # every actor up before the clock starts
        start = time.perf_counter() - t0
        s = pool.task().run(
            paths, JsonlSink(work / f"ray-{time.monotonic_ns()}.jsonl"), BatchOptions(handle_sigint=False)
        )
    assert s.failed == 0 and s.done == len(paths), s
    return {"start_s": start, "images_per_s": s.images_per_s}


def case(
    label: str,
    name: str,
    build: Callable[..., Any],
    spec: Any,
    args: tuple[Any, ...],
    paths: list[str],
    work: Path,
    cpus: int,
    rounds: int,
) -> dict[str, Any]:
    from dataclasses import replace

    one_thread = replace(spec, n_threads=1)
    modes: dict[str, Callable[[], dict[str, float]]] = {
        f"local ({cpus} threads)": lambda: run_local(build, replace(spec, n_threads=cpus), args, paths, work),
        "local (1 thread)": lambda: run_local(build, one_thread, args, paths, work),
        f"ray x1 ({cpus} CPUs)": lambda: run_ray(name, build, spec, args, paths, work, 1, cpus),
        "ray x1 (1 CPU)": lambda: run_ray(name, build, spec, args, paths, work, 1, 1),
        "ray x2 (1 CPU each)": lambda: run_ray(name, build, spec, args, paths, work, 2, max(1, cpus // 2)),
    }
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for _ in range(rounds):
        for m, fn in modes.items():
            runs[m].append(fn())
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("images_per_s", "start_s")} for m, rs in runs.items()}

    def overhead(ray_mode: str, local_mode: str) -> float:  # ms per item, same threads
        return (1 / med[ray_mode]["images_per_s"] - 1 / med[local_mode]["images_per_s"]) * 1000

    result = {
        "case": label,
        "images": len(paths),
        "rounds": rounds,
        "cpus": cpus,
        "median": med,
        "all_images_per_s": {m: [round(r["images_per_s"], 3) for r in rs] for m, rs in runs.items()},
        "overhead_ms_per_item": {
            "1 thread": overhead("ray x1 (1 CPU)", "local (1 thread)"),
            f"{cpus} threads": overhead(f"ray x1 ({cpus} CPUs)", f"local ({cpus} threads)"),
        },
    }
    print(f"{label}: done ({len(paths)} images, {rounds} rounds)", file=sys.stderr, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100, help="images for the tiny-model cases")
    ap.add_argument(
        "--real-vlm-images", type=int, default=20, help="images for the real-size caption (1-3 s each on 2 cores)"
    )
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    args = ap.parse_args()

    import ray
    from bench_batch import make_folder, real_vlm, tiny_vlm
    from machine import cpu_description
    from report import print_table

    from vlmcli.cli.clip import _embed_task
    from vlmcli.cli.vlm import _caption_task
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.tasks.models import ModelSpec

    # The model's cost on every run, not the store's image-encoding cache (the actors inherit this).
    os.environ["VLM_CACHE_SIZE"] = "0"
    cpus = os.cpu_count() or 1
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    paths = make_folder(cache / f"photos-{args.images}", args.images)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    machine = cpu_description()
    gen = GenerationOptions(max_tokens=args.max_tokens, ignore_eos=True)
    caption_args = (gen, "Describe this image in one sentence.", 100_000_000, 1, "logprob")
    results = []
    try:
        if not args.skip_real:
            model, mmproj = real_vlm(cache)
            spec = ModelSpec(str(model), str(mmproj), n_threads=None, detail="low")
            results.append(
                case(
                    "caption 256M Q8_0 (low)",
                    "caption",
                    _caption_task,
                    spec,
                    caption_args,
                    paths[: args.real_vlm_images],
                    work,
                    cpus,
                    args.rounds,
                )
            )
        model, mmproj = tiny_vlm(cache)
        spec = ModelSpec(str(model), str(mmproj), detail="low")
        results.append(
            case("caption tiny fixture", "caption", _caption_task, spec, caption_args, paths, work, cpus, args.rounds)
        )
        clip = tiny_clip(cache)
        results.append(
            case(
                "embed tiny CLIP (batch 16)",
                "embed",
                _embed_task,
                ModelSpec(str(clip)),
                (16, 100_000_000, False),
                paths,
                work,
                cpus,
                args.rounds,
            )
        )
    finally:
        ray.shutdown()
    modes = list(results[0]["median"])
    print_table(
        "Batch mode on Ray",
        ["images/s", *modes],
        [[r["case"], *(f"{r['median'][m]['images_per_s']:.2f}" for m in modes)] for r in results],
        note=f"Ray {ray.__version__}, a local cluster; images/s after the workers are up, medians of {args.rounds}",
        footer="\n".join(
            f"{r['case']} ({r['images']} images): workers up in "
            + ", ".join(f"{m} {r['median'][m]['start_s']:.1f} s" for m in modes if m.startswith("ray"))
            + "; Ray's cost per image: "
            + ", ".join(f"{k} {v:+.2f} ms" for k, v in r["overhead_ms_per_item"].items())
            for r in results
        ),
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_ray.json").write_text(
        json.dumps({"machine": machine, "ray": ray.__version__, "results": results}, indent=2)
    )
    print(f"wrote {OUT / 'bench_ray.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
