"""Commands: ask, caption (SmolVLM2 on llama.cpp)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from vlmcli.cli import batch as batch_cli
from vlmcli.cli.app import MaxPixelsOpt, OfflineOpt, ThreadsOpt, app, info, print_json, stderr, stderr_is_terminal
from vlmcli.engines.detail import validate as validate_detail
from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
from vlmcli.errors import VlmError
from vlmcli.tasks.ask import ask as ask_task
from vlmcli.tasks.batch import VlmTask, answers_text, caption_text
from vlmcli.tasks.caption import DEFAULT_CAPTION_MAX_TOKENS, DEFAULT_CAPTION_PROMPT

# Options shared by ask and caption (Typer has no option groups; these keep the two in step).
ModelOpt = typer.Option(None, "--model", "-m", help="Store name (see `vlm models`), a GGUF file, or a folder holding the model and its mmproj.")
MmprojOpt = typer.Option(None, "--mmproj", help="Vision projector GGUF (when --model is a GGUF file).")
TemperatureOpt = typer.Option(0.0, "--temperature", "-t", min=0.0, help="Sampling temperature; 0 = greedy (deterministic).")
TopPOpt = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold.")
SeedOpt = typer.Option(0, "--seed", help="Random seed for sampling.")
GpuOpt = typer.Option(0, "--n-gpu-layers", "-ngl", help="Layers to offload to the GPU (-1 = all).")
CtxOpt = typer.Option(4096, "--ctx", min=256, help="Context size in tokens.")
DetailOpt = typer.Option(None, "--detail", help="Image detail: low (one 512 px view), high (full tiling), auto (default, or the model's registry default).")
MaxTilesOpt = typer.Option(None, "--max-tiles", min=0, help="Cap on image tiles (0 = overview only); overrides --detail.")
JsonOpt = typer.Option(False, "--json", help="Print JSON records instead of text.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's own logs.")


def open_vlm(
    model: Optional[str],
    mmproj: Optional[str],
    offline: bool,
    threads: Optional[int],
    n_gpu_layers: int,
    ctx: int,
    detail: Optional[str],
    max_tiles: Optional[int],
    verbose: bool,
) -> VlmEngine:
    """Resolve --model (pulling a store model on first use) and load it."""
    from vlmcli.store.resolve import resolve_model

    validate_detail(detail or "auto", max_tiles)
    resolved = resolve_model(model, "vlm", mmproj=mmproj, offline=offline or None, notify=info)
    assert resolved.mmproj is not None
    detail = detail or resolved.detail or "auto"  # the option, else the registry's default for this model
    opts = EngineOptions(
        n_threads=threads, n_gpu_layers=n_gpu_layers, n_ctx=ctx, detail=detail, max_tiles=max_tiles, verbose=verbose
    )
    return VlmEngine(resolved.model, resolved.mmproj, opts)


@app.command()
@batch_cli.with_batch_options()
def ask(
    image: str = typer.Argument(..., help="Image file; or a folder, a glob, or - (paths on stdin) for batch mode."),
    prompts: Optional[List[str]] = typer.Argument(None, help="One or more questions; the image is encoded once for all. With --files-from every argument is a question."),
    model: Optional[str] = ModelOpt,
    mmproj: Optional[str] = MmprojOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate per answer."),
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    threads: Optional[int] = ThreadsOpt,
    n_gpu_layers: int = GpuOpt,
    ctx: int = CtxOpt,
    detail: Optional[str] = DetailOpt,
    max_tiles: Optional[int] = MaxTilesOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
    batch: batch_cli.BatchArgs = None,  # type: ignore[assignment]  (given by with_batch_options)
) -> None:
    """Ask SmolVLM2 about an image; the answer streams to stdout. Folders, globs and - give one JSONL record per image."""
    questions = list(prompts or [])
    inputs = [image]
    if batch.files_from:
        questions.insert(0, image)
        inputs = []
    if not questions:
        raise VlmError("give at least one question after the image", exit_code=2)
    args = batch.for_inputs(inputs, json=json_out)
    expansion = batch_cli.expand(args)
    if args.sidecar and len(questions) != 1:
        raise VlmError("--sidecar takes one question per image", exit_code=2)
    sink = None
    if not batch_cli.is_single(args, expansion):
        sink = batch_cli.make_sink(args, expansion, ("jsonl", "text"), text=answers_text)
    else:
        batch_cli.check_single_image(expansion.paths[0], max_pixels)
    engine = open_vlm(model, mmproj, offline, threads, n_gpu_layers, ctx, detail, max_tiles, verbose)
    gen = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if sink is None:
        _ask_streaming(engine, Path(expansion.paths[0]), questions, gen, json_out, max_pixels)
        return
    task = VlmTask(engine, "ask", questions, gen, max_pixels)
    batch_cli.run(task, args, expansion, sink, sidecar_text=answers_text)


def _ask_streaming(engine: VlmEngine, image: Path, prompts: list[str], gen: GenerationOptions, json_out: bool, max_pixels: int) -> None:
    """One image: answers stream to stdout as they are generated."""
    several = len(prompts) > 1

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def start(i: int) -> None:
        if several and not json_out:
            if i:
                sys.stdout.write("\n")
            stderr.print(Text(f"> {prompts[i]}", style="bold"))

    # The vision encoder can take many seconds before the first token: show it on a terminal.
    status = stderr.status("encoding the image") if stderr_is_terminal() and not json_out else None

    def encoding(done: int, total: int) -> None:
        if status is None:
            return
        if done == 0:
            status.start()
        status.update(f"encoding the image: {done}/{total} views")
        if done == total:
            status.stop()

    try:
        answers = ask_task(
            engine, image, prompts, gen, on_token=None if json_out else stream, on_answer_start=start,
            max_pixels=max_pixels, on_progress=encoding,
        )
    finally:
        if status is not None:
            status.stop()
    for a in answers:
        if json_out:
            print_json(a.to_record())
    if not json_out:
        sys.stdout.write("\n")
        sys.stdout.flush()


@app.command()
@batch_cli.with_batch_options()
def caption(
    images: Optional[List[str]] = typer.Argument(None, help="Image files, folders (recursive), globs (quoted: \"photos/**/*.jpg\"), or - for paths on stdin."),
    prompt: str = typer.Option(DEFAULT_CAPTION_PROMPT, "--prompt", "-p", help="The instruction given with each image."),
    model: Optional[str] = ModelOpt,
    mmproj: Optional[str] = MmprojOpt,
    max_tokens: int = typer.Option(DEFAULT_CAPTION_MAX_TOKENS, "--max-tokens", "-n", min=1),
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    threads: Optional[int] = ThreadsOpt,
    n_gpu_layers: int = GpuOpt,
    ctx: int = CtxOpt,
    detail: Optional[str] = DetailOpt,
    max_tiles: Optional[int] = MaxTilesOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
    batch: batch_cli.BatchArgs = None,  # type: ignore[assignment]  (given by with_batch_options)
) -> None:
    """Caption images: the caption of one image, `PATH<TAB>caption` for several named files, JSONL for folders, globs and lists."""
    if not images and not batch.files_from:
        raise VlmError("give image files, folders, globs, - or --files-from", exit_code=2)
    args = batch.for_inputs(list(images or []), json=json_out)
    expansion = batch_cli.expand(args)
    single = batch_cli.is_single(args, expansion)
    sink = batch_cli.make_sink(
        args, expansion, ("jsonl", "csv", "text"),
        text=caption_text, csv_columns=["caption"], csv_row=lambda r: {"caption": caption_text(r) if not r.get("error") else ""},
    )
    if single:
        batch_cli.check_single_image(expansion.paths[0], max_pixels)
    engine = open_vlm(model, mmproj, offline, threads, n_gpu_layers, ctx, detail, max_tiles, verbose)
    gen = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    task = VlmTask(engine, "caption", [prompt], gen, max_pixels)
    batch_cli.run(task, args, expansion, sink, sidecar_text=caption_text, single=single)
