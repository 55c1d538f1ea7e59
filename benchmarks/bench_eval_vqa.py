"""How long `vlm eval vqa` takes for 1,000 questions: real-size random-weight SmolVLM2-256M at low detail.

VQAv2 has about 5 questions per image, so the dataset here is 200 distinct photos (crops of the
shipped sample photos at several sizes) with 5 questions each, as JSONL. The command runs as a user
runs it (`vlm eval vqa DATA -m MODEL --mmproj MMPROJ --detail low --out run.jsonl --json`) in a fresh
process; the report's own speed fields are printed beside the wall time.

Random weights rarely emit the end token, so every answer runs to the 16-token cap; a trained model
answers in 1-3 tokens, so this is an upper bound on the decoding part.

    python benchmarks/bench_eval_vqa.py [--questions 1000] [--per-image 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import ROOT, build_model  # noqa: E402
from report import print_table  # noqa: E402

QUESTIONS = [
    "What is in the picture?",
    "What color is it?",
    "How many are there?",
    "Is it indoors?",
    "What is it made of?",
]


def make_dataset(folder: Path, questions: int, per_image: int, seed: int = 0) -> Path:
    """`questions` VQA items over questions // per_image distinct images (JPEG crops of the sample photos)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted((ROOT / "vlmcli" / "data" / "sample").glob("*/*.jpg"))
    rng = random.Random(seed)
    lines = []
    for i in range(-(-questions // per_image)):
        path = folder / f"img{i:04d}.jpg"
        if not path.exists():
            im = Image.open(photos[i % len(photos)]).convert("RGB")
            w, h = im.size
            cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            im.crop((x, y, x + cw, y + ch)).resize((rng.randint(320, 640), rng.randint(240, 480))).save(
                path, quality=90
            )
        for k in range(per_image):
            if len(lines) < questions:
                answers = [rng.choice(["yes", "no", "2", "red", "wood"]) for _ in range(10)]
                lines.append(
                    json.dumps({"image": path.name, "question": QUESTIONS[k % len(QUESTIONS)], "answers": answers})
                )
    data = folder / "vqa.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlmcli-bench"))
    args = ap.parse_args()

    model, mmproj = build_model("256m", args.quant, Path(args.cache))
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(args.cache) / f"vqa-{args.questions}x{args.per_image}", args.questions, args.per_image)
        out = Path(tmp) / "run.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "vlmcli",
            "eval",
            "vqa",
            str(data),
            "-m",
            str(model),
            "--mmproj",
            str(mmproj),
            "--detail",
            "low",
            "--threads",
            str(args.threads),
            "--out",
            str(out),
            "--json",
            "--quiet",
        ]
        # A fresh encoding cache: the figure is a first run over new images, not a repeat.
        env = {**os.environ, "VLM_CACHE_DIR": str(Path(tmp) / "encodings")}
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"vlm eval failed ({done.returncode}): {done.stderr.strip()}")
    report = json.loads(done.stdout)
    run = report["runs"][0]
    speed = run["speed"]
    questions, images = report["questions"], report["images"]
    print_table(
        f"`vlm eval vqa`, {questions:,} questions",
        ["questions", "images", "wall time (process)", "per question", "images/s", "time to first token"],
        [
            [
                f"{questions:,}",
                images,
                f"{wall / 60:.1f} min",
                f"{wall / questions:.2f} s",
                f"{speed.get('images_per_s', 0):.2f}",
                f"{speed.get('ttft_s', 0):.2f} s",
            ]
        ],
        note=f"256M {args.quant} (+F16 mmproj) real size, low detail, answers capped at 16 tokens, "
        f"{args.threads} threads, a fresh `vlm eval vqa` process, model load included",
    )


if __name__ == "__main__":
    main()
