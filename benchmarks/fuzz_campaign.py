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
    index, query, video, multi, schema, grammar
                        issue 36's input kinds, each through the real command line (tests/fuzz_kinds.py):
                        the photo index's SQLite file, search queries, videos, several images in one
                        prompt, JSON schemas and GBNF grammars

Prints and writes the table per kind (mutations, accepted, clean error, traceback, crash, hang, blow-up:
over 30 s or 1.5 GB for one input) and every problem: a crash (signal, abort, hang, out of memory under
the limit), a traceback, or a refusal that is not one line naming the file.
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

import fuzz_kinds as fk  # noqa: E402
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


NEW_KINDS = ("index", "query", "video", "multi", "schema", "grammar")


class NewKinds:
    """What issue 36's kinds start from: a real index and its images, small real videos, image seeds."""

    def __init__(self, models: fz.Models, work: Path, image_seeds: list[bytes]):
        self.models = models
        self.index, self.images = fk.build_index(models, work / "index")
        self.videos = fk.video_seeds()
        self.image_seeds = image_seeds

    def jobs(self, kind: str, n: int, rng: random.Random, out: Path) -> list[fz.Job]:
        m = self.models
        if kind == "index":
            return fk.index_jobs(self.index, self.images, m, rng, n, out)
        if kind == "query":
            return fk.query_jobs(self.index, self.images, m, rng, n, out)
        if kind == "video":
            return fk.video_jobs(m, self.videos, rng, n, out)
        if kind == "multi":
            return fk.multi_jobs(m, self.image_seeds, self.videos["plain"], rng, n, out)
        return fk.structure_jobs(kind, m, rng, n, out)


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


def markdown_table(table: dict[str, dict[str, int]]) -> str:
    columns = ["mutations", "accepted", "clean error", "traceback", "crash", "hang", "blow-up", "max s", "max MB"]
    lines = ["| kind | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for kind, row in table.items():
        lines.append(f"| {kind} | " + " | ".join(f"{row.get(c, 0):,}" for c in columns) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=100, help="jobs per child process (and per batch of files on disk)")
    ap.add_argument("--kinds", default="llm,mmproj,clip,tensors,image,text," + ",".join(NEW_KINDS))
    ap.add_argument("--rlimit-gb", type=float, default=fz.DEFAULT_RLIMIT_AS / 2**30)
    ap.add_argument(
        "--job-timeout", type=float, default=45.0, help="seconds without progress before a job counts as a hang"
    )
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
        "table": {},
        "problems": [],
        "max_rss_kb": 0,
        "seconds": {},
    }
    try:
        models = build_fixtures(work / "fixtures")
        files = {"llm": Path(models.llm), "mmproj": Path(models.mmproj), "clip": Path(models.clip)}
        seeds = [Path(models.image).read_bytes(), (ROOT / "vlmcli" / "data" / "chelsea.jpg").read_bytes()]
        kinds = args.kinds.split(",")
        new = NewKinds(models, work / "fixtures", seeds) if set(kinds) & set(NEW_KINDS) else None
        for kind in kinds:
            rng = random.Random(f"{args.seed}-{kind}")
            t0 = time.time()
            done = 0
            totals: dict[str, dict[str, int]] = {}
            table: dict[str, int] = {}
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
                elif kind in NEW_KINDS:
                    assert new is not None
                    jobs = new.jobs(kind, n, rng, chunk_dir)
                else:
                    jobs = [fz.Job("text", repr(t[:60]), text=t) for t in fz.text_mutations(rng, n)]
                env = {"PYTHONPATH": str(args.engines_from)} if args.engines_from else None
                results, stats = fz.run_jobs(
                    jobs, models, rlimit_as=report["rlimit_bytes"], job_timeout=args.job_timeout, env=env
                )
                report["max_rss_kb"] = max(report["max_rss_kb"], stats["max_rss_kb"])
                for k, c in fz.counts(results).items():
                    t = totals.setdefault(k, {"accepted": 0, "refused": 0, "bug": 0, "crashed": 0})
                    for o, v in c.items():
                        t[o] += v
                for row in fz.outcome_table(results).values():
                    for col, v in row.items():
                        table[col] = max(table.get(col, 0), v) if col.startswith("max") else table.get(col, 0) + v
                for p in fz.problems(results):
                    report["problems"].append(p)
                    print("PROBLEM", p[:2000], flush=True)
                shutil.rmtree(chunk_dir)
                done += n
                report["counts"][kind], report["table"][kind] = totals, table
                report["done"] = {**report.get("done", {}), kind: done}
                if args.out:  # after every chunk: a campaign stopped early keeps what it ran
                    args.out.write_text(json.dumps(report, indent=2))
                print(f"{kind}: {done}/{args.per_kind} {totals}", flush=True)
            report["counts"][kind] = totals
            report["table"][kind] = table
            report["seconds"][kind] = round(time.time() - t0, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in report.items() if k != "problems"}, indent=2))
    print(markdown_table(report["table"]))
    print(f"{len(report['problems'])} problems")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
