"""Commands: ask, caption (SmolVLM2 on llama.cpp)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from vlmcli.cli import batch as batch_cli
from vlmcli.cli import media_options as media_cli
from vlmcli.cli.app import (
    CtxOpt,
    GpuOpt,
    MaxPixelsOpt,
    NoCacheOpt,
    OfflineOpt,
    ThreadsOpt,
    app,
    info,
    show_notes,
    stderr,
    stderr_is_terminal,
)
from vlmcli.defaults import DEFAULT_CAPTION_MAX_TOKENS, DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_TOKENS
from vlmcli.errors import EXIT_USAGE, InvalidOption, VlmError

if TYPE_CHECKING:
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.tasks.ask import AskTask
    from vlmcli.tasks.best_of import ClipJudge
    from vlmcli.tasks.caption import CaptionTask
    from vlmcli.tasks.models import ModelSpec
    from vlmcli.tasks.structured import Structure
    from vlmcli.tasks.video import Sampling

# Options shared by ask and caption (Typer has no option groups; these keep the two in step).
# Short flags as llama.cpp's: -m model, -n tokens, -c context, -s seed, -ngl GPU layers.
ModelOpt = typer.Option(
    None,
    "--model",
    "-m",
    help="Store name (see `vlm models`), a GGUF file, or a folder holding the model and its mmproj.",
)
MmprojOpt = typer.Option(None, "--mmproj", help="Vision projector GGUF (when --model is a GGUF file).")
TemperatureOpt = typer.Option(
    None,
    "--temperature",
    "--temp",
    min=0.0,
    help="Sampling temperature; 0 = greedy (deterministic). Default 0, or 0.7 with --best-of.",
)
TopPOpt = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold.")
SeedOpt = typer.Option(0, "--seed", "-s", help="Random seed for sampling.")
MaxTokensOpt = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-n", min=1, help="Most tokens to generate per answer.")
DetailOpt = typer.Option(
    None,
    "--detail",
    help="Image detail: low (one 512 px view), high (full tiling), auto (default, or the model's registry default).",
)
MaxTilesOpt = typer.Option(
    None, "--max-tiles", min=0, help="Cap on image tiles (0 = overview only); overrides --detail."
)
JsonOpt = typer.Option(False, "--json", help="Print JSON records instead of text.")
VerboseOpt = typer.Option(
    False,
    "--verbose",
    "-v",
    help="Show every --best-of candidate, and notes such as a damaged cache entry encoded again "
    "(--debug: llama.cpp's own logs too).",
)
BestOfOpt = typer.Option(
    1, "--best-of", min=1, help="Sample N candidates (one image encoding, decoded together) and keep the best."
)
SelectOpt = typer.Option(
    "logprob",
    "--select",
    help="How --best-of chooses: logprob (mean token log-probability), vote (most frequent short answer), "
    "clip (CLIP image-text similarity).",
)
ClipModelOpt = typer.Option(
    None, "--clip-model", help="CLIP model judging --select clip (default: the store's default CLIP)."
)
JsonSchemaOpt = typer.Option(
    None,
    "--json-schema",
    metavar="FILE|JSON",
    help="Answers follow this JSON schema (a file, or the schema inline); records carry the parsed object "
    'as "json". See docs/structured-output.md.',
)
GrammarOpt = typer.Option(
    None, "--grammar", metavar="FILE", help="Answers follow this GBNF grammar (llama.cpp's grammar format)."
)


def _spec(
    model: str | None,
    mmproj: str | None,
    offline: bool,
    threads: int | None,
    n_gpu_layers: int,
    ctx: int,
    detail: str | None,
    max_tiles: int | None,
    n_best: int = 1,
    no_cache: bool = False,
) -> ModelSpec:
    from vlmcli.tasks.models import ModelSpec

    return ModelSpec(
        model,
        mmproj,
        offline or None,
        threads,
        n_gpu_layers,
        ctx,
        detail,
        max_tiles,
        n_sequences=n_best,
        cache=not no_cache,
    )


# The model opened and the task built: here, and on each Ray worker with --ray (module-level, so
# the workers import them by name).
def _ask_task(
    spec: ModelSpec,
    questions: list[str],
    gen: GenerationOptions,
    max_pixels: int,
    n_best: int,
    select: str,
    structure: Structure | None = None,
    sampling: Sampling | None = None,
    judge: ClipJudge | None = None,
) -> AskTask:
    from vlmcli.tasks.ask import AskTask
    from vlmcli.tasks.models import open_model

    engine = open_model(spec, "vlm", notify=info).engine
    task = AskTask(engine, questions, gen, max_pixels, n_best, select, judge, structure)
    return task.with_sampling(sampling) if sampling is not None else task


def _caption_task(
    spec: ModelSpec,
    gen: GenerationOptions,
    prompt: str,
    max_pixels: int,
    n_best: int,
    select: str,
    structure: Structure | None = None,
    sampling: Sampling | None = None,
    judge: ClipJudge | None = None,
) -> CaptionTask:
    from vlmcli.tasks.caption import CaptionTask
    from vlmcli.tasks.models import open_model

    engine = open_model(spec, "vlm", notify=info).engine
    task = CaptionTask(engine, gen, prompt, max_pixels, n_best, select, judge, structure)
    return task.with_sampling(sampling) if sampling is not None else task


def structure_of(json_schema: str | None, grammar: str | None) -> Structure | None:
    """--json-schema / --grammar checked and converted before any model loads."""
    if json_schema is None and grammar is None:
        return None
    from vlmcli.tasks.structured import load

    return load(json_schema, grammar)


def _check_ray(args: batch_cli.BatchArgs, n_best: int, select: str) -> None:
    if args.ray and n_best > 1 and select == "clip":
        raise InvalidOption("select", "clip does not run on Ray workers yet; use logprob or vote with --ray")


def _best_of(
    n_best: int,
    select: str,
    clip_model: str | None,
    offline: bool,
    threads: int | None,
    temperature: float | None,
    task_name: str,
) -> tuple[float, ClipJudge | None]:
    """Check the --best-of options; the temperature to sample with and, for --select clip, the CLIP judge."""
    from vlmcli.tasks import best_of

    best_of.check(n_best, select)
    if n_best == 1:
        return best_of.temperature_for(1, temperature), None
    if temperature == 0:
        info(f"vlm: warning: --best-of {n_best} with --temperature 0 samples the same greedy answer {n_best} times")
    if select == "vote" and task_name == "caption":
        info(
            "vlm: warning: --select vote is meant for short answers; captions rarely agree word for word "
            "(try logprob or clip)"
        )
    judge = None
    if select == "clip":
        from vlmcli.tasks.models import ModelSpec, open_model

        opened = open_model(ModelSpec(clip_model, offline=offline or None, n_threads=threads), "clip", notify=info)
        judge = best_of.ClipJudge(opened.engine, opened.name)
    return best_of.temperature_for(n_best, temperature), judge


def _print_choices(task: AskTask, verbose: bool) -> Callable[[dict], None]:
    """One image with --best-of: the chosen answers on stdout; every candidate on stderr with -v."""

    def emit(record: dict) -> None:
        answers = record.get("answers") or [{"prompt": task.prompts[0], "answer": record.get("caption", ""), **record}]
        for a in answers:
            if verbose and a.get("candidates"):
                info(
                    f"> {a['prompt']}  (--select {a['select']}: candidate {a['chosen'] + 1} of {len(a['candidates'])})"
                )
                for i, c in enumerate(a["candidates"]):
                    mark = "*" if i == a["chosen"] else " "
                    info(f"{mark} {i + 1}. score {c['score']:.4f}, mean log-prob {c['mean_logprob']:.4f}: {c['text']}")
            sys.stdout.write(a["answer"] + "\n")
        sys.stdout.flush()

    return emit


@app.command(
    help="Ask SmolVLM2 about an image or video (several with -i, none with --no-image); the answer streams to "
    "stdout. Folders, globs and - give one JSONL record per file."
)
@batch_cli.with_batch_options()
def ask(
    image: str | None = typer.Argument(
        None, help="Image or video file; or a folder, a glob, or - (paths on stdin) for batch mode."
    ),
    prompts: list[str] | None = typer.Argument(
        None,
        help="One or more questions; the image is encoded once for all. "
        "With --files-from, -i or --no-image every argument is a question.",
    ),
    images: list[str] | None = media_cli.ImagesOpt,
    no_image: bool = media_cli.NoImageOpt,
    fps: float | None = media_cli.FpsOpt,
    max_frames: int | None = media_cli.MaxFramesOpt,
    model: str | None = ModelOpt,
    mmproj: str | None = MmprojOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: float | None = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    threads: int | None = ThreadsOpt,
    n_gpu_layers: int = GpuOpt,
    ctx: int = CtxOpt,
    detail: str | None = DetailOpt,
    max_tiles: int | None = MaxTilesOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    no_cache: bool = NoCacheOpt,
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
    n_best: int = BestOfOpt,
    select: str = SelectOpt,
    clip_model: str | None = ClipModelOpt,
    json_schema: str | None = JsonSchemaOpt,
    grammar: str | None = GrammarOpt,
    *,
    batch: batch_cli.BatchArgs,  # given by with_batch_options, not an option of its own
) -> None:
    """Ask SmolVLM2 about an image (the command's help is above: one line, as `vlm --help` lists it)."""
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.tasks.ask import answers_text

    questions = list(prompts or [])
    inputs = [image] if image is not None else []
    together = bool(images) or no_image
    if images and no_image:
        raise VlmError("--image and --no-image exclude each other", exit_code=EXIT_USAGE)
    if batch.files_from or together:
        questions = inputs + questions
        inputs = []
    if not questions:
        raise VlmError("give at least one question after the image", exit_code=EXIT_USAGE)
    args = batch.for_inputs(inputs, json=json_out)
    if together and (args.files_from or args.sidecar or args.ray):
        raise VlmError("-i and --no-image make one prompt: no --files-from, --sidecar or --ray", exit_code=EXIT_USAGE)
    expansion = media_cli.together(list(images or [])) if together else batch_cli.expand(args, videos=True)
    if args.sidecar and len(questions) != 1:
        raise VlmError("--sidecar takes one question per image", exit_code=EXIT_USAGE)
    single = batch_cli.is_single(args, expansion)
    structure = structure_of(json_schema, grammar)
    if structure is not None and structure.is_json and len(questions) == 1:
        sink = batch_cli.make_sink(
            args,
            expansion,
            ("jsonl", "csv", "text"),
            text=answers_text,
            csv_columns=structure.csv_columns(),
            csv_row=lambda r: structure.csv_row(r["answers"][0].get("json")) if not r.get("error") else {},
        )
    else:
        sink = batch_cli.make_sink(args, expansion, ("jsonl", "text"), text=answers_text)
    if single:
        media_cli.check_single(expansion.paths[0], max_pixels)
    _check_ray(args, n_best, select)
    temperature, judge = _best_of(n_best, select, clip_model, offline, threads, temperature, "ask")
    ctx = media_cli.context_for(ctx, expansion.paths)
    spec = _spec(model, mmproj, offline, threads, n_gpu_layers, ctx, detail, max_tiles, n_best, no_cache)
    if verbose:
        show_notes()
    gen = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    build = (questions, gen, max_pixels, n_best, select, structure, media_cli.sampling(fps, max_frames))
    if args.ray:
        with batch_cli.on_ray(args, "ask", _ask_task, spec, build) as remote:
            batch_cli.run(remote, args, expansion, sink, sidecar_text=answers_text, single=single)
        return
    task = _ask_task(spec, *build, judge=judge)
    if single and not json_out and n_best > 1:
        from vlmcli.tasks.sinks import CallbackSink

        sink = CallbackSink(_print_choices(task, verbose))
    elif single and not json_out:
        from vlmcli.tasks.sinks import NullSink

        sink = NullSink()  # the answers stream to stdout instead of a text record
        end = _stream_to_terminal(task)
        summary = batch_cli.execute(task, args, expansion.paths, sink, single=True)
        end(summary.done > 0)
        batch_cli.conclude(task.name, summary, args, single=True)
        return
    batch_cli.run(task, args, expansion, sink, sidecar_text=answers_text, single=single)


def _stream_to_terminal(task: AskTask) -> Callable[[bool], None]:
    """One image: answers stream to stdout as they are generated, the encoder's progress on stderr."""
    several = len(task.prompts) > 1

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def start(i: int) -> None:
        if i:
            sys.stdout.write("\n")  # ends the answer before
        if several:
            from rich.text import Text

            stderr.print(Text(f"> {task.prompts[i]}", style="bold"))

    # The vision encoder can take many seconds before the first token: show it on a terminal.
    status = stderr.status("encoding the media") if stderr_is_terminal() else None

    def encoding(done: int, total: int) -> None:
        if status is None:
            return
        if done == 0:
            status.start()
        status.update(f"encoding the media: {done}/{total} views")
        if done == total:
            status.stop()

    def end(answered: bool) -> None:
        if status is not None:
            status.stop()
        if answered:
            sys.stdout.write("\n")
            sys.stdout.flush()

    task.on_token, task.on_answer_start, task.on_progress = stream, start, encoding
    return end


@app.command(
    help="Caption images and videos: the caption of one, `PATH<TAB>caption` for several named files, "
    "JSONL for folders, globs and lists."
)
@batch_cli.with_batch_options()
def caption(
    images: list[str] | None = typer.Argument(
        None,
        help='Image and video files, folders (recursive), globs (quoted: "photos/**/*.jpg"), or - for paths on stdin.',
    ),
    fps: float | None = media_cli.FpsOpt,
    max_frames: int | None = media_cli.MaxFramesOpt,
    segments: str | None = media_cli.SegmentsOpt,
    prompt: str = typer.Option(DEFAULT_CAPTION_PROMPT, "--prompt", "-p", help="The instruction given with each image."),
    model: str | None = ModelOpt,
    mmproj: str | None = MmprojOpt,
    max_tokens: int = typer.Option(DEFAULT_CAPTION_MAX_TOKENS, "--max-tokens", "-n", min=1),
    temperature: float | None = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    threads: int | None = ThreadsOpt,
    n_gpu_layers: int = GpuOpt,
    ctx: int = CtxOpt,
    detail: str | None = DetailOpt,
    max_tiles: int | None = MaxTilesOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    no_cache: bool = NoCacheOpt,
    json_out: bool = JsonOpt,
    verbose: bool = VerboseOpt,
    n_best: int = BestOfOpt,
    select: str = SelectOpt,
    clip_model: str | None = ClipModelOpt,
    json_schema: str | None = JsonSchemaOpt,
    grammar: str | None = GrammarOpt,
    *,
    batch: batch_cli.BatchArgs,  # given by with_batch_options, not an option of its own
) -> None:
    """Caption images (the command's help is above: one line, as `vlm --help` lists it)."""
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.tasks.caption import caption_text

    if not images and not batch.files_from:
        raise VlmError("give image files, folders, globs, - or --files-from", exit_code=EXIT_USAGE)
    args = batch.for_inputs(list(images or []), json=json_out)
    expansion = batch_cli.expand(args, videos=True)
    if segments is not None:
        if args.sidecar:
            raise VlmError("--segments makes several records per video: no --sidecar", exit_code=EXIT_USAGE)
        expansion = media_cli.in_segments(expansion, segments)
    single = batch_cli.is_single(args, expansion)
    structure = structure_of(json_schema, grammar)
    if structure is not None and structure.is_json:
        sink = batch_cli.make_sink(
            args,
            expansion,
            ("jsonl", "csv", "text"),
            text=caption_text,
            csv_columns=structure.csv_columns(),
            csv_row=lambda r: structure.csv_row(r.get("json")) if not r.get("error") else {},
        )
    else:
        sink = batch_cli.make_sink(
            args,
            expansion,
            ("jsonl", "csv", "text"),
            text=caption_text,
            csv_columns=["caption"],
            csv_row=lambda r: {"caption": caption_text(r) if not r.get("error") else ""},
        )
    if single:
        media_cli.check_single(expansion.paths[0], max_pixels)
    _check_ray(args, n_best, select)
    temperature, judge = _best_of(n_best, select, clip_model, offline, threads, temperature, "caption")
    ctx = media_cli.context_for(ctx, expansion.paths)
    spec = _spec(model, mmproj, offline, threads, n_gpu_layers, ctx, detail, max_tiles, n_best, no_cache)
    if verbose:
        show_notes()
    gen = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    build = (gen, prompt, max_pixels, n_best, select, structure, media_cli.sampling(fps, max_frames))
    if args.ray:
        with batch_cli.on_ray(args, "caption", _caption_task, spec, build) as remote:
            batch_cli.run(remote, args, expansion, sink, sidecar_text=caption_text, single=single)
        return
    task = _caption_task(spec, *build, judge=judge)
    from vlmcli.tasks.sinks import CallbackSink, TextSink

    if single and verbose and n_best > 1 and isinstance(sink, TextSink):
        sink = CallbackSink(_print_choices(task, verbose))
    batch_cli.run(task, args, expansion, sink, sidecar_text=caption_text, single=single)
