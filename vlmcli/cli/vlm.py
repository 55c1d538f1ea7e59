"""Commands: ask, caption (SmolVLM2 on llama.cpp)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from vlmcli.cli.app import app, info, print_json, stderr
from vlmcli.engines.detail import validate as validate_detail
from vlmcli.engines.llama import EngineOptions, GenerationOptions, VlmEngine
from vlmcli.errors import EXIT_ERROR, EXIT_PARTIAL, VlmError
from vlmcli.images import DEFAULT_MAX_PIXELS
from vlmcli.tasks.ask import ask as ask_task
from vlmcli.tasks.caption import DEFAULT_CAPTION_MAX_TOKENS, DEFAULT_CAPTION_PROMPT, caption as caption_task

# Options shared by ask and caption (Typer has no option groups; these keep the two in step).
ModelOpt = typer.Option(None, "--model", "-m", help="Store name (see `vlm models`), a GGUF file, or a folder holding the model and its mmproj.")
MmprojOpt = typer.Option(None, "--mmproj", help="Vision projector GGUF (when --model is a GGUF file).")
TemperatureOpt = typer.Option(0.0, "--temperature", "-t", min=0.0, help="Sampling temperature; 0 = greedy (deterministic).")
TopPOpt = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold.")
SeedOpt = typer.Option(0, "--seed", help="Random seed for sampling.")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores).")
GpuOpt = typer.Option(0, "--n-gpu-layers", "-ngl", help="Layers to offload to the GPU (-1 = all).")
CtxOpt = typer.Option(4096, "--ctx", min=256, help="Context size in tokens.")
DetailOpt = typer.Option("auto", "--detail", help="Image detail: low (one 512 px view), high (full tiling), auto.")
MaxTilesOpt = typer.Option(None, "--max-tiles", min=0, help="Cap on image tiles (0 = overview only); overrides --detail.")
MaxPixelsOpt = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Refuse larger images (decompression-bomb guard).")
OfflineOpt = typer.Option(False, "--offline", help="Use only models already in the store (also HF_HUB_OFFLINE=1).")
JsonOpt = typer.Option(False, "--json", help="Print JSON records instead of text.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's own logs.")


def open_vlm(
    model: Optional[str],
    mmproj: Optional[str],
    offline: bool,
    threads: Optional[int],
    n_gpu_layers: int,
    ctx: int,
    detail: str,
    max_tiles: Optional[int],
    verbose: bool,
) -> VlmEngine:
    """Resolve --model (pulling a store model on first use) and load it."""
    from vlmcli.store.resolve import resolve_model

    validate_detail(detail, max_tiles)
    resolved = resolve_model(model, "vlm", mmproj=mmproj, offline=offline or None, notify=info)
    assert resolved.mmproj is not None
    opts = EngineOptions(
        n_threads=threads, n_gpu_layers=n_gpu_layers, n_ctx=ctx, detail=detail, max_tiles=max_tiles, verbose=verbose
    )
    return VlmEngine(resolved.model, resolved.mmproj, opts)


@app.command()
def ask(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, WebP, GIF, BMP, TIFF)."),
    prompts: List[str] = typer.Argument(..., help="One or more questions; the image is encoded once for all."),
    model: Optional[str] = ModelOpt,
    mmproj: Optional[str] = MmprojOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate per answer."),
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    threads: Optional[int] = ThreadsOpt,
    n_gpu_layers: int = GpuOpt,
    ctx: int = CtxOpt,
    detail: str = DetailOpt,
    max_tiles: Optional[int] = MaxTilesOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Ask SmolVLM2 about an image; the answer streams to stdout."""
    engine = open_vlm(model, mmproj, offline, threads, n_gpu_layers, ctx, detail, max_tiles, verbose)
    gen = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    several = len(prompts) > 1

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def start(i: int) -> None:
        if several and not json_out:
            if i:
                sys.stdout.write("\n")
            stderr.print(f"[bold]> {prompts[i]}[/bold]")

    answers = ask_task(
        engine, image, prompts, gen, on_token=None if json_out else stream, on_answer_start=start, max_pixels=max_pixels
    )
    for a in answers:
        if json_out:
            print_json(a.to_record())
    if not json_out:
        sys.stdout.write("\n")
        sys.stdout.flush()


@app.command()
def caption(
    images: List[Path] = typer.Argument(..., help="Image files."),
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
    detail: str = DetailOpt,
    max_tiles: Optional[int] = MaxTilesOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Caption images: one line per image (`PATH<TAB>caption` when there are several), or JSONL."""
    engine = open_vlm(model, mmproj, offline, threads, n_gpu_layers, ctx, detail, max_tiles, verbose)
    gen = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    failed = 0
    for path, result in caption_task(engine, images, prompt, gen, max_pixels=max_pixels):
        if isinstance(result, VlmError):
            failed += 1
            stderr.print(f"vlm: error: {result}", markup=False, highlight=False, soft_wrap=True)
            if json_out:
                print_json({"path": path, "error": result.message})
            continue
        if json_out:
            print_json(result.to_record())
        else:
            text = " ".join(result.generation.text.split())
            sys.stdout.write(f"{path}\t{text}\n" if len(images) > 1 else f"{text}\n")
            sys.stdout.flush()
    if failed:
        raise typer.Exit(EXIT_PARTIAL if failed < len(images) else EXIT_ERROR)
