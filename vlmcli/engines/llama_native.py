"""Where the process meets llama.cpp: the llama-cpp-python ctypes modules, imported once."""

from __future__ import annotations

import ctypes

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
