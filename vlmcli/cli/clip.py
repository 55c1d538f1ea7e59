"""Commands: classify, embed (CLIP on ggml)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from vlmcli.cli import batch as batch_cli
from vlmcli.cli.app import DeviceOpt, GpuOpt, ImageBatchOpt, MaxPixelsOpt, OfflineOpt, ThreadsOpt, app, info
from vlmcli.errors import EXIT_USAGE, VlmError

if TYPE_CHECKING:
    from vlmcli.tasks.classify import ClassifyTask
    from vlmcli.tasks.embed import EmbedImagesTask
    from vlmcli.tasks.models import ModelSpec, OpenedModel
    from vlmcli.tasks.runner import Executor

ModelOpt = typer.Option(
    None, "--model", "-m", help="Store name (see `vlm models`), a CLIP .gguf file, or a folder holding one."
)
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Say more on stderr (model, truncated texts).")


def _spec(model: str | None, offline: bool, threads: int | None, n_gpu_layers: int, device: str | None) -> ModelSpec:
    from vlmcli.tasks.models import ModelSpec

    return ModelSpec(model, offline=offline or None, n_threads=threads, n_gpu_layers=n_gpu_layers, device=device)


def _open(spec: ModelSpec, verbose: bool) -> OpenedModel:
    from vlmcli.tasks.models import open_model

    opened = open_model(spec, "clip", notify=info)
    for note in opened.engine.config.notes:  # e.g. a clip.cpp file without merges or logit scale
        info(f"vlm: note: {opened.path}: {note}")
    if verbose:
        c = opened.engine.config
        info(f"vlm: model {opened.name}: {opened.path} ({c.file_type}, {c.image_size} px, {c.projection_dim}-d)")
    return opened


# The model opened and the task built: here, and on each Ray worker with --ray (module-level, so
# the workers import them by name).
def _classify_task(
    spec: ModelSpec,
    wanted: list[str],
    templates: list[str] | None,
    top_k: int,
    batch_size: int,
    max_pixels: int,
    verbose: bool,
) -> ClassifyTask:
    from vlmcli.tasks.classify import ClassifyTask, encode_labels

    opened = _open(spec, verbose)
    clip = opened.engine
    label_set = encode_labels(clip, wanted, templates)
    if verbose:
        info(f"vlm: {len(wanted)} labels x {len(label_set.templates)} template(s)")
        for prompt in label_set.truncated_prompts:
            info(f"vlm: note: prompt truncated to {clip.config.context_length} tokens: {prompt}")
    return ClassifyTask(clip, label_set, top_k, batch_size=batch_size, max_pixels=max_pixels, model_name=opened.name)


def _embed_task(spec: ModelSpec, batch_size: int, max_pixels: int, verbose: bool) -> EmbedImagesTask:
    from vlmcli.tasks.embed import EmbedImagesTask

    opened = _open(spec, verbose)
    return EmbedImagesTask(opened.engine, batch_size, max_pixels, model_name=opened.name)


def _print_table(console: Any, record: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    # The path on its own line, never wrapped (a table title would wrap long paths at the table width).
    console.print(record["path"], markup=False, highlight=False, soft_wrap=True)
    table = Table(show_edge=True)
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("score", justify="right")
    for rank, x in enumerate(record.get("labels", []), 1):
        table.add_row(str(rank), Text(x["label"]), f"{float(x['score']):.4f}")  # Text: labels are not rich markup
    console.print(table)


def _table_printer() -> Any:
    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    return lambda record: _print_table(console, record)


@app.command(
    help="Zero-shot classification: score each image against your labels (no training). "
    "Tables for named files, JSONL for folders, globs and lists."
)
@batch_cli.with_batch_options(without=("sidecar", "overwrite"))
def classify(
    images: list[str] | None = typer.Argument(
        None, help="Image files, folders (recursive), globs (quoted), or - for paths on stdin."
    ),
    labels: str | None = typer.Option(None, "--labels", "-l", help='Comma-separated labels, e.g. "cat,dog,car".'),
    labels_file: Path | None = typer.Option(None, "--labels-file", help="File with one label per line (# comments)."),
    templates: list[str] | None = typer.Option(
        None,
        "--template",
        help='Prompt with {} for the label (default "a photo of a {}."); repeat to ensemble several.',
    ),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Labels shown per image."),
    json_out: bool = typer.Option(
        False, "--json", help="JSON lines: {path, model, label, score, labels: [{label, score}], ...}."
    ),
    model: str | None = ModelOpt,
    threads: int | None = ThreadsOpt,
    batch_size: int = ImageBatchOpt,
    n_gpu_layers: int = GpuOpt,
    device: str | None = DeviceOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    verbose: bool = VerboseOpt,
    *,
    batch: batch_cli.BatchArgs,  # given by with_batch_options, not an option of its own
) -> None:
    """Zero-shot classification (the command's help is above: one line, as `vlm --help` lists it)."""
    from vlmcli.tasks.classify import check_templates, classify_csv_row, parse_labels, read_labels_file, unique_labels

    if labels is None and labels_file is None:
        raise VlmError('give the labels: --labels "cat,dog,car" or --labels-file FILE', exit_code=EXIT_USAGE)
    wanted = parse_labels(labels) if labels is not None else []
    if labels_file is not None:
        wanted += read_labels_file(labels_file)
    wanted = unique_labels(wanted)
    if not wanted:
        raise VlmError("the label list is empty", labels_file, exit_code=EXIT_USAGE)
    check_templates(templates)
    if not images and not batch.files_from:
        raise VlmError("give image files, folders, globs, - or --files-from", exit_code=EXIT_USAGE)
    args = batch.for_inputs(list(images or []), json=json_out)
    expansion = batch_cli.expand(args)
    single = batch_cli.is_single(args, expansion)
    sink = batch_cli.make_sink(
        args,
        expansion,
        ("table", "jsonl", "csv"),
        csv_columns=["label", "score", "top"],
        csv_row=classify_csv_row,
        table=_table_printer(),
    )
    if single:
        batch_cli.check_single_image(expansion.paths[0], max_pixels)
    spec = _spec(model, offline, threads, n_gpu_layers, device)
    build = (wanted, templates, top_k, batch_size, max_pixels, verbose)
    if args.ray:
        with batch_cli.on_ray(args, "classify", _classify_task, spec, build) as remote:
            summary = batch_cli.execute(remote, args, expansion.paths, sink, single=single)
    else:
        task = _classify_task(spec, *build)
        try:
            summary = batch_cli.execute(task, args, expansion.paths, sink, single=single)
        finally:
            task.model.close()
    batch_cli.conclude("classify", summary, args, single)


@app.command()
@batch_cli.with_batch_options(without=("out", "format", "sidecar", "overwrite"))  # --out is embed's own
def embed(
    images: list[str] | None = typer.Argument(
        None, help="Image files, folders (recursive), globs (quoted), or - for paths on stdin."
    ),
    texts: list[str] | None = typer.Option(None, "--text", help="A text to embed (repeatable)."),
    text_file: Path | None = typer.Option(None, "--text-file", help="File with one text per line."),
    out: str | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Write an N x D float32 .npy here, plus OUT.jsonl records {row, input, kind, path, model, ...} "
        "(row null for a failed image); rerunning with it appends only what is missing. "
        "Without it, JSON lines with the vectors go to stdout.",
    ),
    model: str | None = ModelOpt,
    threads: int | None = ThreadsOpt,
    batch_size: int = ImageBatchOpt,
    n_gpu_layers: int = GpuOpt,
    device: str | None = DeviceOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    verbose: bool = VerboseOpt,
    *,
    batch: batch_cli.BatchArgs,  # given by with_batch_options, not an option of its own
) -> None:
    """CLIP embeddings (L2-normalised) of images and texts; rows: images first, then texts."""
    from vlmcli.tasks.embed import EmbedTextsTask
    from vlmcli.tasks.npy import NpySink
    from vlmcli.tasks.runner import BatchSummary, LocalExecutor
    from vlmcli.tasks.sinks import JsonlSink, Sink

    all_texts = list(texts or [])
    if text_file is not None:
        from vlmcli.files import read_lines

        all_texts += read_lines(text_file, "text", comments=False, strip=False)  # texts may start with a hash
    if not images and not batch.files_from and not all_texts:
        raise VlmError("nothing to embed: give image files, --text or --text-file", exit_code=EXIT_USAGE)
    if out is not None and Path(out).suffix.lower() == ".jsonl":
        raise VlmError("--out is the .npy file (its .jsonl sidecar is written beside it)", out, exit_code=EXIT_USAGE)
    args = batch.for_inputs(list(images or []), out=out, format="npy" if out and out != "-" else None)
    paths: list[str] = []
    single = not images and not args.files_from  # texts only: no batch summary
    if images or args.files_from:
        expansion = batch_cli.expand(args)
        paths = expansion.paths
        single = not all_texts and batch_cli.is_single(args, expansion)
        if single:
            batch_cli.check_single_image(paths[0], max_pixels)

    stdout_sink = JsonlSink(None, number_rows=True)

    def sink() -> Sink:  # one per run: a file sink reopens (and re-checks) the files
        return NpySink(Path(out)) if out and out != "-" else stdout_sink

    spec = _spec(model, offline, threads, n_gpu_layers, device)
    with contextlib.ExitStack() as stack:
        image_task: EmbedImagesTask | None = None  # the model here (without --ray)
        if args.ray:
            on_images: Executor = stack.enter_context(
                batch_cli.on_ray(args, "embed", _embed_task, spec, (batch_size, max_pixels, verbose))
            )
        else:
            image_task = _embed_task(spec, batch_size, max_pixels, verbose)
            stack.callback(image_task.close)
            on_images = LocalExecutor(image_task)
        summary = BatchSummary()
        if paths:
            summary = batch_cli.execute(on_images, args, paths, sink(), single=single)
        if all_texts and not summary.interrupted:
            text_task = EmbedTextsTask(image_task) if image_task is not None else None
            text_args = args.for_inputs(args.inputs, redo=args.redo and not paths)
            on_texts = text_task if text_task is not None else on_images.derive(EmbedTextsTask)
            summary = summary + batch_cli.execute(on_texts, text_args, all_texts, sink(), single=single)
            if verbose and text_task is not None:
                for t in text_task.truncated:
                    info(f"vlm: note: text truncated to {text_task.model.config.context_length} tokens: {t}")
    if out and out != "-" and not args.quiet and summary.done:
        info(f"vlm: embeddings in {out} (rows described in {Path(out).with_suffix('.jsonl')})")
    batch_cli.conclude("embed", summary, args, single)
