"""Quantize a language-model GGUF with llama.cpp's own quantizer (llama_model_quantize).

This is `llama-quantize SRC DST TYPE` through llama-cpp-python's bindings: the same mixes
(Q4_K_M keeps some tensors at Q6_K, etc.) as the GGUFs ggml-org publishes. The vision projector
is never quantized here: the converter writes it F16 or Q8_0 directly, as llama.cpp does.

Run as a script: python scripts/convert/quantize.py SRC.gguf DST.gguf --quant Q4_K_M
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source tree (sys.path[0] is this folder)
    import _script

    _script.make_vlmcli_convert_importable()

from vlmcli.errors import ModelError, VlmError

# Type name (as llama.cpp and ggml-org file names spell it) -> llama_ftype value.
QUANT_FTYPES: dict[str, int] = {
    "F16": 1,  # LLAMA_FTYPE_MOSTLY_F16
    "Q8_0": 7,  # LLAMA_FTYPE_MOSTLY_Q8_0
    "Q4_K_M": 15,  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    "Q5_K_M": 17,  # LLAMA_FTYPE_MOSTLY_Q5_K_M
}


def check_quant_name(quant: str) -> str:
    """The canonical quant name, or VlmError listing the valid ones."""
    q = quant.upper()
    if q not in QUANT_FTYPES:
        raise VlmError(f"unknown quantization {quant!r}; valid: {', '.join(QUANT_FTYPES)}")
    return q


@contextlib.contextmanager
def _quiet_llama_log(verbose: bool) -> Iterator[None]:
    """llama-cpp-python prints llama.cpp's log to stderr unless its logger level says otherwise."""
    from llama_cpp import _logger

    old = _logger.logger.level
    if not verbose:
        _logger.logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        _logger.logger.setLevel(old)


def quantize_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    quant: str,
    n_threads: int | None = None,
    *,
    verbose: bool = False,
) -> Path:
    """Quantize the llama-arch GGUF `src` to `dst` as `quant` (F16, Q8_0, Q4_K_M, Q5_K_M)."""
    from vlmcli.gguf.validate import require_kind

    q = check_quant_name(quant)
    src_path, dst_path = Path(src), Path(dst)
    info = require_kind(src_path, "llm")  # llama.cpp aborts on some bad files: check first
    if info.arch != "llama":
        raise ModelError(f"architecture {info.arch} is not supported here (expected llama)", src_path)
    if dst_path.resolve() == src_path.resolve():
        raise VlmError("output file is the input file", dst_path)
    if dst_path.is_dir():
        raise VlmError("output path is a folder, expected a .gguf file name", dst_path)
    dst_path.parent.mkdir(parents=True, exist_ok=True)

    import llama_cpp

    llama_cpp.llama_backend_init()  # idempotent; sets up ggml's type tables
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[q]
    params.nthread = n_threads if n_threads and n_threads > 0 else (os.cpu_count() or 1)
    partial = dst_path.with_name(dst_path.name + ".partial")
    try:
        with _quiet_llama_log(verbose):
            rc = llama_cpp.llama_model_quantize(os.fsencode(src_path), os.fsencode(partial), params)
        if rc != 0 or not partial.is_file():
            raise ModelError(
                f"llama.cpp could not quantize this file to {q} (llama_model_quantize returned {rc})", src_path
            )
        os.replace(partial, dst_path)
    finally:
        partial.unlink(missing_ok=True)
    return dst_path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Quantize a language-model GGUF with llama.cpp's quantizer.")
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--quant", default="Q4_K_M", help=f"one of {', '.join(QUANT_FTYPES)} (default Q4_K_M)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        print(quantize_gguf(args.src, args.dst, args.quant, args.threads))
    except VlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
