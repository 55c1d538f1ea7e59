"""The model store: registry (models.toml), installed models, pulls from the Hugging Face Hub, and
`resolve_model`, which turns a `--model` value into checked GGUF files.

Names are imported from their modules on first use: `vlm models` reads the registry without
loading the GGUF reader (and numpy) that resolving a model needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PullResult": "pull",
    "pull_model": "pull",
    "DEFAULT_MODELS": "registry",
    "ModelEntry": "registry",
    "Registry": "registry",
    "load_registry": "registry",
    "ResolvedModel": "resolve",
    "resolve_model": "resolve",
    "InstalledModel": "store",
    "Store": "store",
    "StoreError": "store",
    "store_root": "store",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"vlmcli.store.{_WHERE[name]}"), name)
