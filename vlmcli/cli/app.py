"""The Typer app and what every command shares: stderr console, JSON output, common options.

Kept light: `vlm --help`, `vlm models` and `vlm rm` import this and never load llama.cpp or ggml;
commands import the tasks and engines they need inside their bodies.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from vlmcli.defaults import DEFAULT_IMAGE_BATCH, DEFAULT_MAX_PIXELS, DEFAULT_N_CTX, DEFAULT_N_GPU_LAYERS


def _help_flag_off(option: Any) -> Any:
    """Typer (0.2x) declares -h/--help without a default: absent, it reads None, which Typer coerces
    through pydantic, and importing pydantic costs more than the rest of `vlm models` together.
    Absent means False, which Typer passes through as it is."""
    if option is not None and option.default is None:
        option.default = False
    return option


class LightHelpCommand(TyperCommand):
    def get_help_option(self, ctx: Any) -> Any:
        return _help_flag_off(super().get_help_option(ctx))


class LightHelpGroup(TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _help_flag_off(super().get_help_option(ctx))


def lighten_help_flags(typer_app: typer.Typer) -> None:
    """Build every command and group registered on `typer_app` so far with the classes above."""
    for command in typer_app.registered_commands:
        if command.cls in (None, TyperCommand):
            command.cls = LightHelpCommand
    for group in typer_app.registered_groups:
        if not isinstance(group.cls, type):  # not chosen by the group's module: Typer's default
            group.cls = LightHelpGroup
        if group.typer_instance is not None:
            lighten_help_flags(group.typer_instance)


app = typer.Typer(
    cls=LightHelpGroup,
    name="vlm",
    help="Local vision-language inference: SmolVLM2 on llama.cpp, CLIP on ggml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options every model command takes (command-specific ones live beside their commands); short
# flags follow llama.cpp's (-t threads, -ngl GPU layers, -m model).
ThreadsOpt = typer.Option(
    None,
    "--threads",
    "-t",
    min=1,
    help="CPU threads (default: this process's CPUs, shared with other vlm runs computing at the same time).",
)
MaxPixelsOpt = typer.Option(
    DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Refuse larger images (decompression-bomb guard)."
)
NoCacheOpt = typer.Option(
    False, "--no-cache", help="Run the vision encoder afresh: neither read nor write the store's image-encoding cache."
)
OfflineOpt = typer.Option(False, "--offline", help="Use only models already in the store (also HF_HUB_OFFLINE=1).")
GpuOpt = typer.Option(
    DEFAULT_N_GPU_LAYERS,
    "--n-gpu-layers",
    "-ngl",
    help="Layers on the GPU: -1 = all when the build has a GPU backend (else the CPU), 0 = CPU only; "
    "CLIP goes whole, for any value but 0.",
)
CtxOpt = typer.Option(DEFAULT_N_CTX, "--ctx", "-c", min=256, help="SmolVLM2 context size in tokens.")
# CLIP
ImageBatchOpt = typer.Option(DEFAULT_IMAGE_BATCH, "--batch-size", "-b", min=1, help="Images encoded together.")
DeviceOpt = typer.Option(None, "--device", help="ggml device name (CPU, CUDA0, Vulkan0, ...).")

# Everything for humans goes to stderr; stdout carries only results.
stderr = Console(stderr=True, highlight=False)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def print_json(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout, flushed so pipes see it at once."""
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """A notice for the user on stderr (kept out of stdout so results stay parseable)."""
    stderr.print(message, markup=False, highlight=False, soft_wrap=True)


@functools.cache  # one handler, however often a command asks
def show_notes() -> None:
    """-v: what the layers below log at INFO (a damaged cache entry recomputed, ...) as `vlm: note:` lines."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vlm: note: %(message)s"))
    logger = logging.getLogger("vlmcli")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def fill_bare_option(args: list[str], flag: str, takes: Callable[[str], bool], bare: str) -> list[str]:
    """Click has no option with an optional value: where `flag` is not followed by a word it `takes`
    (its value), it becomes `bare` (an `--opt=default` or a hidden flag) before Typer parses the line."""
    out = list(args)
    for i, word in enumerate(out):
        if word == "--":
            break
        if word == flag and not (i + 1 < len(out) and takes(out[i + 1])):
            out[i] = bare
    return out
