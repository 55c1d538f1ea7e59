"""Where the process meets llama.cpp: the llama-cpp-python ctypes modules, imported once."""

from __future__ import annotations

import collections
import ctypes
import os
import re
from typing import Literal, cast

from llama_cpp import llama_cpp as llama  # also imported from here by the engine
from llama_cpp import mtmd_cpp as mtmd

_initialised = False

# ggml log levels (ggml.h): the error lines llama.cpp and mtmd log while their logs are quiet are kept,
# so that a failed load can say why ("error loading model: ...") instead of only that it failed.
_LOG_ERROR, _LOG_CONT = 4, 5
_errors: collections.deque[str] = collections.deque(maxlen=16)
_last_level = 0


@llama.llama_log_callback
def _drop_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    if level != _LOG_CONT:
        _last_level = level
    if _last_level == _LOG_ERROR and text:
        line = text.decode("utf-8", errors="replace").strip()
        if line:
            if level == _LOG_CONT and _errors:
                _errors[-1] += " " + line
            else:
                _errors.append(line)
    return None


def batch_positions(batch: llama.llama_batch) -> ctypes.Array[ctypes.c_int32]:
    """The batch's token positions, one llama_pos each (llama-cpp-python annotates them one level too deep)."""
    return cast("ctypes.Array[ctypes.c_int32]", batch.pos)


def fill_rows(batch: llama.llama_batch, n: int, first_pos: int, logits: Literal["none", "last", "all"]) -> None:
    """The first n rows of a batch (their tokens or embeddings set apart) as one run of sequence 0 from
    first_pos on, with logits for none of them, the last or all."""
    pos = batch_positions(batch)
    batch.n_tokens = n
    for i in range(n):
        pos[i] = first_pos + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = logits == "all"
    if n and logits == "last":
        batch.logits[n - 1] = True


def clear_native_errors() -> None:
    _errors.clear()


def native_error() -> str | None:
    """The most telling error line llama.cpp / mtmd logged since clear_native_errors(), if any: the
    first (the cause; later ones say what failed because of it), without `function_name:` prefixes."""
    if not _errors:
        return None
    line = _FUNCTION_PREFIX.sub("", _errors[0]).strip().rstrip(".")
    # one line, whatever the file held: control characters from its strings escaped
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line) or None


_FUNCTION_PREFIX = re.compile(r"(?<![.\w])[A-Za-z]+_[A-Za-z0-9_]*: ")


def init_backend() -> None:
    global _initialised
    if not _initialised:
        llama.llama_backend_init()
        _initialised = True


def quiet_native_logs() -> None:
    """llama.cpp and mtmd log every load step to stderr; keep stderr for our own messages."""
    init_backend()
    llama.llama_log_set(_drop_log, ctypes.c_void_p())
    mtmd.mtmd_log_set(_drop_log, ctypes.c_void_p())
    mtmd.mtmd_helper_log_set(_drop_log, ctypes.c_void_p())


def extra_buffers_allowed() -> bool:
    """Whether llama.cpp may put weights in its CPU "extra" buffer types (AMX tiles, repacked Q4).

    A build with AMX kernels (compiled on a CPU that reports AMX) faults with an illegal instruction
    at the first AMX tile op in some virtual machines that advertise AMX (seen here on 2-core Xeon VMs:
    `tilezero`, SIGILL), killing the process. With AMX compiled in they stay off unless VLM_AMX=1;
    other builds keep them (the AVX2 repacking of Q4 weights)."""
    if os.environ.get("VLM_AMX", "") not in ("", "0"):
        return True
    return b"AMX_INT8 = 1" not in llama.llama_print_system_info()


def system_info() -> str:
    """llama.cpp's own summary of the build: per backend, the features compiled in and supported here
    ("CPU : SSE3 = 1 | AVX2 = 1 | ... | AMX_INT8 = 1 | OPENMP = 1 | REPACK = 1 |", "CUDA : ARCHS = ...")."""
    return llama.llama_print_system_info().decode("utf-8", errors="replace")


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """{backend: {feature: value}} from system_info() (the format of llama_print_system_info)."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for part in text.split("|"):
        part = part.strip()
        if not part:
            continue
        if " : " in part:  # "CPU : SSE3 = 1": a backend name, then its first feature
            name, _, part = part.partition(" : ")
            current = out.setdefault(name.strip(), {})
        key, sep, value = part.partition("=")
        if current is not None and key.strip():
            current[key.strip()] = value.strip() if sep else ""
    return out


def amx_compiled_in() -> bool:
    """Whether this build has AMX kernels (see extra_buffers_allowed)."""
    return "AMX_INT8 = 1" in system_info()


def supports_gpu_offload() -> bool:
    """Whether llama.cpp can offload layers here: a GPU backend was built in and sees a device."""
    return bool(llama.llama_supports_gpu_offload())


def build_id() -> str:
    """The llama-cpp-python release and libllama's version: what fixes llama.cpp's state layouts."""
    import llama_cpp

    return f"{getattr(llama_cpp, '__version__', '?')}/{llama_cpp_version()}"


def llama_cpp_version() -> str:
    """libllama's version string (llama_version(), e.g. "0.5.0-dev")."""
    return (llama.llama_version() or b"").decode("utf-8", errors="replace")
