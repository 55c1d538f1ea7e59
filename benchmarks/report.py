"""One format for every benchmark's results: the block docs/performance.md holds, so a table is replaced whole.

    ### TITLE
    DATE, CPU (model, cores, ISA flags); `python benchmarks/bench_x.py ARGS`; NOTE

    | header | ... |
    |---|---|
    | row | ... |

Each benchmark builds its rows and calls print_table once per table; the output pastes over the
table of the same title in docs/performance.md.
"""

from __future__ import annotations

import datetime
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from machine import cpu_description

ROOT = Path(__file__).resolve().parent.parent


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed from the repository root: `python benchmarks/bench_x.py --flag value`."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        shown = str(script.relative_to(ROOT))
    except ValueError:
        shown = argv[0]
    return shlex.join(["python", shown, *argv[1:]])


def heading(title: str, note: str = "") -> str:
    """The two lines above a table: the title, then when, where and how it was measured."""
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    facts = [today, cpu_description(), f"`{command_line()}`"]
    if note:
        facts.append(note)
    return f"### {title}\n{'; '.join(facts)}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; cells are printed as given (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(
    title: str, header: Sequence[str], rows: Iterable[Sequence[object]], note: str = "", footer: str = ""
) -> None:
    """Print one results block (heading, blank line, table, optional footer line) to stdout."""
    print(heading(title, note))
    print()
    print(table(header, rows))
    if footer:
        print()
        print(footer)
    print(flush=True)
