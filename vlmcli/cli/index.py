"""Commands: index, search, dupes (the photo index: vlmcli/index, tasks/index.py)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vlmcli.cli import batch as batch_cli
from vlmcli.cli.app import (
    DeviceOpt,
    GpuOpt,
    ImageBatchOpt,
    MaxPixelsOpt,
    OfflineOpt,
    ThreadsOpt,
    app,
    info,
    print_json,
)
from vlmcli.cli.clip import ModelOpt, VerboseOpt
from vlmcli.defaults import DEFAULT_MAX_PIXELS
from vlmcli.errors import EXIT_USAGE, VlmError

if TYPE_CHECKING:
    from vlmcli.index.db import IndexDB, ModelRef
    from vlmcli.index.search import Searcher
    from vlmcli.tasks.runner import BatchSummary, Executor

DbOpt = typer.Option(
    None, "--db", help="The index file (SQLite). Default: STORE/index/photos.sqlite (see `vlm doctor` for the store)."
)


def _db(db: Path | None, create: bool) -> IndexDB:
    """`vlm index` (create) writes and may wait longer for another process's lock; search and dupes read."""
    from vlmcli.index.db import READ_WAIT_S, WRITE_WAIT_S, IndexDB
    from vlmcli.tasks.index import default_db_path

    return IndexDB(db or default_db_path(), create=create, wait_s=WRITE_WAIT_S if create else READ_WAIT_S)


def _expand(args: batch_cli.BatchArgs) -> list[str]:
    """The image paths under the inputs; none at all is fine here (everything there was deleted)."""
    from vlmcli.tasks.inputs import InputSpec, expand_inputs

    spec = InputSpec(list(args.inputs), list(args.files_from), args.null, list(args.exclude), args.include_hidden)
    expansion = expand_inputs(spec, stdin=sys.stdin.buffer if sys.stdin is not None else None)
    for w in expansion.warnings:
        info(f"vlm: warning: {w}")
    return expansion.paths


@app.command("index")
@batch_cli.with_batch_options(without=("out", "format", "use_hash", "sidecar", "overwrite"))
def index_command(
    paths: list[str] | None = typer.Argument(
        None, help="Folders (recursive), image files, globs (quoted), or - for paths on stdin."
    ),
    db: Path | None = DbOpt,
    model: str | None = ModelOpt,
    threads: int | None = ThreadsOpt,
    batch_size: int = ImageBatchOpt,
    n_gpu_layers: int = GpuOpt,
    device: str | None = DeviceOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    verbose: bool = VerboseOpt,
    captions: bool = typer.Option(
        False, "--captions", help="Also caption each image with SmolVLM2, searchable as full text (slow: seconds each)."
    ),
    caption_model: str | None = typer.Option(
        None, "--caption-model", help="With --captions: the SmolVLM2 model (store name, GGUF or folder)."
    ),
    detail: str | None = typer.Option(None, "--detail", help="With --captions: image detail, low, high or auto."),
    *,
    batch: batch_cli.BatchArgs,  # given by with_batch_options, not an option of its own
) -> None:
    """Add images to the search index (CLIP vectors in one SQLite file), incrementally: new and changed
    files are embedded, moved ones recognised by content, deleted ones dropped. Safe to interrupt."""
    from vlmcli.cli.clip import _embed_task, _spec
    from vlmcli.tasks.index import IndexSink, clip_model_file, model_ref, plan_index
    from vlmcli.tasks.runner import BatchSummary, LocalExecutor

    if not paths and not batch.files_from:
        raise VlmError("give folders or image files to index", exit_code=EXIT_USAGE)
    if not captions and (caption_model is not None or detail is not None):
        raise VlmError("--caption-model and --detail go with --captions", exit_code=EXIT_USAGE)
    args = batch.for_inputs(list(paths or []))
    found = _expand(args)
    spec = _spec(model, offline, threads, n_gpu_layers, device)
    with _db(db, create=True) as index, contextlib.ExitStack() as stack:
        name, model_path = clip_model_file(spec, notify=info)
        ref = model_ref(index, name, model_path)
        folders = [p for p in args.inputs if os.path.isdir(p)]
        named = [p for p in args.inputs if os.path.isfile(p)]
        plan = plan_index(index, found, folders, named, ref, redo=args.redo)
        if not args.quiet:
            info(f"vlm: index {index.path}: {len(found)} images: {plan.line()}")
        summary = BatchSummary()
        if plan.embed:
            executor: Executor
            build = (batch_size, max_pixels, verbose)
            if args.ray:
                executor = stack.enter_context(batch_cli.on_ray(args, "embed", _embed_task, spec, build))
            else:
                task = _embed_task(spec, *build)
                stack.callback(task.close)
                executor = LocalExecutor(task)
            sink = IndexSink(index, ref, plan.copies)
            # Keyed by content: the sink files each vector under its SHA-256, hashed in the decode threads.
            summary = batch_cli.execute(executor, args.for_inputs(args.inputs, use_hash=True), plan.embed, sink)
        index.prune()
        if not summary.interrupted:
            from vlmcli.index import ann

            built = ann.refresh(index, ref.hash)  # large collections: an approximate index for fast queries
            if built and not args.quiet:
                info(f"vlm: approximate vector index of {built} images rebuilt")
            elif not ann.available() and not args.quiet and ann.count_rows(index, ref.hash) >= ann.MIN_ROWS:
                info("vlm: note: searches of this many images are faster with pip install 'vlmcli[index]' (faiss)")
        if captions and not summary.interrupted:
            summary = summary + _caption(index, args, found, caption_model, detail, offline, threads, n_gpu_layers)
    summary.total += plan.unchanged + plan.relinked
    summary.skipped += plan.unchanged + plan.relinked
    batch_cli.conclude("index", summary, args)


def _caption(
    index: IndexDB,
    args: batch_cli.BatchArgs,
    paths: list[str],
    model: str | None,
    detail: str | None,
    offline: bool,
    threads: int | None,
    n_gpu_layers: int,
) -> BatchSummary:
    """Caption the indexed contents among `paths` that have no caption of this model and detail yet,
    through the runner (`vlm caption`'s task and builder; --ray: the same pool)."""
    from vlmcli.cli.vlm import _caption_task
    from vlmcli.cli.vlm import _spec as vlm_spec
    from vlmcli.defaults import DEFAULT_N_CTX
    from vlmcli.engines.detail import validate as validate_detail
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.store.resolve import resolve_model
    from vlmcli.tasks.caption import DEFAULT_CAPTION_MAX_TOKENS, DEFAULT_CAPTION_PROMPT
    from vlmcli.tasks.index import CaptionSink, contents_to_caption
    from vlmcli.tasks.runner import BatchSummary, LocalExecutor

    validate_detail(detail or "auto", None)
    spec = vlm_spec(model, None, offline, threads, n_gpu_layers, DEFAULT_N_CTX, detail, None)
    name = resolve_model(model, "vlm", offline=spec.offline, notify=info).name
    key = detail or "auto"
    todo = contents_to_caption(index, paths, name, key)
    if not todo:
        return BatchSummary()
    if not args.quiet:
        info(f"vlm: captioning {len(todo)} images with {name} (detail {key})")
    gen = GenerationOptions(max_tokens=DEFAULT_CAPTION_MAX_TOKENS)
    build = (gen, DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_PIXELS, 1, "logprob")
    sink = CaptionSink(index, name, key)
    run_args = args.for_inputs(args.inputs, use_hash=True)
    if args.ray:
        with batch_cli.on_ray(args, "caption", _caption_task, spec, build) as executor:
            return batch_cli.execute(executor, run_args, todo, sink)
    task = _caption_task(spec, *build)
    try:
        return batch_cli.execute(LocalExecutor(task), run_args, todo, sink)
    finally:
        task.close()


def _time_ns(value: str | None, flag: str) -> int | None:
    from vlmcli.index.search import date_ns

    if value is None:
        return None
    try:
        return date_ns(value)
    except ValueError:
        raise VlmError(f"{flag}: not a date (YYYY-MM-DD, or YYYY-MM-DDTHH:MM)", exit_code=EXIT_USAGE) from None


def _searcher(
    index: IndexDB, model: str | None, offline: bool, threads: int | None, n_gpu_layers: int, device: str | None
) -> tuple[Searcher, contextlib.ExitStack]:
    """The index with a loaded CLIP model for queries: --model, else the one model the index holds."""
    from vlmcli.cli.clip import _open, _spec
    from vlmcli.index.search import Searcher
    from vlmcli.tasks.index import ClipQueryEncoder, check_model_in_index, choose_model, model_ref

    wanted, _ = choose_model(index, model)
    opened = _open(_spec(wanted, offline, threads, n_gpu_layers, device), verbose=False)
    stack = contextlib.ExitStack()
    stack.callback(opened.close)
    try:
        ref = model_ref(index, opened.name, opened.path)
        check_model_in_index(index, ref)
    except BaseException:
        stack.close()
        raise
    return Searcher(index, ClipQueryEncoder(opened.engine, ref)), stack


@app.command()
def search(
    query: list[str] | None = typer.Argument(
        None,
        help='What to look for: words, or terms joined by + and - ("dog" + "beach" - "night"), a weight as '
        "2*dog; an image file's path is an image term.",
    ),
    images: list[str] | None = typer.Option(None, "--image", "-i", help="Find images like this one (repeatable)."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many results."),
    json_out: bool = typer.Option(False, "--json", help="JSON lines: {path, score, model}."),
    paths_only: bool = typer.Option(False, "--paths", help="Only the paths, one per line (for `| xargs open`)."),
    folders: list[str] | None = typer.Option(None, "--in", help="Only images under this folder (repeatable)."),
    since: str | None = typer.Option(None, "--since", help="Only files modified on or after this date (YYYY-MM-DD)."),
    until: str | None = typer.Option(None, "--until", help="Only files modified before this date (YYYY-MM-DD)."),
    web: bool = typer.Option(False, "--web", help="Serve a search page on 127.0.0.1 instead (Ctrl-C stops it)."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="With --web: the port (0: any free one)."),
    db: Path | None = DbOpt,
    model: str | None = ModelOpt,
    threads: int | None = ThreadsOpt,
    n_gpu_layers: int = GpuOpt,
    device: str | None = DeviceOpt,
    offline: bool = OfflineOpt,
) -> None:
    """Search the index by text, by image, or both: images ranked by CLIP similarity (and caption text
    where the index has captions)."""
    from vlmcli.index.search import Filters, parse_query

    if json_out and paths_only:
        raise VlmError("--json and --paths: choose one", exit_code=EXIT_USAGE)
    filters = Filters(list(folders or []), _time_ns(since, "--since"), _time_ns(until, "--until"))
    terms = parse_query(list(query or []), list(images or [])) if (query or images or not web) else []
    with _db(db, create=False) as index:
        searcher, stack = _searcher(index, model, offline, threads, n_gpu_layers, device)
        with stack:
            if web:
                from vlmcli.index.web import serve_page

                serve_page(searcher, port=port, notify=info)
                return
            hits = searcher.with_captions(searcher.search(terms, limit, filters))
    if not hits:
        info("vlm: no images in the index match (check --in, --since and --until)")
    for hit in hits:
        if json_out:
            print_json(hit.record())
        elif paths_only:
            sys.stdout.write(hit.path + "\n")
        else:
            sys.stdout.write(f"{hit.score:.4f}  {hit.path}\n")
    sys.stdout.flush()


def _dupes_model(index: IndexDB, model: str | None, offline: bool) -> ModelRef:
    """The model whose vectors are compared: --model (resolved, not loaded), else the index's only one."""
    from vlmcli.cli.clip import _spec
    from vlmcli.tasks.index import check_model_in_index, choose_model, clip_model_file, model_ref

    wanted, known = choose_model(index, model)
    if known is not None:
        return known
    name, path = clip_model_file(_spec(wanted, offline, None, 0, None), notify=info)
    ref = model_ref(index, name, path)
    check_model_in_index(index, ref)
    return ref


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@app.command()
def dupes(
    paths: list[str] | None = typer.Argument(None, help="Only images under these folders (default: the whole index)."),
    threshold: float = typer.Option(
        0.95, "--threshold", min=0.0, max=1.0, help="How alike two images must be (cosine of their CLIP vectors)."
    ),
    json_out: bool = typer.Option(False, "--json", help="JSON lines, one per group: {group, keeper, files, pairs}."),
    db: Path | None = DbOpt,
    model: str | None = ModelOpt,
    offline: bool = OfflineOpt,
) -> None:
    """Groups of near-duplicate images in the index (copies, resized or recompressed versions, bursts),
    each with a suggested keeper (the largest). Nothing is deleted."""
    from vlmcli.index.dupes import find_duplicates

    with _db(db, create=False) as index:
        ref = _dupes_model(index, model, offline)
        for p in paths or []:
            if not os.path.isdir(p):
                raise VlmError("not a folder", p, exit_code=EXIT_USAGE)
        vectors = index.vectors(ref.hash, [os.path.abspath(p) for p in paths or []])
    groups = find_duplicates(vectors, threshold)
    for number, group in enumerate(groups, 1):
        if json_out:
            print_json(group.record(number))
            continue
        best = [0.0] * len(group.files)
        for pair in group.pairs:
            best[pair.a], best[pair.b] = max(best[pair.a], pair.score), max(best[pair.b], pair.score)
        sys.stdout.write(f"group {number}: {len(group.files)} images\n")
        for i, (f, s) in enumerate(zip(group.files, group.sizes)):
            mark = "keep" if i == group.keeper else "    "
            dims = f"{s[0]}x{s[1]}" if s else "?"
            sys.stdout.write(f"  {mark}  {best[i]:.4f}  {dims:>11}  {_human_bytes(f.size):>9}  {f.path}\n")
    sys.stdout.flush()
    if not json_out:
        groups_word = "group" if len(groups) == 1 else "groups"
        info(f"vlm: {len(groups)} {groups_word} of near-duplicates among {len(vectors)} images (threshold {threshold})")
