"""Turn a `--model` value into model files: a store name (pulled on first use), a GGUF path, or a folder.

Every file returned has passed `gguf_check.require_kind`, so the engines can hand it to llama.cpp /
ggml without risking an abort on a wrong or corrupt file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlmcli.errors import ModelError
from vlmcli.gguf.reader import GgufInfo, ModelKind, inspect_gguf
from vlmcli.gguf.validate import require_kind
from vlmcli.store.registry import DEFAULT_MODELS, env_flag, load_registry, normalize_quant
from vlmcli.store.store import MANIFEST, InstalledModel, Store, read_manifest


@dataclass
class ResolvedModel:
    kind: str  # "vlm" or "clip"
    name: str  # the store name, or the file / folder name
    model: Path  # vlm: the language model GGUF; clip: the two-tower CLIP GGUF
    mmproj: Path | None  # vlm: the vision projector GGUF; clip: None
    quant: str | None  # e.g. "Q8_0" (from the store manifest, or read from the GGUF tensors)
    source: str  # "store" (an installed model), "file" (a GGUF path) or "folder"
    detail: str | None = None  # the registry's default image detail for this model, if it sets one


_ENGINE_KIND: dict[str, ModelKind] = {"vlm": "llm", "clip": "clip"}  # gguf_check's name for the main file of each kind


def resolve_model(
    spec: str | None,
    kind: Literal["vlm", "clip"],
    *,
    mmproj: str | None = None,
    quant: str | None = None,
    offline: bool | None = None,
    pull: bool = True,
    notify: Callable[[str], None] | None = None,
) -> ResolvedModel:
    """Resolve `spec` (None = the default model of `kind`) to checked files; may pull a store model.

    spec: a store name (optionally NAME:QUANT), a .gguf file, or a folder holding the model's GGUFs.
    offline: None = follow HF_HUB_OFFLINE; when offline a missing store model is an error naming the
    `vlm pull` command to run. pull=False: never download. notify: receives the notice about an
    automatic pull (the CLI prints it on stderr).
    """
    if kind not in _ENGINE_KIND:
        raise ValueError(f"kind must be 'vlm' or 'clip', not {kind!r}")
    if mmproj is not None and kind != "vlm":
        raise ModelError("--mmproj only applies to vision-language (vlm) models", mmproj)
    if spec is None or spec.strip() == "":
        spec = DEFAULT_MODELS[kind]
    if offline is None:
        offline = env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE")

    name, name_quant = _split_name(spec)
    if name is not None and _is_store_name(name):
        if quant is not None and name_quant is not None and normalize_quant(quant) != name_quant:
            raise ModelError(f"two quantizations given: {name_quant} in the name and {normalize_quant(quant)}", spec)
        q = name_quant or (normalize_quant(quant) if quant else None)
        return _resolve_store(name, kind, q, mmproj, offline, pull, notify)

    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_folder(path, kind, mmproj)
    if path.exists():
        return _resolve_file(path, kind, mmproj)
    if os.sep in spec or "/" in spec or spec.lower().endswith(".gguf"):
        raise ModelError("no such model file or folder", spec)
    raise ModelError("unknown model: not a file, a folder or a known model name (see `vlm models --available`)", spec)


# ---------------------------------------------------------------------------------------------
# Store names


def _split_name(spec: str) -> tuple[str | None, str | None]:
    """'smolvlm2-256m:q4_k_m' -> ('smolvlm2-256m', 'Q4_K_M'); paths -> (None, None)."""
    if "/" in spec or os.sep in spec or spec.lower().endswith(".gguf"):
        return None, None
    base, sep, q = spec.partition(":")
    if sep and (not q or len(base) <= 1):  # "C:" drive letters and empty tags are not names
        return None, None
    try:
        return base.lower(), (normalize_quant(q) if sep else None)
    except ModelError:
        return None, None


def _is_store_name(name: str) -> bool:
    return load_registry().get(name) is not None or bool(Store().installed_quants(name))


def _pull_command(name: str, quant: str | None) -> str:
    return f"vlm pull {name}" + (f" --quant {quant}" if quant else "")


def _resolve_store(
    name: str,
    kind: str,
    quant: str | None,
    mmproj: str | None,
    offline: bool,
    pull: bool,
    notify: Callable[[str], None] | None,
) -> ResolvedModel:
    entry = load_registry().get(name)
    if entry is not None and entry.kind != kind:
        default = DEFAULT_MODELS[kind]
        raise ModelError(f"this is a {entry.kind} model; this command needs a {kind} model (e.g. {default})", name)
    store = Store()
    installed = store.find(name, quant, prefer=entry.default_quant if entry else None)
    if installed is None:
        if entry is None:
            raise ModelError("unknown model (see `vlm models --available`)", name)
        if offline:
            raise ModelError(
                f"not installed, and offline mode is on (HF_HUB_OFFLINE=1 or --offline); "
                f"when online, run: {_pull_command(name, quant)}",
                name,
            )
        if not pull:
            raise ModelError(f"not installed; run: {_pull_command(name, quant)}", name)
        if notify:
            notify(f"{name} is not installed yet: pulling it now ({_pull_command(name, quant)})")
        from vlmcli.store.pull import pull_model

        installed = pull_model(name, quant=quant, notify=notify).model
    return _from_installed(installed, kind, mmproj)


def _check_installed_file(m: InstalledModel, path: Path, role_kind: ModelKind) -> None:
    """Installed files had their GGUF kind checked by the pull (parsing a GGUF with a real vocabulary
    takes seconds); here only a cheap check that the file is still the one installed: its size."""
    size = (m.manifest.get("sizes") or {}).get(path.name)
    try:
        actual = path.stat().st_size
    except OSError:
        raise ModelError(f"installed file is missing; run: vlm pull {m.name} --quant {m.quant} --force", path) from None
    if size is None:
        require_kind(path, role_kind)  # a manifest without sizes: check the file itself
    elif actual != size:
        raise ModelError(
            f"installed file changed size ({actual} bytes, installed {size}); "
            f"run: vlm pull {m.name} --quant {m.quant} --force",
            path,
        )


def _from_installed(m: InstalledModel, kind: str, mmproj: str | None) -> ResolvedModel:
    if m.kind and m.kind != kind:
        raise ModelError(f"this is a {m.kind} model; this command needs a {kind} model", m.name)
    _check_installed_file(m, m.model_path, _ENGINE_KIND[kind])
    proj = None
    if kind == "vlm":
        if mmproj:
            proj = Path(mmproj).expanduser()
            require_kind(proj, "mmproj")
        else:
            proj = m.mmproj_path
            if proj is None:
                raise ModelError(
                    f"installed model has no vision projector (mmproj); run: vlm pull {m.name} --force", m.path
                )
            _check_installed_file(m, proj, "mmproj")
    entry = load_registry().get(m.name)
    detail = entry.detail if entry is not None else None
    return ResolvedModel(
        kind=kind, name=m.name, model=m.model_path, mmproj=proj, quant=m.quant, source="store", detail=detail
    )


# ---------------------------------------------------------------------------------------------
# Paths


def _resolve_file(path: Path, kind: str, mmproj: str | None) -> ResolvedModel:
    if kind == "vlm" and not mmproj and path.name.lower().startswith("mmproj"):
        require_kind(path, "llm")  # a projector given as the model: say so, not "no projector"
    # Find the projector first: a missing one is reported before the (slower) GGUF parsing.
    proj = (Path(mmproj).expanduser() if mmproj else _mmproj_beside(path)) if kind == "vlm" else None
    info = require_kind(path, _ENGINE_KIND[kind])
    if proj is not None:
        require_kind(proj, "mmproj")
    return ResolvedModel(kind=kind, name=path.stem, model=path, mmproj=proj, quant=info.file_type, source="file")


def _ggufs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")


def _mmproj_beside(model: Path) -> Path:
    candidates = [p for p in _ggufs(model.parent) if p.name.lower().startswith("mmproj") and p != model]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelError("no vision projector: pass --mmproj FILE (no mmproj*.gguf file next to the model)", model)
    # Several projectors (e.g. Q8_0 and f16): take the one named after the model, as ggml-org names them.
    paired = [p for p in candidates if p.name.lower() == f"mmproj-{model.name.lower()}"]
    if len(paired) == 1:
        return paired[0]
    names = ", ".join(p.name for p in candidates)
    raise ModelError(f"several vision projectors next to the model ({names}): pass --mmproj FILE", model)


def _resolve_folder(folder: Path, kind: str, mmproj: str | None) -> ResolvedModel:
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    if manifest is not None:  # a model folder of a store (this one or another)
        m = InstalledModel(
            name=str(manifest.get("name", folder.name)),
            kind=str(manifest.get("kind", "")),
            quant=str(manifest.get("quant", "")),
            path=folder,
            manifest=manifest,
        )
        return _from_installed(m, kind, mmproj)
    infos: list[GgufInfo] = [inspect_gguf(p) for p in _ggufs(folder)]
    if not infos:
        raise ModelError("no .gguf files in this folder", folder)
    main_kind = _ENGINE_KIND[kind]
    mains = [i for i in infos if i.kind == main_kind]
    names = ", ".join(i.path.name for i in infos)
    what = "language model" if kind == "vlm" else "two-tower CLIP"
    if not mains:
        raise ModelError(f"no {what} GGUF in this folder (found: {names})", folder)
    if len(mains) > 1:
        several = ", ".join(i.path.name for i in mains)
        raise ModelError(f"several {what} GGUFs in this folder ({several}): pass one file instead", folder)
    main = mains[0]
    proj = None
    if kind == "vlm":
        if mmproj:
            proj = Path(mmproj).expanduser()
            require_kind(proj, "mmproj")
        else:
            projs = [i for i in infos if i.kind == "mmproj"]
            if not projs:
                raise ModelError(f"no vision projector (mmproj) GGUF in this folder (found: {names})", folder)
            if len(projs) > 1:
                several = ", ".join(i.path.name for i in projs)
                raise ModelError(f"several vision projectors in this folder ({several}): pass --mmproj FILE", folder)
            proj = projs[0].path
    return ResolvedModel(
        kind=kind, name=folder.name, model=main.path, mmproj=proj, quant=main.file_type, source="folder"
    )
