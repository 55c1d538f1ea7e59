"""Commands: classify, embed (CLIP on ggml)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from vlmcli.cli.app import app, info, print_json, progress, stderr
from vlmcli.errors import EXIT_ERROR, EXIT_PARTIAL, EXIT_USAGE, VlmError
from vlmcli.images import DEFAULT_MAX_PIXELS
from vlmcli.tasks.classify import (
    Classification,
    classify_images,
    encode_labels,
    parse_labels,
    read_labels_file,
    unique_labels,
)
from vlmcli.tasks.embed import DEFAULT_IMAGE_BATCH, Embedding, ImageFailure, embed_images, embed_texts

ModelOpt = typer.Option(None, "--model", "-m", help="Store name (see `vlm models`), a CLIP .gguf file, or a folder holding one.")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores).")
BatchOpt = typer.Option(DEFAULT_IMAGE_BATCH, "--batch-size", "-b", min=1, help="Images encoded together.")
GpuOpt = typer.Option(0, "--n-gpu-layers", "-ngl", help="Any value other than 0 puts the whole CLIP model on the GPU.")
DeviceOpt = typer.Option(None, "--device", help="ggml device name (CPU, CUDA0, Vulkan0, ...).")
MaxPixelsOpt = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Refuse larger images (decompression-bomb guard).")
OfflineOpt = typer.Option(False, "--offline", help="Use only models already in the store (also HF_HUB_OFFLINE=1).")
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


def report_failure(failure: ImageFailure) -> None:
    stderr.print(f"vlm: error: {failure.error}", markup=False, highlight=False, soft_wrap=True)


def exit_for_failures(failed: int, total: int) -> None:
    if failed:
        raise typer.Exit(EXIT_PARTIAL if failed < total else EXIT_ERROR)


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
        table.add_row(str(rank), label, f"{score:.4f}")
    console.print(table)


@app.command()
def classify(
    images: List[Path] = typer.Argument(..., help="Image files (JPEG, PNG, WebP, GIF, BMP, TIFF)."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help='Comma-separated labels, e.g. "cat,dog,car".'),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="File with one label per line (# comments)."),
    templates: Optional[List[str]] = typer.Option(
        None, "--template", "-t",
        help='Prompt with {} for the label (default "a photo of a {}."); repeat to ensemble several.'),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Labels shown per image."),
    json_out: bool = typer.Option(False, "--json", help="JSON lines: {path, model, labels: [{label, score}]}."),
    model: Optional[str] = ModelOpt,
    threads: Optional[int] = ThreadsOpt,
    batch_size: int = BatchOpt,
    n_gpu_layers: int = GpuOpt,
    device: Optional[str] = DeviceOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Zero-shot classification: score each image against your labels (no training)."""
    if labels is None and labels_file is None:
        raise VlmError('give the labels: --labels "cat,dog,car" or --labels-file FILE', exit_code=EXIT_USAGE)
    wanted = parse_labels(labels) if labels is not None else []
    if labels_file is not None:
        wanted += read_labels_file(labels_file)
    wanted = unique_labels(wanted)
    if not wanted:
        raise VlmError("the label list is empty", labels_file, exit_code=EXIT_USAGE)

    clip = LoadedClip(model, offline, threads, n_gpu_layers, device, verbose)
    label_set = encode_labels(clip.model, wanted, templates)
    if verbose:
        info(f"vlm: {len(wanted)} labels x {len(label_set.templates)} template(s)")
        for prompt in label_set.truncated_prompts:
            info(f"vlm: note: prompt truncated to {clip.model.config.context_length} tokens: {prompt}")

    console = None if json_out else _stdout_console()
    failed = 0
    with progress(len(images), "classify") as bar:
        for result in classify_images(clip.model, [str(p) for p in images], label_set, top_k, batch_size, max_pixels):
            if isinstance(result, ImageFailure):
                failed += 1
                report_failure(result)
                if json_out:
                    print_json({"path": result.path, "model": clip.name, "error": result.message})
            elif json_out:
                print_json({"path": result.path, "model": clip.name,
                            "labels": [{"label": lab, "score": s} for lab, s in result.labels]})
            else:
                _print_table(console, result)
            if bar is not None:
                bar.advance(bar.task_ids[0])
    clip.model.close()
    exit_for_failures(failed, len(images))


def _read_text_file(path: Path) -> list[str]:
    """One text per line (blank lines skipped)."""
    try:
        return [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise VlmError("no such text file", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise VlmError(f"cannot read text file ({e})", path) from None


def _write_npy(out: Path, vectors: np.ndarray) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # np.save(path) would add ".npy" to other names
        np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))


@app.command()
def embed(
    images: Optional[List[Path]] = typer.Argument(None, help="Image files."),
    texts: Optional[List[str]] = typer.Option(None, "--text", help="A text to embed (repeatable)."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="File with one text per line."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Write an N x D float32 .npy here, plus OUT.jsonl lines {row, input, kind, model}; "
             "without it, JSON lines with the vectors go to stdout."),
    model: Optional[str] = ModelOpt,
    threads: Optional[int] = ThreadsOpt,
    batch_size: int = BatchOpt,
    n_gpu_layers: int = GpuOpt,
    device: Optional[str] = DeviceOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """CLIP embeddings (L2-normalised) of images and texts; rows: images first, then texts."""
    image_paths = [str(p) for p in images or []]
    all_texts = list(texts or [])
    if text_file is not None:
        all_texts += _read_text_file(text_file)
    if not image_paths and not all_texts:
        raise VlmError("nothing to embed: give image files, --text or --text-file", exit_code=EXIT_USAGE)
    if out is not None and out.suffix.lower() == ".jsonl":
        raise VlmError("--out is the .npy file (its .jsonl sidecar is written beside it)", out, exit_code=EXIT_USAGE)

    clip = LoadedClip(model, offline, threads, n_gpu_layers, device, verbose)
    rows: list[Embedding] = []
    failed = 0

    def emit(e: Embedding) -> None:
        row = len(rows)
        rows.append(e)
        if out is None:
            print_json({"row": row, "input": e.input, "kind": e.kind, "model": clip.name,
                        "embedding": [float(x) for x in e.vector]})

    with progress(len(image_paths), "embed") as bar:
        for result in embed_images(clip.model, image_paths, batch_size, max_pixels):
            if isinstance(result, ImageFailure):
                failed += 1
                report_failure(result)
            else:
                emit(result)
            if bar is not None:
                bar.advance(bar.task_ids[0])
    if all_texts:
        text_result = embed_texts(clip.model, all_texts)
        for e in text_result.as_embeddings():
            if e.truncated and verbose:
                info(f"vlm: note: text truncated to {clip.model.config.context_length} tokens: {e.input}")
            emit(e)
    clip.model.close()

    if out is not None and rows:
        _write_npy(out, np.stack([e.vector for e in rows]))
        sidecar = out.with_suffix(".jsonl")
        lines = [json.dumps({"row": i, "input": e.input, "kind": e.kind, "model": clip.name}, ensure_ascii=False)
                 for i, e in enumerate(rows)]
        sidecar.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        info(f"vlm: wrote {len(rows)} x {rows[0].vector.shape[0]} embeddings to {out} (rows described in {sidecar})")
    exit_for_failures(failed, len(image_paths) + len(all_texts))
