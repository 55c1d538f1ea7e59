"""A fuzz campaign over vlmcli's inputs (issue 11), at scale: not part of CI (tests/test_fuzz.py is).

    .venv/bin/python benchmarks/fuzz_campaign.py --per-kind 1000 --seed 1 --out fuzz-report.json

Builds the tiny random-weight fixtures (tests/fixtures, converted by the real converters), then for
each input kind makes `--per-kind` seeded mutations with tests/fuzzing.py and runs them in child
processes under RLIMIT_AS, in chunks (mutated model files are written per chunk and deleted after):

    llm, mmproj, clip   GGUF metadata: 1 to 3 mutations stacked, of any numeric key (a value, another
                        GGUF type, the key removed, an array element or length) or, one time in five,
                        of a string key (names, the vocabulary, merges, the chat template)
    tensors             tensor infos of the three files (a dimension, the dimension count, the type,
                        the data offset)
    image               mutated PNG / JPEG bytes and extreme shapes, through CLIP and SmolVLM2
    text                hostile texts, through CLIP's tokenizer + text tower and SmolVLM2's prompt

Prints and writes the counts per kind (accepted, refused cleanly, bug, crashed) and every problem:
a crash (signal, abort, hang, out of memory under the limit), a traceback, or a refusal that is not
one line naming the file.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzzing as fz  # noqa: E402


def build_fixtures(work: Path) -> fz.Models:
    from fixtures.clip import build_clip_checkpoint
    from fixtures.smolvlm2 import build_smolvlm2_checkpoint

    from vlmcli.convert.clip import convert_clip
    from vlmcli.convert.smolvlm2 import convert_smolvlm2

    ck = build_smolvlm2_checkpoint(work / "hf" / "SmolVLM2-256M-Video-Instruct", seed=0)
    vlm = convert_smolvlm2(ck, work / "vlm", quant="Q8_0", mmproj_quant="F16")
    cc = build_clip_checkpoint(work / "hf" / "clip-tiny", activation="quick_gelu", seed=0)
    clip = convert_clip(cc, work / "clip", "F16")
    image = work / "small.png"
    image.write_bytes(fz.png_bytes(64, 48))
    return fz.Models(str(vlm.model), str(vlm.mmproj), str(clip), str(image))


def stacked_mutation(raw: bytes, kind: str, rng: random.Random) -> fz.Mutation:
    """1 to 3 metadata mutations applied one after the other."""
    descs, targets = [], []
    m = None
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        layout = fz.parse_gguf(raw)
        if rng.random() < 0.2 and fz.string_keys(layout):  # now and then a string: names, vocabulary, template
            m = fz.mutate_string_kv(layout, rng.choice(fz.string_keys(layout)), rng, kind)
        else:
            m = fz.mutate_kv(layout, rng.choice(fz.numeric_keys(layout)), rng, kind)
        raw = m.data
        descs.append(f"{m.target} {m.op} {m.detail}")
        targets.append(m.target)
    assert m is not None
    return fz.Mutation(kind, "+".join(targets), "stack", "; ".join(descs), raw)


def model_jobs(kind: str, files: dict[str, Path], n: int, rng: random.Random, work: Path) -> list[fz.Job]:
    jobs = []
    if kind == "tensors":
        layouts = {k: fz.parse_gguf(p.read_bytes()) for k, p in files.items()}
        for i in range(n):
            k = ("llm", "mmproj", "clip")[i % 3]
            m = fz.mutate_tensor(layouts[k], rng.choice(layouts[k].tensors), rng, k)
            path = work / f"{i}-{files[k].name}"
            path.write_bytes(m.data)
            jobs.append(fz.Job(k, f"{m.target} {m.op} {m.detail}", str(path)))
        return jobs
    raw = files[kind].read_bytes()
    for i in range(n):
        m = stacked_mutation(raw, kind, rng)
        path = work / f"{i}-{files[kind].name}"
        path.write_bytes(m.data)
        jobs.append(fz.Job(kind, m.detail, str(path)))
    return jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=100, help="jobs per child process (and per batch of files on disk)")
    ap.add_argument("--kinds", default="llm,mmproj,clip,tensors,image,text")
    ap.add_argument("--rlimit-gb", type=float, default=fz.DEFAULT_RLIMIT_AS / 2**30)
    ap.add_argument("--out", type=Path, default=None, help="write the report (JSON) here")
    ap.add_argument(
        "--engines-from",
        type=Path,
        default=None,
        help="a source tree whose vlmcli the children import (e.g. an older revision, to compare)",
    )
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vlm-fuzz-"))
    report: dict = {
        "seed": args.seed,
        "per_kind": args.per_kind,
        "rlimit_bytes": int(args.rlimit_gb * 2**30),
        "counts": {},
        "problems": [],
        "max_rss_kb": 0,
        "seconds": {},
    }
    try:
        models = build_fixtures(work / "fixtures")
        files = {"llm": Path(models.llm), "mmproj": Path(models.mmproj), "clip": Path(models.clip)}
        seeds = [Path(models.image).read_bytes(), (ROOT / "vlmcli" / "data" / "chelsea.jpg").read_bytes()]
        for kind in args.kinds.split(","):
            rng = random.Random(f"{args.seed}-{kind}")
            t0 = time.time()
            done = 0
            totals: dict[str, dict[str, int]] = {}
            while done < args.per_kind:
                n = min(args.chunk, args.per_kind - done)
                chunk_dir = work / f"{kind}-{done}"
                chunk_dir.mkdir()
                if kind in ("llm", "mmproj", "clip", "tensors"):
                    jobs = model_jobs(kind, files, n, rng, chunk_dir)
                elif kind == "image":
                    jobs = []
                    for i, (desc, data) in enumerate(fz.image_mutations(seeds, rng, n)):
                        p = chunk_dir / f"{done + i}.img"
                        p.write_bytes(data)
                        jobs.append(fz.Job("image", desc, str(p)))
                else:
                    jobs = [fz.Job("text", repr(t[:60]), text=t) for t in fz.text_mutations(rng, n)]
                env = {"PYTHONPATH": str(args.engines_from)} if args.engines_from else None
                results, stats = fz.run_jobs(jobs, models, rlimit_as=report["rlimit_bytes"], env=env)
                report["max_rss_kb"] = max(report["max_rss_kb"], stats["max_rss_kb"])
                for k, c in fz.counts(results).items():
                    t = totals.setdefault(k, {"accepted": 0, "refused": 0, "bug": 0, "crashed": 0})
                    for o, v in c.items():
                        t[o] += v
                for p in fz.problems(results):
                    report["problems"].append(p)
                    print("PROBLEM", p[:2000], flush=True)
                shutil.rmtree(chunk_dir)
                done += n
                print(f"{kind}: {done}/{args.per_kind} {totals}", flush=True)
            report["counts"][kind] = totals
            report["seconds"][kind] = round(time.time() - t0, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in report.items() if k != "problems"}, indent=2))
    print(f"{len(report['problems'])} problems")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
