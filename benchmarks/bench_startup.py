"""Start-up time of commands that run no model (`vlm --help`, `vlm models`, `vlm ask --help`, `vlm rm`, an
option error of `vlm pull`) against a bare `python -c "import typer, rich"`: the floor any Typer CLI pays.
Medians of fresh processes, run interleaved so other load falls on all alike; the ratio is the command's
median over the floor's. CPU time (user + system of the process) is shown beside wall time: on a busy
machine it moves less. Compare two source trees in one run with --against.

    python benchmarks/bench_startup.py                     # this tree
    python benchmarks/bench_startup.py --against /tmp/old  # and another checkout (git worktree add /tmp/old HEAD~5)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import print_table

ROOT = Path(__file__).resolve().parents[1]
FLOOR = 'python -c "import typer, rich"'
COMMANDS = {
    "vlm --help": ["--help"],
    "vlm models": ["models"],
    "vlm ask --help": ["ask", "--help"],
    "vlm rm (not installed)": ["rm", "no-such-model"],
    "vlm pull --from bad": ["pull", "smolvlm2-256m", "--from", "nowhere"],
}
# What Typer itself adds to the floor for any CLI: its rich help renderer (every --help) and, in releases
# that coerce values through pydantic, that coercion (every command given a value that is not a flag).
TYPER_PARTS = {
    "typer's help renderer": "typer.rich_utils",
    "typer's value coercion (pydantic)": "typer._adapters",
}


def run_once(argv: list[str], tree: Path, home: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree), "VLM_HOME": home, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # users run from cached bytecode, not from source each time
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, capture_output=True, cwd=tree)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9, help="fresh processes per command and tree (default 9)")
    ap.add_argument("--against", type=Path, help="another source tree to time in the same run")
    args = ap.parse_args()
    trees = {"this tree": ROOT} | ({"other": args.against.resolve()} if args.against else {})
    cases: list[tuple[str, list[str], Path]] = [(FLOOR, [sys.executable, "-c", "import typer, rich"], ROOT)]
    for label, module in TYPER_PARTS.items():
        if importlib.util.find_spec(module) is not None:
            cases.append((f"{label}: +import {module}", [sys.executable, "-c", f"import typer, rich, {module}"], ROOT))
    for label, words in COMMANDS.items():
        cases += [(f"{label} [{name}]", [sys.executable, "-m", "vlmcli", *words], tree) for name, tree in trees.items()]
    walls: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    cpus: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    with tempfile.TemporaryDirectory() as home:
        for _label, argv, tree in cases:  # once unmeasured: bytecode caches written, files in the page cache
            run_once(argv, tree, home)
        for _ in range(args.runs):
            for label, argv, tree in cases:
                wall, cpu = run_once(argv, tree, home)
                walls[label].append(wall)
                cpus[label].append(cpu)
    floor_wall, floor_cpu = statistics.median(walls[FLOOR]), statistics.median(cpus[FLOOR])
    rows = []
    for label, _, _ in cases:
        wall, cpu = statistics.median(walls[label]), statistics.median(cpus[label])
        shown = label.removesuffix(" [this tree]") if len(trees) == 1 else label
        rows.append(
            (shown, f"{wall * 1000:.0f}", f"{wall / floor_wall:.2f}x", f"{cpu * 1000:.0f}", f"{cpu / floor_cpu:.2f}x")
        )
    print_table(
        "Start-up of commands that load no model",
        ("command", "wall ms", "wall vs the floor", "CPU ms", "CPU vs the floor"),
        rows,
        note=f"medians of {args.runs} fresh processes; the floor is `{FLOOR}`",
        footer="Goal: every command at most 2.5x the floor.",
    )


if __name__ == "__main__":
    main()
