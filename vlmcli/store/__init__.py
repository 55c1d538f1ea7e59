"""The model store: registry (models.toml), installed models, pulls from the Hugging Face Hub, and
`resolve_model`, which turns a `--model` value into checked GGUF files."""

from vlmcli.store.pull import PullResult, pull_model
from vlmcli.store.registry import DEFAULT_MODELS, ModelEntry, Registry, load_registry
from vlmcli.store.resolve import ResolvedModel, resolve_model
from vlmcli.store.store import InstalledModel, Store, StoreError, store_root

__all__ = [
    "DEFAULT_MODELS",
    "InstalledModel",
    "ModelEntry",
    "PullResult",
    "Registry",
    "ResolvedModel",
    "Store",
    "StoreError",
    "load_registry",
    "pull_model",
    "resolve_model",
    "store_root",
]
