"""Time to first token with the image-encoding cache: a new image (cold) against one already seen.

Real-size random-weight SmolVLM2-256M (bench_vlm.build_model), the 2000x1333 photo at full detail
(the overview and every tile through the vision encoder) and the 451x300 sample at low detail.
Three settings per photo, interleaved and repeated, medians:
- cold: an empty cache folder (the encoder and the whole prefill run, and the entries are written);
- embd: the projector's output embeddings from the cache, the language model's prefill runs (what a
  different quantization of the same model gets);
- kv: the whole prompt prefix (the image's KV cells) from the cache: a seen image.
Time to first token = from the call to the first generated piece, on one loaded engine.

    python benchmarks/bench_cache.py [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import SAMPLE, build_model, make_large_photo  # noqa: E402
from report import print_table  # noqa: E402


def _drop_kv(root: Path) -> None:
    from vlmcli.engines.encoding_cache import read_entry

    for p in root.glob("??/*.enc"):
        entry = read_entry(p)
        if entry is not None and entry[0]["kind"] == "kv":
            p.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    args = ap.parse_args()

    from vlmcli.engines.encoding_cache import EncodingCache
    from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
    from vlmcli.images import load_image

    model, mmproj = build_model("256m", "Q8_0", Path(args.cache))
    photos = {
        "2000x1333, high": (make_large_photo(Path(args.cache) / "large.jpg"), "high"),
        "451x300, low": (SAMPLE, "low"),
    }
    folder = Path(tempfile.mkdtemp(prefix="vlm-bench-cache-"))
    cache = EncodingCache(folder)
    engines = {
        d: VlmEngine(model, mmproj, EngineOptions(n_threads=args.threads, detail=d, cache=cache))
        for d in ("high", "low")
    }
    gen = GenerationOptions(max_tokens=1)
    times: dict[tuple[str, str], list[float]] = {}
    passes: dict[str, int] = {}
    for _ in range(args.runs):
        for label, (path, detail) in photos.items():
            image = load_image(path)
            for setting in ("cold", "embd", "kv"):
                if setting == "cold":
                    shutil.rmtree(folder, ignore_errors=True)
                elif setting == "embd":
                    _drop_kv(folder)
                first: list[float] = []
                t0 = time.perf_counter()
                g = next(
                    engines[detail].ask(
                        image,
                        ["What is in this picture?"],
                        gen,
                        on_token=lambda _t, first=first: first.append(time.perf_counter()) or None,
                    )
                )
                ttft = (first[0] if first else time.perf_counter()) - t0
                assert g.image.cached == (None if setting == "cold" else setting), (setting, g.image.cached)
                times.setdefault((label, setting), []).append(ttft)
                if setting == "cold":
                    passes[label] = g.image.encoder_passes
    for e in engines.values():
        e.close()
    stats = EncodingCache(folder).stats()
    shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for label in photos:
        cold, embd, kv = (statistics.median(times[(label, s)]) for s in ("cold", "embd", "kv"))
        rows.append([label, passes[label], f"{cold:.2f} s", f"{embd:.2f} s", f"{kv:.3f} s", f"{cold / kv:.0f}x"])
    print_table(
        "The image-encoding cache",
        [
            "photo, detail",
            "encoder passes",
            "new image",
            "embeddings cached",
            "seen image (KV cells cached)",
            "new / seen",
        ],
        rows,
        note=f"256M Q8_0 (+F16 mmproj) real size, time to first token, {args.threads} threads, medians of {args.runs}",
        footer=f"(cache folder after the last run: {stats.entries} entries, {stats.bytes / 2**20:.1f} MiB)",
    )


if __name__ == "__main__":
    main()
