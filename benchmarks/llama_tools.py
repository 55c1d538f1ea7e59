"""llama.cpp's own command-line tools, built once from the pinned llama-cpp-python sdist.

The peers a user would run instead of `vlm` (`llama-mtmd-cli`, `llama-batched-bench`, `llama-server`) must be the
very llama.cpp that vlm runs on, so this downloads the sdist of the installed llama-cpp-python
version from the package registry (`pip download --no-binary`), and builds the tools from its
`vendor/llama.cpp` with cmake, with llama-cpp-python's CPU defaults (native SIMD, OpenMP,
llamafile kernels, no curl). The build is cached; `--cmake-arg` builds a variant beside it (for
experiments such as -DGGML_LLAMAFILE=OFF).

    python benchmarks/llama_tools.py                      # builds, prints the bin folder
    python benchmarks/llama_tools.py --cmake-arg -DGGML_LLAMAFILE=OFF
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

TOOLS = ("llama-mtmd-cli", "llama-batched-bench", "llama-server")
CACHE = Path(tempfile.gettempdir()) / "vlmcli-bench" / "llama-tools"


def sdist_source(cache: Path = CACHE) -> Path:
    """The extracted vendor/llama.cpp of the installed llama-cpp-python's sdist."""
    pinned = version("llama-cpp-python")
    root = cache / f"llama_cpp_python-{pinned}"
    source = root / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").exists():
        return source
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading the llama-cpp-python {pinned} sdist ...", file=sys.stderr)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"llama-cpp-python=={pinned}",
            "-d",
            str(cache),
        ],
        check=True,
    )
    archive = cache / f"llama_cpp_python-{pinned}.tar.gz"
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return source


def build(cmake_args: tuple[str, ...] = (), cache: Path = CACHE) -> Path:
    """Build (once per set of cmake arguments) and return the folder holding the tools."""
    source = sdist_source(cache)
    tag = hashlib.sha256(" ".join(cmake_args).encode()).hexdigest()[:8] if cmake_args else "default"
    build_dir = source.parent.parent / f"build-{tag}"
    bin_dir = build_dir / "bin"
    if all((bin_dir / tool).exists() for tool in TOOLS):
        return bin_dir
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    print(f"building {', '.join(TOOLS)} in {build_dir} (a few minutes; output in {log}) ...", file=sys.stderr)
    with open(log, "w") as out:
        for cmd in (
            [
                "cmake",
                "-S",
                str(source),
                "-B",
                str(build_dir),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                *cmake_args,
            ],
            ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1), "--target", *TOOLS],
        ):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"the llama.cpp build failed: see {log}")
    return bin_dir


def tool(name: str, cmake_args: tuple[str, ...] = ()) -> Path:
    """The path of one built tool, building it first if needed."""
    return build(cmake_args) / name


def add_build_option(ap: argparse.ArgumentParser) -> None:
    """--llama-cmake-arg (repeatable): run the peers of a variant build (an AVX2 proxy, say)."""
    ap.add_argument(
        "--llama-cmake-arg",
        action="append",
        default=[],
        help="a cmake -D option of the llama.cpp tools' build (repeat; --llama-cmake-arg=-DGGML_AVX512=OFF)",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cmake-arg", action="append", default=[], help="an extra cmake -D option (repeat)")
    args = ap.parse_args()
    print(build(tuple(args.cmake_arg)))


if __name__ == "__main__":
    main()
