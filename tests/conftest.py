"""Shared pytest fixtures. Session-scoped ones build tiny random-weight checkpoints and their GGUFs
once per test run; tests of the engines and the CLI reuse them.

Fixture modules live beside this file (tests/ is put on sys.path so `fixtures.*` and the
`*_fixtures` modules import the same way under every pytest import mode); the `*_fixtures` modules
are plugins, so every test sees their fixtures without importing them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

pytest_plugins = ["clip_fixtures", "photo_fixtures"]  # clip_checkpoint, clip_gguf, ...; photos

# The image-encoding cache of this test run: one fresh folder, not the user's store. Tests that
# compare cold and warm runs give their own folder (VLM_CACHE_DIR) or --no-cache.
os.environ.setdefault("VLM_CACHE_DIR", tempfile.mkdtemp(prefix="vlm-test-encodings-"))
# Thread shares (engines/cores.py) among this run's processes only, not other vlm work on the machine.
os.environ.setdefault("VLM_CORES_DIR", tempfile.mkdtemp(prefix="vlm-test-cores-"))

# The folder name becomes the model name inside and on the converted files, as with the real repo.
SMOLVLM2_NAME = "SmolVLM2-256M-Video-Instruct"

# The files that take longest, in that order. Under xdist (whole files per worker, addopts in
# pyproject.toml) they start first, so no long file is left for one worker while the other has none.
# A scheduling hint only: a stale list costs minutes, never a result.
LONGEST_FILES = (
    "test_capi.py",
    "test_index.py",
    "test_ray.py",
    "test_structured_serve.py",
    "test_pull.py",
    "test_batch_cli_clip.py",
    "test_serve.py",
    "test_fuzz.py",
    "test_encoding_cache.py",
    "test_structured.py",
    "test_cli_vlm.py",
    "test_video_cli.py",
    "test_reliability.py",
    "test_index_serve.py",
    "test_index_ray.py",
    "test_index_web.py",
    "test_multi_image_capi.py",
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (pyproject.toml) for tests of one file only: no workers. The file would run on one of
    them anyway (whole files per worker), after every worker had started. Otherwise xdist's count."""
    named = {(config.invocation_params.dir / arg.split("::")[0]).resolve() for arg in config.args}
    if len(named) == 1 and next(iter(named)).is_file():
        return 0
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: the longest files first, then the rest, those holding more tests first (what
    xdist's own order does; pyproject.toml turns that off so this order is the one it hands out)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return  # one process: the files in their usual order
    per_file: dict[str, int] = {}
    for item in items:
        per_file[item.path.name] = per_file.get(item.path.name, 0) + 1

    def rank(item: pytest.Item) -> tuple[int, int, str]:
        name = item.path.name
        if name in LONGEST_FILES:
            return (0, LONGEST_FILES.index(name), name)
        return (1, -per_file[name], name)

    items.sort(key=rank)  # stable: the tests of a file keep their order


@pytest.fixture(scope="session")
def smolvlm2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SmolVLM2 checkpoint folder in the real HF layout (bf16 weights, real tokenizer ids)."""
    from fixtures.smolvlm2 import build_smolvlm2_checkpoint

    return build_smolvlm2_checkpoint(tmp_path_factory.mktemp("smolvlm2-hf") / SMOLVLM2_NAME, seed=0)


@pytest.fixture(scope="session")
def smolvlm2_gguf(smolvlm2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny checkpoint converted like ggml-org's files: Q8_0 model + F16 mmproj (.model, .mmproj)."""
    from vlmcli.convert.smolvlm2 import convert_smolvlm2

    return convert_smolvlm2(
        smolvlm2_checkpoint, tmp_path_factory.mktemp("smolvlm2-gguf"), quant="Q8_0", mmproj_quant="F16"
    )


@pytest.fixture(scope="session")
def smolvlm2_folder(smolvlm2_gguf, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """folder(name): a folder of that name holding the tiny model and its mmproj, as `--model DIR` and
    `vlm serve --model DIR` take one (the name is the served model's id). Made once per name."""
    made: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in made:
            d = tmp_path_factory.mktemp("smolvlm2-folder") / name
            d.mkdir()
            shutil.copy(smolvlm2_gguf.model, d)
            shutil.copy(smolvlm2_gguf.mmproj, d)
            made[name] = d
        return made[name]

    return folder


@pytest.fixture(autouse=True, scope="session")
def _an_xdist_worker_is_cpu_work_beside_vlms() -> Iterator[None]:
    """Under xdist every worker is CPU work running beside the vlm processes it starts: it announces one
    unit of engines/cores.py's share for the session (from a thread of its own, so no engine call of the
    worker nests in it). vlm's engines then split the CPUs with the other workers instead of each taking
    them all and spinning at llama.cpp's barriers while another worker holds a core. Without xdist
    nothing is announced: vlm takes the CPUs as on a user's machine."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    from vlmcli.engines.cores import CoreShare

    announced, done = threading.Event(), threading.Event()

    def hold() -> None:
        with CoreShare().running():
            announced.set()
            done.wait()

    holder = threading.Thread(target=hold, name="xdist-worker-core-share", daemon=True)
    holder.start()
    announced.wait()
    yield
    done.set()
    holder.join()


@pytest.fixture(autouse=True, scope="session")
def _llama_class_follows_the_engine_on_extra_buffers() -> Iterator[None]:
    """Tests that load converter output through llama-cpp-python's own `Llama` class get the rule the
    engine applies to llama.cpp's extra CPU buffer types (engines/llama_native.extra_buffers_allowed:
    AMX kernels fault with SIGILL in some VMs that advertise AMX)."""
    from llama_cpp import llama as llama_class_module

    from vlmcli.engines.llama_native import extra_buffers_allowed

    default_params = llama_class_module.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = default_params()
        p.use_extra_bufts = extra_buffers_allowed()
        return p

    llama_class_module.llama_cpp.llama_model_default_params = params
    yield
    llama_class_module.llama_cpp.llama_model_default_params = default_params
