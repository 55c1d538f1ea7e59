"""SmolVLM2 speed and memory on llama.cpp: load, image encode, prefill, decode, peak RSS.

Builds a real-size random-weight SmolVLM2 (the cost per token and per image is the same as with
trained weights) from tests/data/configs, converts and quantizes it with vlmcli's converter,
then runs each measurement in a fresh process (so load time and peak RSS are honest) and reports
medians. Detail levels (issue 7) are compared in the same run.

--peers compares instead with what users would pick (issue 14), on the same GGUFs (or, for
transformers, the checkpoint they came from), image, threads and prompt, greedy, `--tokens`
generated with EOS ignored, full tiling (13 encoder passes on the sample photo), no encoding cache:
vlm's engine (detail high, VLM_CACHE_SIZE=0), llama.cpp's `llama-mtmd-cli` (built by llama_tools.py
from the pinned llama-cpp-python) and transformers' SmolVLM (F32, through --torch-python). Each run
is a fresh process, rounds interleaved; wall time and peak RSS are the whole command's.

    python benchmarks/bench_vlm.py                      # 256M, Q8_0, 5 runs, detail low/auto/high
    python benchmarks/bench_vlm.py --size 500m --runs 3 --details low,high --images small,large
    python benchmarks/bench_vlm.py --peers --threads 2 --runs 5 --torch-python /tmp/torchenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SAMPLE = ROOT / "vlmcli" / "data" / "chelsea.jpg"
CONFIGS = ROOT / "tests" / "data" / "configs"
OUT = ROOT / "benchmarks" / "out"
NAMES = {"256m": "SmolVLM2-256M-Video-Instruct", "500m": "SmolVLM2-500M-Video-Instruct"}
PROMPT = "Describe this image."
# SmolVLM2's chat template rendered for one image and PROMPT (vlm renders the same from the GGUF).
CHAT_PROMPT = f"<|im_start|>User:<image>{PROMPT}<end_of_utterance>\nAssistant:"


def build_model(size: str, quant: str, cache: Path) -> tuple[Path, Path]:
    """Build (once, cached) the real-size random-weight checkpoint (cache/NAMES[size]) and convert it."""
    from fixtures.smolvlm2 import build_smolvlm2_checkpoint

    from vlmcli.convert import convert_checkpoint

    name = NAMES[size]
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
    g = next(
        engine.ask(
            image,
            [PROMPT],
            gen,
            on_token=lambda s: first_token.append(time.perf_counter()) if not first_token else None,
        )
    )
    total = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = g.timings
    print(
        json.dumps(
            {
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
                "first_token_unix": time.time()
                - time.perf_counter()
                + (first_token[0] if first_token else time.perf_counter()),
            }
        )
    )


def smolvlm_processor(path: str):
    """transformers' AutoProcessor, or where torchvision is missing (SmolVLM's video processor needs it, and the
    registry has only CUDA builds of it for Linux) the same SmolVLMProcessor without its video part."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError:
        from transformers import AutoImageProcessor, AutoTokenizer, SmolVLMProcessor

        class ImageOnly(SmolVLMProcessor):
            @classmethod
            def get_attributes(cls) -> list[str]:
                return ["image_processor", "tokenizer"]

        seq_len = json.loads((Path(path) / "processor_config.json").read_text())["image_seq_len"]
        return ImageOnly(
            AutoImageProcessor.from_pretrained(path, backend="pil"),
            AutoTokenizer.from_pretrained(path),
            None,
            image_seq_len=seq_len,
        )


def torch_worker(args: argparse.Namespace) -> None:
    """transformers' SmolVLM, F32, in this process (the --torch-python one): load, one image, --tokens tokens."""
    t0 = time.perf_counter()
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(args.threads)
    processor = smolvlm_processor(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    stamps: list[float] = []  # one per generated token, when its logits are ready
    encode: list[float] = []  # the vision tower's start and end

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    vision = model.model.vision_model
    vision.register_forward_pre_hook(lambda *_: encode.append(time.perf_counter()))
    vision.register_forward_hook(lambda *_: encode.append(time.perf_counter()))
    start = time.perf_counter()
    inputs = processor(text=CHAT_PROMPT, images=[Image.open(args.image)], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([Stamp()]),
        )
    print(
        json.dumps(
            {
                "load_s": load_s,
                "ttft_s": stamps[0] - start,
                "encode_s": encode[1] - encode[0],
                "prefill_s": stamps[0] - encode[1],
                "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                "generated": out.shape[1] - inputs["input_ids"].shape[1],
                "image_tokens": int((inputs["input_ids"] == processor.image_token_id).sum()),
                "encoder_passes": int(inputs["pixel_values"].shape[1]),
                "vision_calls": len(encode) // 2,
                "first_token_unix": time.time() - time.perf_counter() + stamps[0],
                "torch": torch.__version__,
                "processor": type(processor.image_processor).__name__,
            }
        )
    )


def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run cmd to its end: wall s, peak RSS MB (its own, from wait4, children included), when its stdout
    first showed a non-blank byte (llama-mtmd-cli's first token), its stdout and stderr."""
    first: list[float] = []
    chunks: list[bytes] = []

    def read(stream) -> None:
        while chunk := os.read(stream.fileno(), 65536):
            if not first and chunk.strip():
                first.append(time.time())
            chunks.append(chunk)

    with tempfile.TemporaryFile("w+") as err:
        launch, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        reader = threading.Thread(target=read, args=(proc.stdout,))
        reader.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        reader.join()
        proc.stdout.close()
        err.seek(0)
        stderr = err.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{cmd[0]} failed ({os.waitstatus_to_exitcode(status)}):\n{stderr[-2000:]}")
    return {
        "launch_unix": launch,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "stdout_unix": first[0] if first else None,
        "stdout": b"".join(chunks).decode(errors="replace"),
        "stderr": stderr,
    }


def mtmd_timings(log: str) -> dict:
    """The figures llama-mtmd-cli prints (with --perf): mtmd's image encode and decode times, the log's
    timestamp (m.ss.mmm.uuu since start) of "main: loading model" (everything is loaded then), and
    llama_perf_context_print's decode line. Its "prompt eval time" is left out: it spans the image encodes."""
    numbers = lambda pattern: [float(x) for x in re.findall(pattern, log)]  # noqa: E731
    decode = re.search(r"\s eval time =\s*([\d.]+) ms /\s*(\d+) runs", log)
    loaded = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) \w main: loading model", log)
    if not decode:
        raise RuntimeError("no llama_perf timings in llama-mtmd-cli's output:\n" + log[-2000:])
    runs = int(decode[2])
    return {
        "load_s": int(loaded[1]) * 60 + int(loaded[2]) + int(loaded[3]) / 1e3 + int(loaded[4]) / 1e6
        if loaded
        else None,
        "encode_s": sum(numbers(r"mtmd batch encoding done in (\d+) ms") + numbers(r"slice encoded in (\d+) ms"))
        / 1000,
        "prefill_s": sum(numbers(r"image decoded \(batch \d+/\d+\) in (\d+) ms")) / 1000,  # image tokens only
        "decode_tok_s": runs / float(decode[1]) * 1000,
        "eval_runs": runs,  # the last decode is not counted: generated = runs + 1 when no EOS stopped it
        "image_tokens": int(sum(numbers(r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)"))),
        "encoder_passes": len(numbers(r"mtmd batch encoding done in (\d+) ms")) or None,
    }


def peers(args: argparse.Namespace, model: Path, mmproj: Path) -> None:
    """vlm against llama-mtmd-cli and transformers: one fresh process per run, rounds interleaved."""
    from bench_clip import torch_python
    from llama_tools import tool
    from machine import cpu_description
    from report import print_table

    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    n, threads = str(args.tokens), str(args.threads)
    env = {**os.environ, "VLM_CACHE_SIZE": "0"}
    commands = {
        "vlm": [
            sys.executable,
            __file__,
            "--worker",
            "--model",
            str(model),
            "--mmproj",
            str(mmproj),
            "--image",
            str(SAMPLE),
            "--detail",
            "high",
            "--tokens",
            n,
            "--threads",
            threads,
        ]
    }
    mtmd = str(tool("llama-mtmd-cli"))
    commands["llama-mtmd-cli"] = [
        mtmd,
        "-m",
        str(model),
        "--mmproj",
        str(mmproj),
        "--image",
        str(SAMPLE),
        "-p",
        f"<__media__>{PROMPT}",
        "-n",
        n,
        "-t",
        threads,
        "--temp",
        "0",
        "-c",
        "8192",
        "--ignore-eos",
        "--perf",
        "-lv",
        "4",
    ]  # --perf, -lv 4: it prints its timings
    torch_py = torch_python(args.torch_python)
    if torch_py:
        commands["transformers"] = [
            torch_py,
            __file__,
            "--torch-worker",
            "--model",
            str(model.parent.parent / NAMES[args.size]),
            "--image",
            str(SAMPLE),
            "--tokens",
            n,
            "--threads",
            threads,
        ]
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for r in range(args.runs):
        for name, cmd in commands.items():
            print(f"round {r + 1}/{args.runs}: {name} ...", file=sys.stderr, flush=True)
            m = run_measured(cmd, env)
            if name == "llama-mtmd-cli":
                row = {**mtmd_timings(m["stderr"]), "generated": args.tokens}  # --ignore-eos
                first = m["stdout_unix"]
            else:
                row = json.loads(m["stdout"].strip().splitlines()[-1])
                first = row["first_token_unix"]
            if name == "vlm":
                row = {
                    "load_s": row["load_ms"] / 1000,
                    "encode_s": row["image_encode_ms"] / 1000,
                    "prefill_s": row["prefill_ms"] / 1000,
                    "ttft_s": row["ttft_ms"] / 1000,
                    **{k: row[k] for k in ("decode_tok_s", "generated", "image_tokens", "encoder_passes")},
                }
            row["launch_ttft_s"] = first - m["launch_unix"]
            if name == "llama-mtmd-cli":
                row["ttft_s"] = row["launch_ttft_s"] - row["load_s"]
            runs[name].append({**row, "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"]})
    keys = ("wall_s", "launch_ttft_s", "ttft_s", "decode_tok_s", "peak_rss_mb", "load_s", "encode_s", "prefill_s")
    rows = []
    for name, rs in runs.items():
        row = {**rs[0], "name": name, "command": commands[name], "runs": len(rs)}
        for key in keys:
            values = [x[key] for x in rs if x.get(key) is not None]
            row[key] = statistics.median(values) if values else None
            row[f"{key}_all"] = values
        rows.append(row)
    base = rows[0]
    for row in rows:  # vlm's advantage: > 1 where vlm is faster or smaller
        row["vlm_x"] = {
            "wall_s": row["wall_s"] / base["wall_s"],
            "launch_ttft_s": row["launch_ttft_s"] / base["launch_ttft_s"],
            "decode_tok_s": base["decode_tok_s"] / row["decode_tok_s"],
            "peak_rss_mb": row["peak_rss_mb"] / base["peak_rss_mb"],
        }
    load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    cells = []
    for r in rows:
        x = r["vlm_x"]
        cells.append(
            [
                r["name"],
                f"{r['wall_s']:.1f} s ({x['wall_s']:.2f}x vlm)",
                f"{r['launch_ttft_s']:.1f} s",
                f"{r['decode_tok_s']:.1f} ({x['decode_tok_s']:.2f}x)",
                f"{r['peak_rss_mb']:,.0f} MB ({x['peak_rss_mb']:.2f}x)",
                f"{fmt(r['load_s'], 2)} s",
                f"{fmt(r['ttft_s'], 1)} s",
                f"{fmt(r['encode_s'], 1)} s",
                f"{fmt(r['prefill_s'], 2)} s",
                r.get("encoder_passes") or "-",
                r.get("image_tokens", "-"),
                r.get("generated", "-"),
            ]
        )
    print_table(
        f"SmolVLM2 {args.size} against llama-mtmd-cli and transformers",
        [
            f"SmolVLM2 {args.size}, full tiling",
            "wall (launch to exit)",
            "time to first token (from launch)",
            "decode tok/s",
            "peak RSS",
            "load",
            "first token after load",
            "encode",
            "prefill",
            "encoder passes",
            "image tokens",
            "generated",
        ],
        cells,
        note=f"{args.quant} (+F16 mmproj; transformers: the F32 checkpoint), the small photo at full tiling, "
        f"{args.tokens} greedy tokens (EOS ignored), {args.threads} threads, encoding cache off, "
        f"medians of {args.runs} interleaved runs, each a fresh process",
        footer=f"(Nx: the peer against vlm; wall, first token and RSS count the whole process from its launch; "
        f"mtmd-cli's prefill: its image batches only; load average before {load_before}, after {load_after})",
    )
    OUT.mkdir(parents=True, exist_ok=True)
    dest = OUT / f"vlm-peers-{args.size}-{args.quant}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.write_text(
        json.dumps(
            {
                "cpu": cpu_description(),
                "threads": args.threads,
                "tokens": args.tokens,
                "runs": args.runs,
                "load_average_before": load_before,
                "load_average_after": load_after,
                "results": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {dest}", file=sys.stderr)


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
    ap.add_argument("--peers", action="store_true", help="compare with llama-mtmd-cli and transformers (detail high)")
    ap.add_argument(
        "--torch-python",
        help="with --peers: a Python with torch + transformers (default: this one, "
        "if it has them; else no transformers row)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--image")
    ap.add_argument("--detail")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.torch_worker:
        return torch_worker(args)

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, mmproj = build_model(args.size, args.quant, cache)
    if args.peers:
        return peers(args, model, mmproj)
    images = {"small": SAMPLE, "large": make_large_photo(cache / "large.jpg")}
    rows = []
    for image_name in args.images.split(","):
        for detail in args.details.split(","):
            runs = []
            for _ in range(args.runs):
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--model",
                    str(model),
                    "--mmproj",
                    str(mmproj),
                    "--image",
                    str(images[image_name]),
                    "--detail",
                    detail,
                    "--tokens",
                    str(args.tokens),
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            med.update(size=args.size, quant=args.quant, image=image_name, detail=detail, runs=args.runs)
            rows.append(med)
            print(
                f"{args.size} {args.quant} {image_name:5s} {detail:4s}: passes {med['encoder_passes']:.0f}, "
                f"image tokens {med['image_tokens']:.0f}, load {med['load_ms']:.0f} ms, "
                f"encode {med['image_encode_ms']:.0f} ms, "
                f"prefill {med['prefill_tok_s']:.0f} tok/s, decode {med['decode_tok_s']:.1f} tok/s, "
                f"TTFT {med['ttft_ms']:.0f} ms, image {1 / med['image_total_s']:.3f} img/s, "
                f"peak RSS {med['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    from report import print_table

    print_table(
        "SmolVLM2 by model, photo and detail",
        [
            f"SmolVLM2 {args.quant} (+F16 mmproj)",
            "detail",
            "encoder passes",
            "image tokens",
            "time to first token",
            "img/s",
            "decode tok/s",
            "prefill tok/s",
            "load",
            "peak RSS",
        ],
        [
            [
                f"{r['size'].upper()}, {r['image']}",
                r["detail"],
                f"{r['encoder_passes']:.0f}",
                f"{r['image_tokens']:.0f}",
                f"{r['ttft_ms'] / 1000:.1f} s",
                f"{1 / r['image_total_s']:.3f}",
                f"{r['decode_tok_s']:.0f}",
                f"{r['prefill_tok_s']:.0f}",
                f"{r['load_ms'] / 1000:.2f} s",
                f"{r['peak_rss_mb'] / 1024:.2f} GB",
            ]
            for r in rows
        ],
        note=f"{args.tokens} generated tokens, {args.threads} threads, medians of {args.runs} runs, "
        "each in a fresh process",
    )
    OUT.mkdir(parents=True, exist_ok=True)
    dest = OUT / f"vlm-{args.size}-{args.quant}.json"
    dest.write_text(json.dumps(rows, indent=1))
    print(f"written to {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
