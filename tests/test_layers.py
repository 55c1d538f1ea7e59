"""The shape of the code: layers import only downward, and commands that run no model start light."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlmcli"

# Each layer and the layers it must never import (front ends sit on top).
FORBIDDEN = {
    "tasks": ("vlmcli.cli", "vlmcli.capi"),
    "engines": ("vlmcli.cli", "vlmcli.capi", "vlmcli.tasks", "vlmcli.store"),
    "store": ("vlmcli.cli", "vlmcli.capi", "vlmcli.tasks"),
    "capi": ("vlmcli.cli",),
    "serve": ("vlmcli.cli", "vlmcli.capi"),
    # pure Python under the engines and the store: reads and checks files, loads nothing native
    "gguf": (
        "vlmcli.cli",
        "vlmcli.capi",
        "vlmcli.serve",
        "vlmcli.tasks",
        "vlmcli.store",
        "vlmcli.engines",
        "vlmcli.convert",
    ),
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downward(layer: str) -> None:
    bad = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in _imports(path)
        if name.startswith(FORBIDDEN[layer])
    ]
    assert bad == []


def _modules_after(code: str) -> set[str]:
    env = {k: v for k, v in os.environ.items() if k != "VLM_DEBUG"}
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return set(json.loads(out))


def test_the_cli_declares_its_commands_without_native_code() -> None:
    # What `vlm --help`, `vlm models` and `vlm rm` need: no llama.cpp, no ggml, no numpy, no Pillow.
    loaded = _modules_after("import vlmcli.cli")
    assert not {"llama_cpp", "numpy", "PIL", "huggingface_hub", "ray"} & {m.split(".")[0] for m in loaded}
    assert not [m for m in loaded if m.startswith(("vlmcli.engines", "vlmcli.store"))]


def test_ray_is_imported_only_when_a_pool_starts() -> None:
    # Ray is an optional extra: the module that runs batches on it (in the tasks layer) imports it lazily,
    # and nothing else in the package names it.
    loaded = _modules_after("import vlmcli.tasks.ray_batch")
    assert not {"ray", "numpy", "PIL", "llama_cpp"} & {m.split(".")[0] for m in loaded}
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(name == "ray" or name.startswith("ray.") for name in _imports(path))
    )
    assert users == ["tasks/ray_batch.py"]


def test_help_lists_every_command_and_llama_cpp_short_flags() -> None:
    r = subprocess.run([sys.executable, "-m", "vlmcli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for command in (
        "ask",
        "caption",
        "classify",
        "embed",
        "pull",
        "models",
        "rm",
        "convert",
        "quantize",
        "lib",
        "doctor",
    ):
        assert command in r.stdout
    ask = subprocess.run(
        [sys.executable, "-m", "vlmcli", "ask", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "-t" in ask and "--threads" in ask and "--temp" in ask and "-c" in ask and "--ctx" in ask
