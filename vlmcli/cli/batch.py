"""Batch options and output wiring shared by caption, ask, classify and embed.

A command takes the options below through `@with_batch_options()` (Typer has no shared option
groups: the decorator adds them to the command's signature and hands them over as one `BatchArgs`),
expands the inputs with `expand`, loads its model once, and calls `run` with its task
(vlmcli.tasks) and how its records look as text / CSV. One named image runs the same way, as a
batch of one whose failure is a plain error.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional

import typer

from vlmcli.cli.app import info
from vlmcli.errors import EXIT_OK, EXIT_USAGE, VlmError

# The commands' modules import this one to declare their options; what runs a batch is imported
# when one runs, so `vlm --help` stays fast.
if TYPE_CHECKING:
    from vlmcli.tasks.inputs import Expansion
    from vlmcli.tasks.resume import Record
    from vlmcli.tasks.runner import BatchSummary, Task
    from vlmcli.tasks.sinks import Sink

OutOpt = typer.Option(None, "--out", "-o", help="Write records to this file (JSONL, .csv, or .npy for embed); rerunning with it skips images already done.")
FormatOpt = typer.Option(None, "--format", "-f", help="Output format: jsonl, csv (caption, classify), text, npy (embed). Default: from --out's extension, else jsonl for folders/globs/lists and text for named files.")
FilesFromOpt = typer.Option(None, "--files-from", help="Read image paths from this file, one per line ('-' = stdin).")
NullOpt = typer.Option(False, "-0", "--null", help="Paths on stdin / in --files-from are NUL-separated (find -print0).")
ExcludeOpt = typer.Option(None, "--exclude", help="Skip files and folders matching this glob (repeatable).")
HiddenOpt = typer.Option(False, "--include-hidden", help="Also take hidden files and folders from folders and globs.")
RedoOpt = typer.Option(False, "--redo", help="Process every image again, even if --out already has it.")
HashOpt = typer.Option(False, "--hash", help="Recognise images already done by content (SHA-256) instead of path, size and mtime.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress and no summary on stderr (failures are still reported).")
SidecarOpt = typer.Option(False, "--sidecar", help="Write IMAGE.txt next to each image (photo.jpg -> photo.txt); images that have one are skipped.")
OverwriteOpt = typer.Option(False, "--overwrite", help="With --sidecar: replace existing .txt files.")


# Parameter name -> (type, option), in the order --help lists them.
BATCH_OPTIONS: dict[str, tuple[Any, Any]] = {
    "out": (Optional[str], OutOpt),
    "format": (Optional[str], FormatOpt),
    "files_from": (Optional[List[str]], FilesFromOpt),
    "null": (bool, NullOpt),
    "exclude": (Optional[List[str]], ExcludeOpt),
    "include_hidden": (bool, HiddenOpt),
    "redo": (bool, RedoOpt),
    "use_hash": (bool, HashOpt),
    "quiet": (bool, QuietOpt),
    "sidecar": (bool, SidecarOpt),
    "overwrite": (bool, OverwriteOpt),
}


def with_batch_options(without: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the batch options (all but `without`); it receives them as `batch: BatchArgs`
    (with no inputs yet: the command adds its own arguments with `batch.for_inputs(...)`)."""
    names = [n for n in BATCH_OPTIONS if n not in without]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != "batch"]
        added = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=BATCH_OPTIONS[n][1], annotation=BATCH_OPTIONS[n][0])
            for n in names
        ]

        @functools.wraps(command)
        def with_batch(**kwargs: Any) -> Any:
            batch = batch_args([], **{n: kwargs.pop(n) for n in names})
            return command(batch=batch, **kwargs)

        with_batch.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
        return with_batch

    return decorate


@dataclass
class BatchArgs:
    inputs: list[str]
    out: Optional[str] = None
    format: Optional[str] = None
    files_from: list[str] = field(default_factory=list)
    null: bool = False
    exclude: list[str] = field(default_factory=list)
    include_hidden: bool = False
    redo: bool = False
    use_hash: bool = False
    quiet: bool = False
    sidecar: bool = False
    overwrite: bool = False
    json: bool = False  # the older --json flag: JSONL on stdout

    def for_inputs(self, inputs: List[str], **changes: Any) -> BatchArgs:
        return replace(self, inputs=list(inputs), **changes)


def expand(args: BatchArgs) -> Expansion:
    """The image paths to process; warnings go to stderr, no images at all is an error."""
    from vlmcli.tasks.inputs import InputSpec, expand_inputs

    spec = InputSpec(list(args.inputs), list(args.files_from or []), args.null, list(args.exclude or []), args.include_hidden)
    expansion = expand_inputs(spec, stdin=sys.stdin.buffer if sys.stdin is not None else None)
    for w in expansion.warnings:
        info(f"vlm: warning: {w}")
    if not expansion.paths:
        sources = [*args.inputs, *(args.files_from or [])]
        where = sources[0] if len(sources) == 1 else None
        raise VlmError("no images found (check the paths, patterns and --exclude)", where)
    return expansion


def check_single_image(path: str, max_pixels: int | None) -> None:
    """A single named image is decoded before the model loads, so a bad file fails at once."""
    from vlmcli.images import load_image

    load_image(path, max_pixels=max_pixels)


def is_single(args: BatchArgs, expansion: Expansion) -> bool:
    """One named image and no batch output: the command's plain single-image behaviour."""
    return (
        not expansion.batch_like
        and len(expansion.paths) == 1
        and not args.out
        and not args.sidecar
        and (args.format in (None, "text", "table"))
    )


def output_format(args: BatchArgs, expansion: Expansion, allowed: tuple[str, ...]) -> str:
    """--format, else from --out's extension, else JSONL for batch inputs and the command's own
    display (the first of text / table in `allowed`) for named files."""
    fmt = (args.format or "").lower() or None
    if fmt is None:
        display = next((f for f in allowed if f in ("text", "table")), "jsonl")
        if args.json:
            fmt = "jsonl"
        elif args.out and args.out != "-":
            suffix = Path(args.out).suffix.lower()
            fmt = {".csv": "csv", ".npy": "npy", ".txt": "text"}.get(suffix, "jsonl")
        else:
            fmt = "jsonl" if expansion.batch_like else display
    if fmt not in allowed:
        raise VlmError(f"--format {fmt} is not available here (choose from {', '.join(allowed)})", exit_code=EXIT_USAGE)
    if fmt in ("text", "table") and args.out and args.out != "-":
        raise VlmError(f"--format {fmt} goes to stdout only; use jsonl or csv with --out", exit_code=EXIT_USAGE)
    if fmt == "npy" and (not args.out or args.out == "-"):
        raise VlmError("--format npy needs --out FILE.npy", exit_code=EXIT_USAGE)
    return fmt


def make_sink(
    args: BatchArgs,
    expansion: Expansion,
    allowed: tuple[str, ...],
    text: Callable[[Record], str] | None = None,
    csv_columns: list[str] | None = None,
    csv_row: Callable[[Record], dict[str, Any]] | None = None,
    table: Callable[[Record], None] | None = None,
    number_rows: bool = False,
) -> Sink:
    """The sink for the chosen format: JSONL / CSV / .npy files (resumable) or stdout."""
    from vlmcli.tasks.npy import NpySink
    from vlmcli.tasks.sinks import CallbackSink, CsvSink, JsonlSink, NullSink, TextSink

    out = Path(args.out) if args.out and args.out != "-" else None
    if args.sidecar and out is None and args.format is None and not args.json:
        return NullSink()  # the sidecars are the output
    fmt = output_format(args, expansion, allowed)
    if fmt == "jsonl":
        return JsonlSink(out, number_rows=number_rows and out is None)
    if fmt == "csv":
        assert csv_columns is not None and csv_row is not None
        return CsvSink(out, csv_columns, csv_row)
    if fmt == "npy":
        assert out is not None
        return NpySink(out)
    if fmt == "table":
        assert table is not None
        return CallbackSink(table)
    assert text is not None
    return TextSink(text, with_path=not is_single(args, expansion))


def execute(
    task: Task,
    args: BatchArgs,
    inputs: list[str],
    sink: Sink,
    sidecar_text: Callable[[Record], str] | None = None,
    single: bool = False,
) -> BatchSummary:
    """Run one batch (no summary, no exit): for commands that run several, e.g. embed's images then texts."""
    from vlmcli.cli.progress import BatchProgress
    from vlmcli.tasks.runner import BatchOptions, Observer, run_batch
    from vlmcli.tasks.sidecars import Sidecars

    sidecars = Sidecars(overwrite=args.overwrite) if args.sidecar else None
    if sidecars is not None and sidecar_text is None:
        raise VlmError(f"--sidecar is not available for {task.name}", exit_code=EXIT_USAGE)
    options = BatchOptions(redo=args.redo, use_hash=args.use_hash, sidecars=sidecars, sidecar_text=sidecar_text)
    # One named image: no progress; its failure becomes the command's error (see conclude).
    observer = Observer() if single else BatchProgress(quiet=args.quiet)
    return run_batch(task, inputs, sink, options, observer)


def conclude(name: str, summary: BatchSummary, args: BatchArgs, single: bool = False) -> None:
    """The summary line, then exit with the batch's status (a single image's failure is a plain error)."""
    from vlmcli.cli.progress import BatchProgress
    from vlmcli.tasks.runner import exit_code

    if single and summary.errors:
        path, error = summary.errors[0]
        if error.path is None:
            error.path = path
        raise error
    if not args.quiet and not single:
        BatchProgress.summary_line(name, summary)
    code = exit_code(summary)
    if code != EXIT_OK:
        raise typer.Exit(code)


def run(
    task: Task,
    args: BatchArgs,
    expansion: Expansion,
    sink: Sink,
    sidecar_text: Callable[[Record], str] | None = None,
    single: bool = False,
) -> None:
    """Run the batch, print the summary, and exit with the batch's status."""
    summary = execute(task, args, expansion.paths, sink, sidecar_text, single)
    conclude(task.name, summary, args, single)


def batch_args(
    inputs: List[str],
    out: Optional[str] = None,
    format: Optional[str] = None,
    files_from: Optional[List[str]] = None,
    null: bool = False,
    exclude: Optional[List[str]] = None,
    include_hidden: bool = False,
    redo: bool = False,
    use_hash: bool = False,
    quiet: bool = False,
    sidecar: bool = False,
    overwrite: bool = False,
    json: bool = False,
) -> BatchArgs:
    return BatchArgs(
        list(inputs), out, format, list(files_from or []), null, list(exclude or []), include_hidden, redo, use_hash,
        quiet, sidecar, overwrite, json,
    )
