"""Batch options and output wiring shared by caption, ask, classify and embed.

A command takes the options below through `@with_batch_options()` (Typer has no shared option
groups: the decorator adds them to the command's signature and hands them over as one `BatchArgs`),
expands the inputs with `expand`, loads its model once, and calls `run` with its task
(vlmcli.tasks) and how its records look as text / CSV. One named image runs the same way, as a
batch of one whose failure is a plain error.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import typer

from vlmcli.cli.app import fill_bare_option, info
from vlmcli.errors import EXIT_OK, EXIT_USAGE, VlmError, debugging

# The commands' modules import this one to declare their options; what runs a batch is imported
# when one runs, so `vlm --help` stays fast.
if TYPE_CHECKING:
    from vlmcli.tasks.inputs import Expansion
    from vlmcli.tasks.models import ModelSpec
    from vlmcli.tasks.ray_batch import RayOptions
    from vlmcli.tasks.resume import Record
    from vlmcli.tasks.runner import BatchSummary, Executor
    from vlmcli.tasks.sinks import Sink
    from vlmcli.tasks.task import Task

OutOpt = typer.Option(
    None,
    "--out",
    "-o",
    help="Write records to this file (JSONL, .csv, or .npy for embed); rerunning with it skips images already done.",
)
FormatOpt = typer.Option(
    None,
    "--format",
    "-f",
    help="Output format: jsonl, csv (caption, classify), text, npy (embed). Default: from --out's extension, "
    "else jsonl for folders/globs/lists and text for named files.",
)
FilesFromOpt = typer.Option(None, "--files-from", help="Read image paths from this file, one per line ('-' = stdin).")
NullOpt = typer.Option(False, "-0", "--null", help="Paths on stdin / in --files-from are NUL-separated (find -print0).")
ExcludeOpt = typer.Option(None, "--exclude", help="Skip files and folders matching this glob (repeatable).")
HiddenOpt = typer.Option(False, "--include-hidden", help="Also take hidden files and folders from folders and globs.")
RedoOpt = typer.Option(False, "--redo", help="Process every image again, even if --out already has it.")
HashOpt = typer.Option(
    False, "--hash", help="Recognise images already done by content (SHA-256) instead of path, size and mtime."
)
QuietOpt = typer.Option(
    False, "--quiet", "-q", help="No progress and no summary on stderr (failures are still reported)."
)
SidecarOpt = typer.Option(
    None,
    "--sidecar",
    metavar="[txt|xmp]",
    help="Write a sidecar next to each image: photo.txt (alone or txt), or photo.xmp (xmp: the caption as "
    "dc:description, a schema's string lists as dc:subject keywords). Images that have one are skipped.",
)
OverwriteOpt = typer.Option(
    False, "--overwrite", help="With --sidecar: replace existing .txt files; merge into existing .xmp files."
)
# Batch mode on a Ray cluster (tasks/ray_batch.py); --ray alone starts a local cluster.
RayOpt = typer.Option(
    None,
    "--ray",
    metavar="[ADDRESS]",
    help="Run on a Ray cluster: auto (the running one), HOST:PORT, ray://HOST:PORT; alone: a local cluster. "
    "Needs the ray extra: pip install 'vlmcli\\[ray]'.",
)
RayWorkersOpt = typer.Option(
    None,
    "--ray-workers",
    min=1,
    help="With --ray: workers (actors), each loading the model once. "
    "Default: as many as the cluster's CPUs (or GPUs) hold.",
)
RayCpusOpt = typer.Option(
    None,
    "--ray-cpus",
    min=0.1,
    help="With --ray: CPUs (and threads) per worker. Default: min(4, a node's CPUs), 1 with --ray-gpus.",
)
RayGpusOpt = typer.Option(0.0, "--ray-gpus", min=0.0, help="With --ray: GPUs per worker.")
RayShipOpt = typer.Option(
    False, "--ray-ship-files", help="With --ray: send each image's bytes to the workers (no shared storage needed)."
)


# Parameter name -> (type, option), in the order --help lists them.
BATCH_OPTIONS: dict[str, tuple[Any, Any]] = {
    "out": (str | None, OutOpt),
    "format": (str | None, FormatOpt),
    "files_from": (list[str] | None, FilesFromOpt),
    "null": (bool, NullOpt),
    "exclude": (list[str] | None, ExcludeOpt),
    "include_hidden": (bool, HiddenOpt),
    "redo": (bool, RedoOpt),
    "use_hash": (bool, HashOpt),
    "quiet": (bool, QuietOpt),
    "sidecar": (str | None, SidecarOpt),
    "overwrite": (bool, OverwriteOpt),
    "ray": (str | None, RayOpt),
    "ray_workers": (int | None, RayWorkersOpt),
    "ray_cpus": (float | None, RayCpusOpt),
    "ray_gpus": (float, RayGpusOpt),
    "ray_ship_files": (bool, RayShipOpt),
}


# Commands that take only the Ray options (eval: its own --out, --redo, --quiet).
RAY_ONLY = tuple(n for n in BATCH_OPTIONS if not n.startswith("ray"))


def ray_flag(args: list[str]) -> list[str]:
    """`--ray` followed by no address (nothing, an option or an input) means a local cluster."""
    return fill_bare_option(args, "--ray", _is_address, "--ray=local")


def sidecar_flag(args: list[str]) -> list[str]:
    """`--sidecar` followed by no form (txt, xmp) means txt."""
    return fill_bare_option(args, "--sidecar", lambda w: w in SIDECAR_FORMS, "--sidecar=txt")


SIDECAR_FORMS = ("txt", "xmp")


def _is_address(word: str) -> bool:
    return word in ("auto", "local") or re.fullmatch(r"(ray://)?[\w.\-\[\]]*:\d+", word) is not None


def with_batch_options(without: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the batch options (all but `without`); it receives them as `batch: BatchArgs`
    (with no inputs yet: the command adds its own arguments with `batch.for_inputs(...)`)."""
    names = [n for n in BATCH_OPTIONS if n not in without]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != "batch"]
        added = [
            inspect.Parameter(
                n, inspect.Parameter.KEYWORD_ONLY, default=BATCH_OPTIONS[n][1], annotation=BATCH_OPTIONS[n][0]
            )
            for n in names
        ]

        @functools.wraps(command)
        def with_batch(**kwargs: Any) -> Any:
            batch = batch_args([], **{n: kwargs.pop(n) for n in names})
            return command(batch=batch, **kwargs)

        cast(Any, with_batch).__signature__ = signature.replace(parameters=own + added)  # what Typer reads
        return with_batch

    return decorate


@dataclass
class BatchArgs:
    inputs: list[str]
    out: str | None = None
    format: str | None = None
    files_from: list[str] = field(default_factory=list)
    null: bool = False
    exclude: list[str] = field(default_factory=list)
    include_hidden: bool = False
    redo: bool = False
    use_hash: bool = False
    quiet: bool = False
    sidecar: str | None = None  # txt | xmp
    overwrite: bool = False
    json: bool = False  # the older --json flag: JSONL on stdout
    ray: str | None = None  # --ray: None = run here; "local", "auto", an address
    ray_workers: int | None = None
    ray_cpus: float | None = None
    ray_gpus: float = 0.0
    ray_ship_files: bool = False

    def for_inputs(self, inputs: list[str], **changes: Any) -> BatchArgs:
        return replace(self, inputs=list(inputs), **changes)


def expand(args: BatchArgs, videos: bool = False) -> Expansion:
    """The image paths to process (and videos: ask, caption); warnings go to stderr, no images at all is an error."""
    from vlmcli.tasks.inputs import InputSpec, expand_inputs

    spec = InputSpec(
        list(args.inputs), list(args.files_from or []), args.null, list(args.exclude or []), args.include_hidden, videos
    )
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
    work: Task | Executor,
    args: BatchArgs,
    inputs: list[str],
    sink: Sink,
    sidecar_text: Callable[[Record], str] | None = None,
    single: bool = False,
) -> BatchSummary:
    """Run one batch (no summary, no exit): for commands that run several, e.g. embed's images then
    texts. `work` is a task (its model here) or an executor (`on_ray`'s: the model on Ray workers)."""
    from vlmcli.cli.progress import BatchProgress
    from vlmcli.tasks.runner import BatchOptions, LocalExecutor, Observer
    from vlmcli.tasks.sidecars import Sidecars
    from vlmcli.tasks.task import Task

    executor = LocalExecutor(work) if isinstance(work, Task) else work
    sidecars = Sidecars(overwrite=args.overwrite, form=args.sidecar) if args.sidecar else None
    if sidecars is not None and sidecar_text is None:
        raise VlmError(f"--sidecar is not available for {executor.name}", exit_code=EXIT_USAGE)
    options = BatchOptions(redo=args.redo, use_hash=args.use_hash, sidecars=sidecars, sidecar_text=sidecar_text)
    # One named image: no progress; its failure becomes the command's error (see conclude).
    observer = Observer() if single else BatchProgress(quiet=args.quiet)
    return executor.run(inputs, sink, options, observer)


@contextlib.contextmanager
def on_ray(
    args: BatchArgs, name: str, build: Callable[..., Task], spec: ModelSpec, build_args: tuple[Any, ...] = ()
) -> Iterator[Executor]:
    """With --ray: a pool of Ray workers, each building its task as `build(spec, *build_args)` (the
    function the command calls to build it here); yields the executor to pass to `execute` / `run`."""
    from vlmcli.tasks.execution import open_executor
    from vlmcli.tasks.task import TaskRecipe

    options = ray_options(args, args.quiet)
    assert options is not None
    with open_executor(TaskRecipe(name, build, spec, tuple(build_args)), options) as executor:
        yield executor


def ray_options(args: BatchArgs, quiet: bool) -> RayOptions | None:
    """The RayOptions of --ray and its companions; None without --ray."""
    if not args.ray:
        return None
    from vlmcli.tasks.ray_batch import RayOptions

    return RayOptions(
        address=args.ray,
        workers=args.ray_workers,
        cpus=args.ray_cpus,
        gpus=args.ray_gpus,
        ship_files=args.ray_ship_files,
        worker_logs=debugging(),
        notify=None if quiet else info,
    )


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
    work: Task | Executor,
    args: BatchArgs,
    expansion: Expansion,
    sink: Sink,
    sidecar_text: Callable[[Record], str] | None = None,
    single: bool = False,
) -> None:
    """Run the batch, print the summary, and exit with the batch's status."""
    summary = execute(work, args, expansion.paths, sink, sidecar_text, single)
    conclude(work.name, summary, args, single)


def batch_args(
    inputs: list[str],
    out: str | None = None,
    format: str | None = None,
    files_from: list[str] | None = None,
    null: bool = False,
    exclude: list[str] | None = None,
    include_hidden: bool = False,
    redo: bool = False,
    use_hash: bool = False,
    quiet: bool = False,
    sidecar: str | bool | None = None,
    overwrite: bool = False,
    json: bool = False,
    ray: str | None = None,
    ray_workers: int | None = None,
    ray_cpus: float | None = None,
    ray_gpus: float = 0.0,
    ray_ship_files: bool = False,
) -> BatchArgs:
    if sidecar is True:
        sidecar = "txt"
    if sidecar is not None and sidecar is not False and sidecar not in SIDECAR_FORMS:
        raise VlmError(f"--sidecar {sidecar}: choose {' or '.join(SIDECAR_FORMS)}", exit_code=EXIT_USAGE)
    if ray is not None:
        from vlmcli.tasks.ray_batch import check_address, import_ray

        ray = check_address(ray) or "local"
        import_ray()  # not installed: one line saying how, before any work
    else:
        given = [
            f
            for f, v in (
                ("--ray-workers", ray_workers),
                ("--ray-cpus", ray_cpus),
                ("--ray-gpus", ray_gpus or None),
                ("--ray-ship-files", ray_ship_files or None),
            )
            if v is not None
        ]
        if given:
            raise VlmError(f"{given[0]} goes with --ray", exit_code=EXIT_USAGE)
    return BatchArgs(
        list(inputs),
        out,
        format,
        list(files_from or []),
        null,
        list(exclude or []),
        include_hidden,
        redo,
        use_hash,
        quiet,
        sidecar if isinstance(sidecar, str) else None,
        overwrite,
        json,
        ray,
        ray_workers,
        ray_cpus,
        ray_gpus,
        ray_ship_files,
    )
