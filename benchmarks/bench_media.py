"""Time to first token for several images and for a video, on the real-size random-weight SmolVLM2.

The model is built from tests/data/configs and converted as bench_vlm.py does (cached in --cache).
Each measurement runs in a fresh process with its own empty encoding cache (cold), from the call
with the decoded inputs' paths to the first generated token, so decoding the video or photos, the
vision encoder and the prompt's prefill all count; loading the model does not. Then, in another
fresh process sharing that cache, a second question on the same video: it should run no encoder
pass (the media prefix's KV cells come from the encoding cache), and within one process a second
question reuses the KV cells in memory.

    python benchmarks/bench_media.py                 # 256M Q8_0, 3 runs: 60 s video, 2 photos at auto
    python benchmarks/bench_media.py --runs 5 --video-seconds 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SAMPLE = ROOT / "vlmcli" / "data" / "chelsea.jpg"


def make_video(path: Path, seconds: int, fps: int = 24, width: int = 640, height: int = 360) -> Path:
    """A moving test pattern of `seconds` (so that frames differ, as a real video's do)."""
    import av
    import numpy as np

    if path.exists():
        return path
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(seconds * fps):
            pixels = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, (xx + yy + i) % 256], axis=-1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def worker(args: argparse.Namespace) -> None:
    """One fresh process: open the model, then time each question from the inputs' paths to its first token."""
    from vlmcli.engines.encoding_cache import EncodingCache
    from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
    from vlmcli.tasks.media_inputs import MediaInput, load_media
    from vlmcli.tasks.video import Sampling

    cache = EncodingCache(Path(args.cache_dir))
    opts = EngineOptions(detail=args.detail, n_ctx=args.ctx, cache=cache, reuse_kv=True)  # as chat and serve
    engine = VlmEngine(args.model, args.mmproj, opts)
    out = []
    first: list[float] = []

    def on_token(_: str) -> None:
        first.append(time.perf_counter())

    for question in args.questions:
        t0 = time.perf_counter()
        first.clear()
        media = load_media(MediaInput(tuple(args.inputs)), None, engine.vision.tile_size, Sampling())
        t_decoded = time.perf_counter()
        gen = next(engine.ask(media, [question], GenerationOptions(max_tokens=4), on_token=on_token))
        out.append(
            {
                "ttft_s": round((first[0] if first else time.perf_counter()) - t0, 3),
                "decode_inputs_s": round(t_decoded - t0, 3),
                "encode_s": round(gen.timings.image_encode_ms / 1000, 3),
                "prefill_s": round(gen.timings.prefill_ms / 1000, 3),
                "prompt_tokens": gen.prompt_tokens,
                "image_tokens": gen.image.image_tokens,
                "encoder_passes": gen.image.encoder_passes,
                "cache": gen.image.cached,
            }
        )
    engine.close()
    print(json.dumps(out))


def run(model: Path, mmproj: Path, inputs: list[str], questions: list[str], cache_dir: Path, detail: str) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--mmproj", str(mmproj)]
    cmd += ["--cache-dir", str(cache_dir), "--detail", detail, "--ctx", "8192", "--inputs", *inputs]
    cmd += ["--questions", *questions]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--cache-dir")
    ap.add_argument("--detail", default="auto")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--inputs", nargs="*", default=[])
    ap.add_argument("--questions", nargs="*", default=[])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--video-seconds", type=int, default=60)
    ap.add_argument("--size", default="256m")
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from bench_vlm import build_model, make_large_photo

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, mmproj = build_model(args.size, args.quant, cache)
    video = make_video(cache / f"pattern-{args.video_seconds}s.mp4", args.video_seconds)
    large = make_large_photo(cache / "large.jpg")
    cases = {
        f"{args.video_seconds} s video (default sampling)": [str(video)],
        "2 photos, --detail auto": [str(SAMPLE), str(large)],
    }
    results: dict[str, dict[str, list[dict]]] = {}
    for _ in range(args.runs):
        for name, inputs in cases.items():
            with tempfile.TemporaryDirectory() as encodings:
                first = run(model, mmproj, inputs, ["What happens here?", "And then?"], Path(encodings), "auto")
                again = run(model, mmproj, inputs, ["Who is there?"], Path(encodings), "auto")
            r = results.setdefault(
                name, {"cold": [], "same process, 2nd question": [], "new process, 2nd question": []}
            )
            r["cold"].append(first[0])
            r["same process, 2nd question"].append(first[1])
            r["new process, 2nd question"].append(again[0])
    print(f"real-size {args.size} {args.quant}, {args.runs} runs, medians; threads: the process's share of the cores")
    print("| input | question | first token | decoding inputs | encoder | prefill | prompt / image tokens | passes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, by_kind in results.items():
        for kind, rows in by_kind.items():
            keys = ("ttft_s", "decode_inputs_s", "encode_s", "prefill_s")
            med = {k: statistics.median(r[k] for r in rows) for k in keys}
            last = rows[-1]
            print(
                f"| {name} | {kind} | {med['ttft_s']:.2f} s | {med['decode_inputs_s']:.2f} s | {med['encode_s']:.2f} s "
                f"| {med['prefill_s']:.2f} s | {last['prompt_tokens']} / {last['image_tokens']} "
                f"| {last['encoder_passes']} ({last['cache'] or 'none cached'}) |"
            )


if __name__ == "__main__":
    main()
