"""How the CLI words the structured errors of the layers below: flag names, and what to try."""

from __future__ import annotations

from vlmcli.errors import ContextOverflow, InvalidOption, VlmError

# Neutral option names (errors.InvalidOption.option) -> the flag a CLI user types.
FLAGS = {
    "model": "--model",
    "mmproj": "--mmproj",
    "detail": "--detail",
    "max_tiles": "--max-tiles",
    "n_ctx": "--ctx",
    "n_threads": "--threads",
    "n_gpu_layers": "--n-gpu-layers",
    "max_tokens": "--max-tokens",
    "json_schema": "--json-schema",
    "grammar": "--grammar",
    "labels": "--labels",
    "templates": "--template",
    "best_of": "--best-of",
    "select": "--select",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "seed": "--seed",
    "n_batch": "--batch-size",
    "ray": "--ray",
    "ray_workers": "--ray-workers",
    "ray_cpus": "--ray-cpus",
    "ray_gpus": "--ray-gpus",
}


def describe(error: VlmError, with_path: bool = True) -> str:
    """The text after `vlm: error: ` for this error."""
    message = error.message
    if isinstance(error, InvalidOption):
        message = f"{FLAGS.get(error.option, error.option)}: {message}"
    elif isinstance(error, ContextOverflow):
        message += " (raise --ctx or lower --detail)" if error.image_tokens else " (raise --ctx)"
    return f"{error.path}: {message}" if with_path and error.path else message
