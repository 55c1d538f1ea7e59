"""Commands that run no model start light: what `vlm --help`, `vlm ask --help` and `vlm models` import.

Timings live in benchmarks/bench_startup.py; this checks the imports that would make them slow again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Native code, numerics, the hub client, templates, Ray: what running a model needs, never a listing.
HEAVY = ("numpy", "PIL", "llama_cpp", "huggingface_hub", "jinja2", "ray")


def _modules_after(argv: list[str], tmp_path: Path) -> set[str]:
    """The modules loaded once `vlm ARGV` has run (in a fresh interpreter)."""
    dump = tmp_path / "modules.json"
    code = (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: open({str(dump)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
        "from vlmcli.cli import main\n"
        f"main({argv!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VLM_DEBUG"}
    env.update(VLM_HOME=str(tmp_path / "store"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return set(json.loads(dump.read_text()))


@pytest.mark.parametrize("argv", [["--help"], ["ask", "--help"], ["caption", "--help"], ["models"]])
def test_listing_commands_load_no_model_code(argv: list[str], tmp_path: Path) -> None:
    loaded = _modules_after(argv, tmp_path)
    assert not set(HEAVY) & {m.split(".")[0] for m in loaded}
    assert not [m for m in loaded if m.startswith(("vlmcli.engines", "vlmcli.tasks"))]


def test_help_flags_are_not_coerced_through_pydantic(tmp_path: Path) -> None:
    # Typer coerces a parameter's value through pydantic unless it is a bool; -h/--help absent must
    # read False (cli/app.py), so a command with flags only never imports it.
    assert "pydantic" not in _modules_after(["models"], tmp_path)
