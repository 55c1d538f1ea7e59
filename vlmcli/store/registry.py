"""The model registry: models.toml shipped with the package, plus the user's own models.toml files.

A registry entry says where a model comes from (a repository of ready GGUF files and/or the original
safetensors checkpoint to convert), which quantizations exist and which one `vlm pull NAME` installs.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlmcli.errors import ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ModelKindName = Literal["vlm", "clip"]
SourceName = Literal["gguf", "convert"]
KINDS: tuple[str, ...] = ("vlm", "clip")
SOURCES: tuple[str, ...] = ("gguf", "convert")
DEFAULT_MODELS: dict[str, str] = {"vlm": "smolvlm2-256m", "clip": "clip-vit-b32"}

# What a convert source downloads when its entry gives no `files`: the configs, tokenizer files and
# the transformers-layout weights at the repository root (not onnx/, not open_clip_*.safetensors).
DEFAULT_CONVERT_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_QUANT_RE = re.compile(r"^[A-Z0-9_]+$")


def normalize_quant(quant: str) -> str:
    """Quantization names are case-insensitive on the command line: q8_0, f16 -> Q8_0, F16."""
    q = quant.strip().upper()
    if not _QUANT_RE.match(q):
        raise ModelError(f"not a quantization name: {quant!r} (e.g. Q8_0, Q4_K_M, F16)")
    return q


@dataclass(frozen=True)
class GgufFiles:
    model: str
    mmproj: str | None = None

    def names(self) -> list[str]:
        return [self.model] + ([self.mmproj] if self.mmproj else [])


@dataclass(frozen=True)
class GgufSource:
    repo: str
    revision: str
    quants: dict[str, GgufFiles]


@dataclass(frozen=True)
class ConvertSource:
    repo: str
    revision: str
    quants: tuple[str, ...]
    files: tuple[str, ...] = DEFAULT_CONVERT_FILES


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # "vlm" | "clip"
    repo: str
    revision: str
    default_quant: str
    description: str = ""
    license: str = ""
    size_mb: float | None = None
    gguf: GgufSource | None = None
    convert: ConvertSource | None = None
    detail: str | None = None  # vlm: the default image detail (low | high | auto) for this model
    origin: str = ""  # the models.toml file the entry came from

    def quants(self, source: str | None = None) -> list[str]:
        """Quantizations available from `source` (or from any source), default first."""
        found: list[str] = []
        if self.gguf and source in (None, "gguf"):
            found += list(self.gguf.quants)
        if self.convert and source in (None, "convert"):
            found += [q for q in self.convert.quants if q not in found]
        if self.default_quant in found:
            found.remove(self.default_quant)
            found.insert(0, self.default_quant)
        return found

    def sources(self) -> list[str]:
        return [s for s, v in (("gguf", self.gguf), ("convert", self.convert)) if v is not None]

    def pick_source(self, quant: str, prefer: str | None = None) -> str:
        """The source to pull `quant` from: `prefer` if given, else ready GGUFs before conversion."""
        order = [prefer] if prefer else ["gguf", "convert"]
        for s in order:
            if s == "gguf" and self.gguf and quant in self.gguf.quants:
                return s
            if s == "convert" and self.convert and quant in self.convert.quants:
                return s
        if prefer and prefer not in self.sources():
            raise ModelError(
                f"no {prefer!r} source for this model (it has: {', '.join(self.sources()) or 'none'})", self.name
            )
        where = f" from {prefer}" if prefer else ""
        raise ModelError(
            f"quantization {quant} is not available{where} (available: {', '.join(self.quants(prefer)) or 'none'})",
            self.name,
        )


@dataclass
class Registry:
    entries: dict[str, ModelEntry] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # the models.toml files read, lowest priority first

    def get(self, name: str) -> ModelEntry | None:
        return self.entries.get(name.lower())

    def require(self, name: str) -> ModelEntry:
        entry = self.get(name)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise ModelError(f"unknown model (known: {known}; see `vlm models --available`)", name)
        return entry


# ----------------------------------------------------------------------------------------------
# Reading TOML: the standard library's tomllib (3.11+), its backport tomli below.


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ModelError(f"invalid TOML: {e}", path) from None


# ----------------------------------------------------------------------------------------------
# Entries


def _want(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str, path: Path, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise ModelError(f"{where}: missing {key!r}", path)
        return default
    value = d[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise ModelError(f"{where}: {key!r} has the wrong type ({type(value).__name__})", path)
    return value


def _entry_from_table(name: str, t: dict[str, Any], path: Path) -> ModelEntry:
    where = f"[models.{name}]"
    if not _NAME_RE.match(name):
        raise ModelError(f"{where}: model names use lower-case letters, digits, '-', '_' and '.'", path)
    kind = _want(t, "kind", str, where, path)
    if kind not in KINDS:
        raise ModelError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}", path)
    repo = _want(t, "repo", str, where, path, default="")
    revision = _want(t, "revision", str, where, path, default="main")

    gguf = None
    if "gguf" in t:
        g = _want(t, "gguf", dict, where, path)
        gw = f"[models.{name}.gguf]"
        quants: dict[str, GgufFiles] = {}
        for q, files in _want(g, "quants", dict, gw, path).items():
            qw = f"{gw}.quants.{q}"
            if not isinstance(files, dict):
                raise ModelError(f"{qw} must be a table with model = ... (and mmproj = ... for vlm)", path)
            mmproj = _want(files, "mmproj", str, qw, path, default=None)
            if kind == "vlm" and not mmproj:
                raise ModelError(f"{qw}: a vlm needs mmproj = the vision projector file", path)
            quants[normalize_quant(q)] = GgufFiles(
                _want(files, "model", str, qw, path), mmproj if kind == "vlm" else None
            )
        if not quants:
            raise ModelError(f"{gw}: no [...quants.QUANT] tables", path)
        gguf = GgufSource(_want(g, "repo", str, gw, path), _want(g, "revision", str, gw, path, default="main"), quants)

    convert = None
    if "convert" in t:
        c = _want(t, "convert", dict, where, path)
        cw = f"[models.{name}.convert]"
        crepo = _want(c, "repo", str, cw, path, default=repo)
        if not crepo:
            raise ModelError(f"{cw}: needs repo = ... (or repo in {where})", path)
        cquants = tuple(normalize_quant(q) for q in _want(c, "quants", list, cw, path, default=["F16"]))
        files = tuple(_want(c, "files", list, cw, path, default=list(DEFAULT_CONVERT_FILES)))
        convert = ConvertSource(crepo, _want(c, "revision", str, cw, path, default=revision), cquants, files)

    if gguf is None and convert is None:
        raise ModelError(f"{where}: needs a [models.{name}.gguf] or [models.{name}.convert] source", path)
    entry_quants = (list(gguf.quants) if gguf else []) + (list(convert.quants) if convert else [])
    default_quant = normalize_quant(_want(t, "default_quant", str, where, path, default=entry_quants[0]))
    if default_quant not in entry_quants:
        raise ModelError(f"{where}: default_quant {default_quant} is not offered by any source", path)
    size = _want(t, "size_mb", (int, float), where, path, default=None)
    detail = _want(t, "detail", str, where, path, default=None)
    if detail is not None and (kind != "vlm" or detail not in ("low", "high", "auto")):
        raise ModelError(f"{where}: detail is for vlm models and is one of low, high, auto", path)
    return ModelEntry(
        name=name,
        kind=kind,
        repo=repo or (convert.repo if convert else gguf.repo if gguf else ""),
        revision=revision,
        default_quant=default_quant,
        description=_want(t, "description", str, where, path, default=""),
        license=_want(t, "license", str, where, path, default=""),
        size_mb=float(size) if size is not None else None,
        gguf=gguf,
        convert=convert,
        detail=detail,
        origin=str(path),
    )


def read_registry_file(path: Path) -> dict[str, ModelEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelError(f"cannot read model registry ({e.strerror})", path) from None
    data = _parse_toml(text, path)
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ModelError("'models' must be a table", path)
    return {name.lower(): _entry_from_table(name.lower(), t, path) for name, t in models.items()}


def package_registry_path() -> Path:
    return Path(__file__).resolve().parent.parent / "models.toml"


def user_registry_paths() -> list[Path]:
    """User registries, lowest priority first: the platform config dir, then the store ($VLM_HOME)."""
    from vlmcli.store.store import config_dir, store_root

    return [config_dir() / "models.toml", store_root() / "models.toml"]


def load_registry() -> Registry:
    """The package registry with the user's entries on top (same name: the user's entry wins)."""
    reg = Registry()
    pkg = package_registry_path()
    reg.entries.update(read_registry_file(pkg))
    reg.files.append(pkg)
    for p in user_registry_paths():
        if p.is_file():
            reg.entries.update(read_registry_file(p))
            reg.files.append(p)
    return reg


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
