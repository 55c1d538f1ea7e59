"""Commands: classify, embed (CLIP on ggml)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlmcli.cli import batch as batch_cli
from vlmcli.cli.app import MaxPixelsOpt, OfflineOpt, ThreadsOpt, app, info
from vlmcli.errors import EXIT_USAGE, VlmError
from vlmcli.tasks.batch import BatchSummary, ClipImageTask, ClipTextTask, classify_csv_row
from vlmcli.tasks.classify import (
    Classification,
    encode_labels,
    parse_labels,
    read_labels_file,
    unique_labels,
)
from vlmcli.tasks.embed import DEFAULT_IMAGE_BATCH
from vlmcli.tasks.records import JsonlSink, NpySink, Sink

ModelOpt = typer.Option(None, "--model", "-m", help="Store name (see `vlm models`), a CLIP .gguf file, or a folder holding one.")
BatchOpt = typer.Option(DEFAULT_IMAGE_BATCH, "--batch-size", "-b", min=1, help="Images encoded together.")
GpuOpt = typer.Option(0, "--n-gpu-layers", "-ngl", help="Any value other than 0 puts the whole CLIP model on the GPU.")
DeviceOpt = typer.Option(None, "--device", help="ggml device name (CPU, CUDA0, Vulkan0, ...).")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Say more on stderr (model, truncated texts).")


class LoadedClip:
    """A resolved and loaded CLIP model plus the name records carry."""

    def __init__(self, spec: Optional[str], offline: bool, threads: Optional[int], n_gpu_layers: int,
                 device: Optional[str], verbose: bool) -> None:
        from vlmcli.engines.clip import ClipModel

        path, self.name = resolve_clip(spec, offline)
        # CLIP goes to the GPU whole or not at all; -1 ("all layers", as for llama.cpp) means the GPU too.
        gpu_layers = 0 if n_gpu_layers == 0 else max(1, n_gpu_layers)
        self.model = ClipModel.load(path, n_threads=threads, n_gpu_layers=gpu_layers, device=device)
        if verbose:
            c = self.model.config
            info(f"vlm: model {self.name}: {path} ({c.file_type}, {c.image_size} px, {c.projection_dim}-d)")


def resolve_clip(spec: Optional[str], offline: bool) -> tuple[Path, str]:
    """--model -> (GGUF path, name for the records) through the model store.

    A .gguf file path goes straight to ClipModel.load, which validates it (require_kind) itself:
    going through resolve_model too would parse the large header twice.
    """
    if spec and spec.lower().endswith(".gguf") and Path(spec).expanduser().is_file():
        path = Path(spec).expanduser()
        return path, path.stem
    try:
        from vlmcli.store.resolve import resolve_model
    except ImportError:  # the store is optional for a plain path
        if not spec:
            raise VlmError("no model given: pass --model FILE.gguf", exit_code=EXIT_USAGE) from None
        return Path(spec), Path(spec).stem
    resolved = resolve_model(spec, "clip", offline=offline or None, notify=info)
    return Path(resolved.model), resolved.name


def _stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def _print_table(console: Console, result: Classification) -> None:
    # The path on its own line, never wrapped (a table title would wrap long paths at the table width).
    console.print(result.path, markup=False, highlight=False, soft_wrap=True)
    table = Table(show_edge=True)
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("score", justify="right")
    for rank, (label, score) in enumerate(result.labels, 1):
        table.add_row(str(rank), Text(label), f"{score:.4f}")  # Text: labels are not rich markup
    console.print(table)


def _table_printer() -> Any:
    console = _stdout_console()

    def emit(record: dict[str, Any]) -> None:
        labels = [(x["label"], float(x["score"])) for x in record.get("labels", [])]
        _print_table(console, Classification(record["path"], labels))

    return emit


@app.command()
@batch_cli.with_batch_options(without=("sidecar", "overwrite"))
def classify(
    images: Optional[List[str]] = typer.Argument(None, help="Image files, folders (recursive), globs (quoted), or - for paths on stdin."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help='Comma-separated labels, e.g. "cat,dog,car".'),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="File with one label per line (# comments)."),
    templates: Optional[List[str]] = typer.Option(
        None, "--template", "-t",
        help='Prompt with {} for the label (default "a photo of a {}."); repeat to ensemble several.'),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Labels shown per image."),
    json_out: bool = typer.Option(False, "--json", help="JSON lines: {path, model, label, score, labels: [{label, score}], ...}."),
    model: Optional[str] = ModelOpt,
    threads: Optional[int] = ThreadsOpt,
    batch_size: int = BatchOpt,
    n_gpu_layers: int = GpuOpt,
    device: Optional[str] = DeviceOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    verbose: bool = VerboseOpt,
    batch: batch_cli.BatchArgs = None,  # type: ignore[assignment]  (given by with_batch_options)
) -> None:
    """Zero-shot classification: score each image against your labels (no training). Tables for named files, JSONL for folders, globs and lists."""
    if labels is None and labels_file is None:
        raise VlmError('give the labels: --labels "cat,dog,car" or --labels-file FILE', exit_code=EXIT_USAGE)
    wanted = parse_labels(labels) if labels is not None else []
    if labels_file is not None:
        wanted += read_labels_file(labels_file)
    wanted = unique_labels(wanted)
    if not wanted:
        raise VlmError("the label list is empty", labels_file, exit_code=EXIT_USAGE)
    if not images and not batch.files_from:
        raise VlmError("give image files, folders, globs, - or --files-from", exit_code=EXIT_USAGE)
    args = batch.for_inputs(list(images or []), json=json_out)
    expansion = batch_cli.expand(args)
    single = batch_cli.is_single(args, expansion)
    sink = batch_cli.make_sink(
        args, expansion, ("table", "jsonl", "csv"),
        csv_columns=["label", "score", "top"], csv_row=classify_csv_row, table=_table_printer(),
    )
    if single:
        batch_cli.check_single_image(expansion.paths[0], max_pixels)

    clip = LoadedClip(model, offline, threads, n_gpu_layers, device, verbose)
    label_set = encode_labels(clip.model, wanted, templates)
    if verbose:
        info(f"vlm: {len(wanted)} labels x {len(label_set.templates)} template(s)")
        for prompt in label_set.truncated_prompts:
            info(f"vlm: note: prompt truncated to {clip.model.config.context_length} tokens: {prompt}")
    task = ClipImageTask(clip.model, "classify", batch_size, max_pixels, label_set, top_k, model_name=clip.name)
    try:
        summary = batch_cli.execute(task, args, expansion.paths, sink, single=single)
    finally:
        clip.model.close()
    batch_cli.conclude("classify", summary, args, single)


def _read_text_file(path: Path) -> list[str]:
    """One text per line (blank lines skipped)."""
    try:
        return [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise VlmError("no such text file", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise VlmError(f"cannot read text file ({e})", path) from None


@app.command()
@batch_cli.with_batch_options(without=("out", "format", "sidecar", "overwrite"))  # --out is embed's own
def embed(
    images: Optional[List[str]] = typer.Argument(None, help="Image files, folders (recursive), globs (quoted), or - for paths on stdin."),
    texts: Optional[List[str]] = typer.Option(None, "--text", help="A text to embed (repeatable)."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="File with one text per line."),
    out: Optional[str] = typer.Option(
        None, "--out", "-o",
        help="Write an N x D float32 .npy here, plus OUT.jsonl records {row, input, kind, path, model, ...} "
             "(row null for a failed image); rerunning with it appends only what is missing. "
             "Without it, JSON lines with the vectors go to stdout."),
    model: Optional[str] = ModelOpt,
    threads: Optional[int] = ThreadsOpt,
    batch_size: int = BatchOpt,
    n_gpu_layers: int = GpuOpt,
    device: Optional[str] = DeviceOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    verbose: bool = VerboseOpt,
    batch: batch_cli.BatchArgs = None,  # type: ignore[assignment]  (given by with_batch_options)
) -> None:
    """CLIP embeddings (L2-normalised) of images and texts; rows: images first, then texts."""
    all_texts = list(texts or [])
    if text_file is not None:
        all_texts += _read_text_file(text_file)
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

    def sink() -> Sink:  # one per run_batch: a file sink reopens (and re-checks) the files
        return NpySink(Path(out)) if out and out != "-" else stdout_sink

    stdout_sink = JsonlSink(None, number_rows=True)
    clip = LoadedClip(model, offline, threads, n_gpu_layers, device, verbose)
    image_task = ClipImageTask(clip.model, "embed", batch_size, max_pixels, model_name=clip.name)
    summary = BatchSummary()
    try:
        if paths:
            summary = batch_cli.execute(image_task, args, paths, sink(), single=single)
        if all_texts and not summary.interrupted:
            text_task = ClipTextTask(image_task)
            text_args = batch_cli.BatchArgs(**{**args.__dict__, "redo": args.redo and not paths})
            texts_summary = batch_cli.execute(text_task, text_args, all_texts, sink(), single=single)
            summary = batch_cli.merge_summaries(summary, texts_summary)
            if verbose:
                for t in text_task.truncated:
                    info(f"vlm: note: text truncated to {clip.model.config.context_length} tokens: {t}")
    finally:
        clip.model.close()
    if out and out != "-" and not args.quiet and summary.done:
        info(f"vlm: embeddings in {out} (rows described in {Path(out).with_suffix('.jsonl')})")
    batch_cli.conclude("embed", summary, args, single)
