"""Start-up time of commands that run no model: `vlm --help`, `vlm models`, `vlm rm`, and an option
error of `vlm pull`. Medians of fresh processes; compare two source trees in one run with --against.

    python benchmarks/bench_startup.py                       # this tree
    python benchmarks/bench_startup.py --against /tmp/old    # and another checkout (e.g. git worktree add /tmp/old HEAD~5)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_description  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "vlm --help": ["--help"],
    "vlm models": ["models"],
    "vlm rm (not installed)": ["rm", "no-such-model"],
    "vlm pull --from bad": ["pull", "smolvlm2-256m", "--from", "nowhere"],
}


def run_once(tree: Path, args: list[str], home: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "VLM_HOME": home, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlmcli", *args], env=env, capture_output=True, cwd=tree)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--against", type=Path, help="another source tree to time in the same run")
    args = ap.parse_args()
    trees = {"this tree": ROOT} | ({"other": args.against} if args.against else {})
    print(f"start-up, medians of {args.runs} fresh processes (interleaved); {cpu_description()}")
    with tempfile.TemporaryDirectory() as home:
        for label, argv in COMMANDS.items():
            times: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(args.runs):  # interleaved, so other load falls on both alike
                for name, tree in trees.items():
                    times[name].append(run_once(tree, argv, home))
            cells = [f"{name} {statistics.median(t) * 1000:.0f} ms" for name, t in times.items()]
            print(f"  {label:26s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
