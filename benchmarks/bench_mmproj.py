"""The vision projector's type: F16 against Q8_0 mmproj, encoder time and how far Q8_0's output moves.

Real-size random-weight SmolVLM2-256M (bench_vlm.build_model's checkpoint), the language model Q8_0
in both cases, the projector converted both ways. Encoder time = the engine's image_encode_ms for the
451x300 sample at low detail (one 512 px pass) and the 2000x1333 photo at full detail (13 passes),
interleaved, medians, no encoding cache. Quality: the cosine between the F16 and Q8_0 projectors'
output embeddings (one vector per image token), read back from the encoding cache's entries.

    python benchmarks/bench_mmproj.py [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import SAMPLE, build_model, make_large_photo  # noqa: E402
from report import print_table  # noqa: E402


def q8_mmproj(cache: Path) -> Path:
    from vlmcli.convert.smolvlm2 import convert_smolvlm2

    out = cache / "SmolVLM2-256M-Video-Instruct-mmproj-Q8_0"
    existing = sorted(out.glob("mmproj-*Q8_0.gguf"))
    if existing:
        return existing[0]
    return convert_smolvlm2(cache / "SmolVLM2-256M-Video-Instruct", out, quant="Q8_0", mmproj_quant="Q8_0").mmproj


def embeddings(folder: Path) -> np.ndarray:
    """Every "embd" entry's vectors, in chunk order (one image per folder)."""
    from vlmcli.engines.encoding_cache import read_entry

    rows = []
    for p in folder.glob("??/*.enc"):
        entry = read_entry(p)
        if entry is not None and entry[0]["kind"] == "embd":
            key, hit = entry
            rows.append((key["chunk"], np.frombuffer(hit.payload, np.float32).reshape(-1, hit.meta["width"])))
    return np.concatenate([r for _, r in sorted(rows, key=lambda t: t[0])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    args = ap.parse_args()

    from vlmcli.engines.encoding_cache import EncodingCache
    from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
    from vlmcli.images import load_image

    cache = Path(args.cache)
    model, mmproj_f16 = build_model("256m", "Q8_0", cache)
    projectors = {"F16": mmproj_f16, "Q8_0": q8_mmproj(cache)}
    photos = {"451x300, low": (SAMPLE, "low"), "2000x1333, full": (make_large_photo(cache / "large.jpg"), "high")}
    gen = GenerationOptions(max_tokens=1)
    times: dict[tuple[str, str], list[float]] = {}
    vectors: dict[tuple[str, str], np.ndarray] = {}
    engines = {
        (t, d): VlmEngine(model, p, EngineOptions(n_threads=args.threads, detail=d))
        for t, p in projectors.items()
        for d in ("low", "high")
    }
    for run in range(args.runs):
        for label, (path, detail) in photos.items():
            image = load_image(path)
            for t in projectors:
                g = next(engines[t, detail].ask(image, ["What is this?"], gen))
                times.setdefault((label, t), []).append(g.timings.image_encode_ms / 1000)
                if run == 0:  # the projector's output, once, through an encoding cache of its own
                    with tempfile.TemporaryDirectory() as tmp:
                        e = VlmEngine(
                            model,
                            projectors[t],
                            EngineOptions(n_threads=args.threads, detail=detail, cache=EncodingCache(Path(tmp))),
                        )
                        next(e.ask(image, ["What is this?"], gen))
                        e.close()
                        vectors[label, t] = embeddings(Path(tmp))
    for e in engines.values():
        e.close()
    rows = []
    for label in photos:
        f16, q8 = (statistics.median(times[label, t]) for t in ("F16", "Q8_0"))
        a, b = vectors[label, "F16"], vectors[label, "Q8_0"]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        rows.append([label, f"{f16:.2f} s", f"{q8:.2f} s", f"{q8 / f16:.2f}x", f"{cos.mean():.5f} ({cos.min():.5f})"])
    print_table(
        "Vision projector, F16 against Q8_0",
        ["photo, detail", "encoder F16", "encoder Q8_0", "Q8_0 / F16", "cosine Q8_0 to F16 (min over tokens)"],
        rows,
        note=f"256M real size, language model Q8_0, {args.threads} threads, medians of {args.runs}",
    )


if __name__ == "__main__":
    main()
