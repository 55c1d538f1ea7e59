"""Where the process meets llama.cpp: the llama-cpp-python ctypes modules, imported once."""

from __future__ import annotations

import ctypes
import os

from llama_cpp import llama_cpp as llama  # noqa: F401  (re-exported)
from llama_cpp import mtmd_cpp as mtmd  # noqa: F401

_initialised = False


@llama.llama_log_callback
def _drop_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    return None


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
