"""Commands: eval vqa, eval caption, eval zeroshot, eval retrieval (quality and speed, side by side)."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from vlmcli.cli import batch as batch_cli
from vlmcli.cli.app import (
    CtxOpt,
    DeviceOpt,
    GpuOpt,
    ImageBatchOpt,
    MaxPixelsOpt,
    NoCacheOpt,
    OfflineOpt,
    ThreadsOpt,
    app,
    fill_bare_option,
    info,
)
from vlmcli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, VlmError

if TYPE_CHECKING:
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.tasks.eval.runs import EvalSettings
    from vlmcli.tasks.models import ModelSpec

eval_app = typer.Typer(
    help="Measure quality and speed on standard benchmarks: VQAv2 accuracy, COCO caption CIDEr-D/BLEU/ROUGE-L, "
    "CLIP zero-shot top-1/top-5 and retrieval Recall@K.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")

VlmModelsOpt = typer.Option(
    None, "--model", "-m", help="Store name (NAME[:QUANT]), GGUF file or folder; repeat to compare models side by side."
)
ClipModelsOpt = typer.Option(
    None, "--model", "-m", help="Store name, CLIP .gguf file or folder; repeat to compare models side by side."
)
MmprojOpt = typer.Option(None, "--mmproj", help="Vision projector GGUF (when a single --model is a GGUF file).")
DetailsOpt = typer.Option(None, "--detail", help="Image detail low | high | auto; repeat to compare.")
MaxTilesOpt = typer.Option(None, "--max-tiles", min=0, help="Cap on image tiles; repeat to compare.")
ImagesOpt = typer.Option(None, "--images", help="Image folder (default: the dataset file's folder).")
SplitOpt = typer.Option("test", "--split", help="Karpathy split JSON: train, val, test, restval or all.")
LimitOpt = typer.Option(None, "--limit", min=1, help="Evaluate only the first N items (after --sample).")
SampleOpt = typer.Option(
    None,
    "--sample",
    min=1,
    metavar="[N]",
    help="Evaluate a random subset of N items (with --seed). Alone and without DATA: the sample set "
    "shipped with vlm (six photos; a smoke test, not a benchmark).",
)
# A bare --sample (no N) is rewritten to this by sample_flag() before Typer parses the line.
SampleSetOpt = typer.Option(False, "--sample-set", hidden=True)
SeedOpt = typer.Option(0, "--seed", help="Seed of --sample's subset.")
OutOpt = typer.Option(
    None, "--out", "-o", help="Per-item records (JSONL; retrieval: OUT.npy + OUT.jsonl); rerunning with it continues."
)
RedoOpt = typer.Option(False, "--redo", help="Run every item again even if --out has it.")
JsonOpt = typer.Option(False, "--json", help="The report as one JSON object on stdout.")
FormatOpt = typer.Option(None, "--format", "-f", help="Report format: table (default), markdown, json.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress on stderr.")
PredictionsOpt = typer.Option(
    None,
    "--predictions",
    help="Score these predictions (official results JSON or vlm's --out JSONL) without running a model.",
)
BestOfOpt = typer.Option(
    "1",
    "--best-of",
    help="Candidates per answer, e.g. 1,2,4,8: a row per N (one image encoding each); "
    "with three or more the scaling law Q(N) = Q_inf - A/N^gamma is fitted.",
)
SelectOpt = typer.Option("logprob", "--select", help="How --best-of picks: logprob or vote.")


def _best_of(text: str, select: str) -> dict[str, Any]:
    from vlmcli.tasks.best_of import check

    try:
        ns = list(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise VlmError(
            f"--best-of takes counts separated by commas (e.g. 1,2,4,8), not {text!r}", exit_code=EXIT_USAGE
        ) from None
    if select == "clip":
        raise VlmError("--select clip is not available in vlm eval (use logprob or vote)", exit_code=EXIT_USAGE)
    for n in ns or [0]:
        check(n, select)
    return {"best_of": ns, "select": select}


def _vlm_specs(
    models: list[str] | None,
    mmproj: str | None,
    details: list[str] | None,
    max_tiles: list[int] | None,
    offline: bool,
    threads: int | None,
    n_gpu_layers: int,
    ctx: int,
    no_cache: bool,
) -> list[ModelSpec]:
    from vlmcli.tasks.models import ModelSpec

    names: list[str | None] = [*models] if models else [None]  # no --model: the default model
    if mmproj is not None and len(names) != 1:
        raise VlmError("--mmproj goes with a single --model", exit_code=EXIT_USAGE)
    levels: list[str | None] = [*details] if details else [None]
    caps: list[int | None] = [*max_tiles] if max_tiles else [None]
    return [
        ModelSpec(m, mmproj, offline or None, threads, n_gpu_layers, ctx, d, t, cache=not no_cache)
        for m, d, t in itertools.product(names, levels, caps)
    ]


def _clip_specs(
    models: list[str] | None, offline: bool, threads: int | None, n_gpu_layers: int, device: str | None
) -> list[ModelSpec]:
    from vlmcli.tasks.models import ModelSpec

    names: list[str | None] = [*models] if models else [None]  # no --model: the default model
    return [
        ModelSpec(m, offline=offline or None, n_threads=threads, n_gpu_layers=n_gpu_layers, device=device)
        for m in names
    ]


def _settings(
    out: Path | None, redo: bool, quiet: bool, max_pixels: int, batch: batch_cli.BatchArgs, **kwargs: Any
) -> EvalSettings:
    from vlmcli.cli.progress import BatchProgress
    from vlmcli.tasks.eval.runs import EvalSettings

    if out is not None and out.is_dir():
        raise VlmError("--out is a folder; give a file", out, exit_code=EXIT_USAGE)
    return EvalSettings(
        out=out,
        redo=redo,
        max_pixels=max_pixels,
        observer_factory=lambda: BatchProgress(quiet=quiet),
        notify=info,
        ray=batch_cli.ray_options(batch, quiet),
        **kwargs,
    )


def _no_ray_with_predictions(batch: batch_cli.BatchArgs) -> None:
    if batch.ray:
        raise VlmError("--predictions scores without a model; --ray has nothing to run", exit_code=EXIT_USAGE)


def _format(json_out: bool, fmt: str | None) -> str:
    f = "json" if json_out else (fmt or "table").lower()
    if f not in ("table", "markdown", "json"):
        raise VlmError(f"--format {f} is not available here (choose from table, markdown, json)", exit_code=EXIT_USAGE)
    return f


def _generation(max_tokens: int | None) -> GenerationOptions | None:
    if max_tokens is None:
        return None
    from vlmcli.engines.llama import GenerationOptions

    return GenerationOptions(max_tokens=max_tokens)


def sample_flag(args: list[str]) -> list[str]:
    """`vlm eval vqa --sample` (no count after it) means the shipped sample set; `--sample N` a subset."""
    if not args or args[0] != "eval":
        return args
    return fill_bare_option(args, "--sample", lambda w: w.lstrip("-").isdigit(), "--sample-set")


def _dataset(data: Path | None, sample_set: bool, sample: int | None, command: str) -> Path:
    """DATA, or (with --sample, counted or not) the shipped sample set's file for this evaluation."""
    from vlmcli.tasks.eval.data import SAMPLE_FILES

    if data is None:
        if not sample_set and sample is None:
            raise VlmError(
                f"give a dataset (see vlm eval {command} --help), or --sample for the sample set shipped with vlm",
                exit_code=EXIT_USAGE,
            )
        info("vlm: the shipped sample set: a smoke test of the pipeline, not a benchmark")
        return SAMPLE_FILES[command]
    if sample_set:
        raise VlmError(
            f"--sample without a count evaluates the shipped sample set, not {data}; "
            f"give --sample N for a random subset of it",
            exit_code=EXIT_USAGE,
        )
    return data


def _subset(items: list[Any], limit: int | None, sample: int | None, seed: int) -> list[Any]:
    from vlmcli.tasks.eval.data import select

    chosen = select(items, limit, sample, seed)
    if not chosen:
        raise VlmError("no items to evaluate")
    return chosen


# ----------------------------------------------------------------------------- rendering


def _metric(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda m: m.get(key)


def _within(group: str, key: str) -> Callable[[dict[str, Any]], Any]:
    """A metric inside a group of them (per answer type, a retrieval direction)."""
    return lambda m: (m.get(group) or {}).get(key)


_COLUMNS: dict[str, list[tuple[str, Callable[[dict[str, Any]], Any]]]] = {
    "vqa": [
        ("accuracy", _metric("accuracy")),
        ("yes/no", _within("per_answer_type", "yes/no")),
        ("number", _within("per_answer_type", "number")),
        ("other", _within("per_answer_type", "other")),
    ],
    "caption": [(k, _metric(k)) for k in ("CIDEr-D", "BLEU-1", "BLEU-4", "ROUGE-L")],
    "zeroshot": [("top-1 %", _metric("top1")), ("top-5 %", _metric("top5"))],
    "retrieval": [
        (f"{name} R@{k}", _within(direction, f"R@{k}"))
        for name, direction in (("I->T", "image_to_text"), ("T->I", "text_to_image"))
        for k in (1, 5, 10)
    ],
}


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    kind = report["eval"]
    cols = _COLUMNS[kind]
    head = ["model", "quant"]
    vlm = kind in ("vqa", "caption")
    several = any((r.get("best_of") or 1) > 1 for r in report["runs"])
    if vlm:
        head += ["detail"] + (["N"] if several else [])
    head += [c for c, _ in cols] + ["items", "failed"]
    head += ["wall", "s/item", "img/s"] + (["ttft s"] if vlm else []) + ["peak RSS MB"]
    rows = []
    for r in report["runs"]:
        m = r.get("metrics") or {}
        s = r.get("speed") or {}
        row = [str(r.get("model") or r.get("predictions") or "-"), _fmt(r.get("quant"))]
        if vlm:
            detail = r.get("detail")
            if r.get("max_tiles") is not None:
                detail = f"{detail or 'auto'}, <={r['max_tiles']} tiles"
            row.append(_fmt(detail))
            if several:
                row.append(_fmt(r.get("best_of")))
        digits = 3 if kind == "caption" else 2
        row += [_fmt(f(m), digits) for _, f in cols] + [_fmt(r.get("items")), _fmt(r.get("failed"))]
        row += (
            [
                _fmt(s.get("wall_s"), 1) + " s" if s.get("wall_s") is not None else "-",
                _fmt(s.get("s_per_item"), 3),
                _fmt(s.get("images_per_s"), 2),
            ]
            + ([_fmt(s.get("ttft_s"), 2)] if vlm else [])
            + [_fmt(s.get("peak_rss_mb"), 0)]
        )
        rows.append(row)
    return head, rows


def _caption_line(report: dict[str, Any]) -> str:
    parts = [f"vlm eval {report['eval']}: {report.get('dataset', '')}"]
    for k in ("questions", "images", "captions", "classes", "templates"):
        if k in report:
            parts.append(f"{report[k]} {k}")
    m = report.get("machine") or {}
    parts.append(f"on {m.get('cpu')} ({m.get('cores')} cores)")
    return ", ".join(parts)


def render(report: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    head, rows = _rows(report)
    if fmt == "markdown":
        lines = [_caption_line(report), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        sys.stdout.write("\n".join(lines + [""] + _scaling_lines(report)) + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Piped, the table keeps its full width (rich would squeeze it into 80 columns).
    console = Console(file=sys.stdout, highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 250)
    console.print(_caption_line(report), markup=False, soft_wrap=True)
    table = Table(show_edge=True)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*[Text(c) for c in row])
    console.print(table)
    for line in _scaling_lines(report):
        console.print(line, markup=False, soft_wrap=True)


def _scaling_lines(report: dict[str, Any]) -> list[str]:
    return [
        f"scaling, {f['model']} ({f['detail'] or 'auto'}): "
        f"{f['metric']}(N) = {f['q_inf']:.4g} - {f['a']:.4g} / N^{f['gamma']:.3g}"
        f" (rmse {f['rmse']:.2g}, N = {', '.join(str(k) for k, _ in f['points'])})"
        for f in report.get("scaling") or []
    ]


def _finish(report: dict[str, Any], fmt: str) -> None:
    render(report, fmt)
    runs = report["runs"]
    if any((r.get("summary") or {}).get("interrupted") for r in runs):
        raise typer.Exit(EXIT_INTERRUPTED)
    if all(not r.get("items") for r in runs):
        raise typer.Exit(EXIT_ERROR)
    if any(r.get("failed") for r in runs):
        raise typer.Exit(EXIT_PARTIAL)
    raise typer.Exit(EXIT_OK)


# ----------------------------------------------------------------------------- commands


@eval_app.command("vqa")
@batch_cli.with_batch_options(without=batch_cli.RAY_ONLY)
def vqa(
    data: Path | None = typer.Argument(
        None,
        help="VQAv2 questions JSON (with --annotations and --images), or a JSONL of {image, question, answers: [...]}.",
    ),
    annotations: Path | None = typer.Option(None, "--annotations", help="VQAv2 annotations JSON (the answers)."),
    images: Path | None = typer.Option(
        None,
        "--images",
        help="Image folder (VQAv2: COCO_val2014_000000xxxxxx.jpg files; JSONL: paths are relative to it).",
    ),
    prompt_suffix: str | None = typer.Option(
        None,
        "--prompt-suffix",
        help='Text after each question (default "Answer the question using a single word or phrase."; "" for none).',
    ),
    predictions: Path | None = PredictionsOpt,
    model: list[str] | None = VlmModelsOpt,
    mmproj: str | None = MmprojOpt,
    detail: list[str] | None = DetailsOpt,
    max_tiles: list[int] | None = MaxTilesOpt,
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", "-n", min=1, help="Most tokens per answer (default 16)."
    ),
    best_of: str = BestOfOpt,
    select: str = SelectOpt,
    limit: int | None = LimitOpt,
    sample: int | None = SampleOpt,
    sample_set: bool = SampleSetOpt,
    seed: int = SeedOpt,
    out: Path | None = OutOpt,
    redo: bool = RedoOpt,
    json_out: bool = JsonOpt,
    fmt: str | None = FormatOpt,
    quiet: bool = QuietOpt,
    threads: int | None = ThreadsOpt,
    n_gpu_layers: int = GpuOpt,
    ctx: int = CtxOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    no_cache: bool = NoCacheOpt,
    *,
    batch: batch_cli.BatchArgs,  # --ray and its options, given by with_batch_options
) -> None:
    """VQAv2 accuracy exactly as the official evaluation computes it (overall and per answer type), with speed."""
    from vlmcli.tasks.eval.data import load_vqa
    from vlmcli.tasks.eval.vqa import evaluate_vqa, score_vqa_predictions

    f = _format(json_out, fmt)
    data = _dataset(data, sample_set, sample, "vqa")

    def warn(message: str) -> None:
        info(f"vlm: warning: {message}")

    items = _subset(load_vqa(data, annotations, images, warn, need_images=predictions is None), limit, sample, seed)
    if predictions is not None:
        _no_ray_with_predictions(batch)
        _finish(score_vqa_predictions(items, predictions, str(data)), f)
    specs = _vlm_specs(model, mmproj, detail, max_tiles, offline, threads, n_gpu_layers, ctx, no_cache)
    settings = _settings(
        out,
        redo,
        quiet,
        max_pixels,
        batch,
        generation=_generation(max_tokens),
        prompt=prompt_suffix,
        **_best_of(best_of, select),
    )
    _finish(evaluate_vqa(items, specs, settings, str(data)), f)


@eval_app.command("caption")
@batch_cli.with_batch_options(without=batch_cli.RAY_ONLY)
def caption(
    data: Path | None = typer.Argument(
        None, help="COCO captions annotations JSON, a Karpathy split JSON, or a JSONL of {image, captions: [...]}."
    ),
    images: Path | None = ImagesOpt,
    split: str = SplitOpt,
    prompt: str | None = typer.Option(
        None,
        "--prompt",
        "-p",
        help='The instruction given with each image (default "Describe this image in one sentence.").',
    ),
    predictions: Path | None = PredictionsOpt,
    model: list[str] | None = VlmModelsOpt,
    mmproj: str | None = MmprojOpt,
    detail: list[str] | None = DetailsOpt,
    max_tiles: list[int] | None = MaxTilesOpt,
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", "-n", min=1, help="Most tokens per caption (default 48)."
    ),
    best_of: str = BestOfOpt,
    select: str = SelectOpt,
    limit: int | None = LimitOpt,
    sample: int | None = SampleOpt,
    sample_set: bool = SampleSetOpt,
    seed: int = SeedOpt,
    out: Path | None = OutOpt,
    redo: bool = RedoOpt,
    json_out: bool = JsonOpt,
    fmt: str | None = FormatOpt,
    quiet: bool = QuietOpt,
    threads: int | None = ThreadsOpt,
    n_gpu_layers: int = GpuOpt,
    ctx: int = CtxOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    no_cache: bool = NoCacheOpt,
    *,
    batch: batch_cli.BatchArgs,  # --ray and its options, given by with_batch_options
) -> None:
    """COCO-style captioning: CIDEr-D, BLEU-1..4 and ROUGE-L as pycocoevalcap computes them, with speed."""
    from vlmcli.tasks.eval.captions import evaluate_captions, score_caption_predictions
    from vlmcli.tasks.eval.data import load_captions

    f = _format(json_out, fmt)
    data = _dataset(data, sample_set, sample, "caption")
    items = _subset(load_captions(data, images, split), limit, sample, seed)
    if predictions is not None:
        _no_ray_with_predictions(batch)
        _finish(score_caption_predictions(items, predictions, str(data)), f)
    specs = _vlm_specs(model, mmproj, detail, max_tiles, offline, threads, n_gpu_layers, ctx, no_cache)
    settings = _settings(
        out,
        redo,
        quiet,
        max_pixels,
        batch,
        generation=_generation(max_tokens),
        prompt=prompt,
        **_best_of(best_of, select),
    )
    _finish(evaluate_captions(items, specs, settings, str(data)), f)


def _templates(template: list[str] | None, templates: str | None) -> list[str] | None:
    from vlmcli.files import read_lines
    from vlmcli.tasks.eval.imagenet import imagenet_templates

    out = list(template or [])
    if templates is not None:
        out += imagenet_templates() if templates.lower() == "imagenet" else read_lines(Path(templates), "templates")
    return out or None


@eval_app.command("zeroshot")
@batch_cli.with_batch_options(without=batch_cli.RAY_ONLY)
def zeroshot(
    root: Path | None = typer.Argument(None, help="ImageFolder tree: ROOT/CLASS/image.jpg, one folder per class."),
    classes: str | None = typer.Option(
        None,
        "--classes",
        help="Class names: a file (one per line in sorted folder order, or FOLDER<TAB>name lines), "
        'or "imagenet" (CLIP\'s 1000 names). Default: the folder names.',
    ),
    template: list[str] | None = typer.Option(
        None, "--template", help='Prompt with {} for the class name (default "a photo of a {}."); repeat to ensemble.'
    ),
    templates: str | None = typer.Option(
        None, "--templates", help='A file of templates (one per line), or "imagenet" (CLIP\'s 80).'
    ),
    model: list[str] | None = ClipModelsOpt,
    limit: int | None = LimitOpt,
    sample: int | None = SampleOpt,
    sample_set: bool = SampleSetOpt,
    seed: int = SeedOpt,
    out: Path | None = OutOpt,
    redo: bool = RedoOpt,
    json_out: bool = JsonOpt,
    fmt: str | None = FormatOpt,
    quiet: bool = QuietOpt,
    threads: int | None = ThreadsOpt,
    batch_size: int = ImageBatchOpt,
    n_gpu_layers: int = GpuOpt,
    device: str | None = DeviceOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    *,
    batch: batch_cli.BatchArgs,  # --ray and its options, given by with_batch_options
) -> None:
    """CLIP zero-shot classification: top-1 / top-5 accuracy over an ImageFolder tree, with speed."""
    from vlmcli.tasks.eval.data import ImageFolder, load_image_folder, read_class_names, select
    from vlmcli.tasks.eval.imagenet import imagenet_classes
    from vlmcli.tasks.eval.zeroshot import evaluate_zeroshot

    f = _format(json_out, fmt)
    root = _dataset(root, sample_set, sample, "zeroshot")
    names = None
    if classes is not None:
        names = imagenet_classes() if classes.lower() == "imagenet" else read_class_names(Path(classes))
    folder = load_image_folder(root, names)
    for w in folder.warnings:
        info(f"vlm: warning: {root}: {w}")
    keep = select(list(range(len(folder.paths))), limit, sample, seed)
    if not keep:
        raise VlmError("no items to evaluate")
    folder = ImageFolder(
        folder.classes, folder.names, [folder.paths[i] for i in keep], [folder.labels[i] for i in keep]
    )
    settings = _settings(
        out, redo, quiet, max_pixels, batch, templates=_templates(template, templates), batch_size=batch_size
    )
    _finish(
        evaluate_zeroshot(folder, _clip_specs(model, offline, threads, n_gpu_layers, device), settings, str(root)), f
    )


@eval_app.command("retrieval")
@batch_cli.with_batch_options(without=batch_cli.RAY_ONLY)
def retrieval(
    data: Path | None = typer.Argument(
        None, help="COCO / Flickr30k Karpathy split JSON, COCO captions JSON, or a JSONL of {image, captions: [...]}."
    ),
    images: Path | None = ImagesOpt,
    split: str = SplitOpt,
    model: list[str] | None = ClipModelsOpt,
    limit: int | None = LimitOpt,
    sample: int | None = SampleOpt,
    sample_set: bool = SampleSetOpt,
    seed: int = SeedOpt,
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Embeddings: OUT.npy + OUT.jsonl (as `vlm embed` writes them); rerunning with it continues.",
    ),
    redo: bool = RedoOpt,
    json_out: bool = JsonOpt,
    fmt: str | None = FormatOpt,
    quiet: bool = QuietOpt,
    threads: int | None = ThreadsOpt,
    batch_size: int = ImageBatchOpt,
    n_gpu_layers: int = GpuOpt,
    device: str | None = DeviceOpt,
    max_pixels: int = MaxPixelsOpt,
    offline: bool = OfflineOpt,
    *,
    batch: batch_cli.BatchArgs,  # --ray and its options, given by with_batch_options
) -> None:
    """CLIP image-to-text and text-to-image Recall@1/5/10, as in the CLIP paper, with speed."""
    from vlmcli.tasks.eval.data import load_captions
    from vlmcli.tasks.eval.retrieval import evaluate_retrieval

    f = _format(json_out, fmt)
    if out is not None and out.suffix.lower() != ".npy":
        raise VlmError("--out is the .npy file (its .jsonl metadata is written beside it)", out, exit_code=EXIT_USAGE)
    data = _dataset(data, sample_set, sample, "retrieval")
    items = _subset(load_captions(data, images, split), limit, sample, seed)
    settings = _settings(out, redo, quiet, max_pixels, batch, batch_size=batch_size)
    _finish(
        evaluate_retrieval(items, _clip_specs(model, offline, threads, n_gpu_layers, device), settings, str(data)), f
    )
