"""The cost of structured output per token: SmolVLM2 decode tokens/s with and without a grammar.

Builds (once, cached) the real-size random-weight SmolVLM2 as bench_vlm.py does, loads it once, and
answers the same image and prompt in rounds, interleaved: free text, --json-schema (a tagging schema),
and JSON object mode. Decode time includes sampling (the grammar's share of it) and the closing of
answers at the budget. Reports the medians of decode tokens/s. Random weights wander inside JSON
strings, where the grammar rarely refuses the sampler's pick; trained weights write more structure.

    python benchmarks/bench_grammar.py                 # 256M, Q8_0, 5 rounds, 64 tokens
    python benchmarks/bench_grammar.py --runs 9 --tokens 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_vlm import SAMPLE, build_model  # noqa: E402  (benchmarks/ on the path first)

SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string"},
        "objects": {"type": "array", "items": {"type": "string"}},
        "people": {"type": "integer"},
        "text_present": {"type": "boolean"},
        "scene": {"enum": ["indoor", "outdoor"]},
    },
    "required": ["caption", "objects", "people", "text_present", "scene"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256m", choices=["256m", "500m"])
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    args = ap.parse_args()

    from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
    from vlmcli.images import load_image
    from vlmcli.tasks.structured import from_schema, json_object

    model, mmproj = build_model(args.size, args.quant, Path(args.cache))
    engine = VlmEngine(model, mmproj, EngineOptions(n_threads=args.threads, detail="low"))
    image = load_image(str(SAMPLE))
    modes = {"free text": None, "json_schema": from_schema(SCHEMA), "json_object": json_object()}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, list[int]] = {m: [] for m in modes}
    valid: dict[str, int] = {m: 0 for m in modes}
    for run in range(args.runs + 1):  # round 0 warms up (and reads the vocabulary's pieces once)
        for mode, structure in modes.items():
            gen = GenerationOptions(
                max_tokens=args.tokens,
                temperature=1.0,
                seed=run,
                ignore_eos=structure is None,  # free text: always the full budget
                constraint=structure.constraint() if structure else None,
            )
            (g,) = list(engine.ask(image, ["Describe this image as JSON."], gen))
            if run == 0:
                continue
            rates[mode].append(g.timings.decode_tokens_per_s)
            tokens[mode].append(g.generated_tokens)
            valid[mode] += structure is not None and structure.parse(g.text)[1] is None
    engine.close()
    print(f"SmolVLM2 {args.size} {args.quant}, {args.runs} runs, --max-tokens {args.tokens}, temperature 1, "
          f"threads {args.threads or 'default'} ({os.cpu_count()} CPUs)")  # fmt: skip
    print(f"{'mode':<12} {'decode tok/s (median)':>22} {'tokens (median)':>16} {'valid':>6}")
    for mode in modes:
        ok = f"{valid[mode]}/{args.runs}" if modes[mode] is not None else "-"
        print(f"{mode:<12} {statistics.median(rates[mode]):>22.1f} {statistics.median(tokens[mode]):>16.0f} {ok:>6}")
    print(json.dumps({"rates": rates, "tokens": tokens, "valid": valid}))


if __name__ == "__main__":
    main()
