"""The one check every model file passes before native code sees it: read, right kind, the rules."""

from __future__ import annotations

import os

from vlmcli.errors import ModelError
from vlmcli.gguf.reader import GgufInfo, ModelKind, inspect_gguf
from vlmcli.gguf.rules import check_model

KIND_NAMES = {
    "llm": "a language model GGUF",
    "mmproj": "a vision projector (mmproj) GGUF",
    "clip": "a two-tower CLIP GGUF",
}


def require_kind(path: str | os.PathLike[str], kind: ModelKind, keep_string_arrays: bool = False) -> GgufInfo:
    """inspect_gguf, refuse a file of the wrong kind (a text model passed as mmproj and the reverse),
    then apply the validation table of rules.py (values native code would assert on)."""
    # The language model's vocabulary is read whole: llama.cpp aborts on a duplicate token.
    keep = frozenset({"tokenizer.ggml.tokens"}) if kind == "llm" else frozenset()
    info = inspect_gguf(path, keep_string_arrays, keep)
    if info.kind != kind:
        raise ModelError(f"this is {KIND_NAMES[info.kind]}, expected {KIND_NAMES[kind]}", path)
    check_model(info)
    return info
