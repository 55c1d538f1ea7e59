"""`vlm pull`: download a registry model (ready GGUFs, or a checkpoint converted here) into the store.

Steps, all under the store lock of the model: resolve the revision to a commit and list its files
(sizes, sha256s); download the needed files into downloads/ (kept if the pull fails, so a retry only
fetches what is missing); verify each against the Hub's checksum; convert if the source is a
safetensors checkpoint; check the GGUF kinds; write the manifest; rename the finished folder into
models/. Nothing is installed unless every step succeeded.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmcli import __version__
from vlmcli.errors import ModelError, VlmError
from vlmcli.store import hub
from vlmcli.store.registry import ModelEntry, Registry, env_flag, load_registry, normalize_quant
from vlmcli.store.store import InstalledModel, Store, StoreError, store_os_error, write_manifest

Notify = Callable[[str], None]


@dataclass
class PullResult:
    model: InstalledModel
    already_installed: bool


def _mb(n: int | float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def choose_quant(entry: ModelEntry, quant: str | None, source: str | None) -> str:
    if quant is not None:
        return normalize_quant(quant)
    if source is None or entry.default_quant in entry.quants(source):
        return entry.default_quant
    offered = entry.quants(source)
    if not offered:
        raise ModelError(f"no {source!r} source for this model (it has: {', '.join(entry.sources())})", entry.name)
    return offered[0]


def is_offline() -> bool:
    return env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE")


def pull_model(
    name: str,
    *,
    quant: str | None = None,
    source: str | None = None,
    revision: str | None = None,
    force: bool = False,
    notify: Notify | None = None,
    progress: bool | None = None,
    store: Store | None = None,
    registry: Registry | None = None,
) -> PullResult:
    """Install registry model `name` (at `quant`, from `source` "gguf"/"convert", at `revision`)."""
    say: Notify = notify or (lambda _msg: None)
    registry = registry or load_registry()
    entry = registry.require(name)
    if source is not None and source not in ("gguf", "convert"):
        raise ModelError(f"unknown source {source!r} (use gguf or convert)", entry.name)
    quant = choose_quant(entry, quant, source)
    src = entry.pick_source(quant, prefer=source)
    store = store or Store()

    if not force:
        have = store.find(entry.name, quant)
        if have is not None and _matches_request(have, revision, source):
            return PullResult(have, already_installed=True)
    if is_offline():
        raise VlmError(f"cannot pull {entry.name}: offline mode is on (HF_HUB_OFFLINE=1)", entry.name)

    store.ensure_writable()

    def waiting() -> None:
        say(f"waiting for another pull of {entry.name} to finish...")

    with store.lock(entry.name, on_wait=waiting):
        # Another pull may have installed it while we waited for the lock.
        have = store.find(entry.name, quant)
        if have is not None and not force and _matches_request(have, revision, source):
            return PullResult(have, already_installed=True)
        store.clean_tmp(entry.name)
        try:
            model = _pull_locked(entry, quant, src, revision, store, say, progress)
        except OSError as e:
            raise store_os_error(e, f"install {entry.name}", e.filename or store.root) from None
        return PullResult(model, already_installed=False)


def _matches_request(model: InstalledModel, revision: str | None, source: str | None) -> bool:
    """Whether the installed model is what was asked for (an explicit --from/--revision must match)."""
    if source is not None and model.manifest.get("source") != source:
        return False
    if revision is None:
        return True
    commit = str(model.manifest.get("commit") or "")
    return revision == model.manifest.get("revision") or (len(revision) >= 7 and commit.startswith(revision))


def _safe_dirname(repo: str, commit: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", repo) + "@" + commit


def _pull_locked(
    entry: ModelEntry,
    quant: str,
    src: str,
    revision: str | None,
    store: Store,
    say: Notify,
    progress: bool | None,
) -> InstalledModel:
    if src == "gguf":
        assert entry.gguf is not None
        repo, rev = entry.gguf.repo, revision or entry.gguf.revision
    else:
        assert entry.convert is not None
        repo, rev = entry.convert.repo, revision or entry.convert.revision

    snapshot = hub.fetch_snapshot(repo, rev)
    wanted = _files_to_fetch(entry, quant, src, snapshot)
    total = sum(snapshot.files[f].size or 0 for f in wanted)
    # The checkpoint folder keeps the repository's name: converters name their output after it.
    downloads = store.downloads_for(entry.name) / _safe_dirname(repo, snapshot.commit) / repo.rsplit("/", 1)[-1]
    _check_space(store, downloads, wanted, snapshot, factor=1 if src == "gguf" else 2)

    say(
        f"pulling {entry.name} {quant} from {repo} (revision {rev}, commit {snapshot.commit[:12]}): "
        f"{len(wanted)} file{'s' if len(wanted) != 1 else ''}, {_mb(total)}"
    )
    downloads.mkdir(parents=True, exist_ok=True)
    fetched: dict[str, tuple[Path, str]] = {}
    for name in wanted:
        fetched[name] = hub.download_file(snapshot, name, downloads, progress=progress)

    staging = store.new_staging_dir(entry.name)
    try:
        if src == "gguf":
            assert entry.gguf is not None
            files = entry.gguf.quants[quant]
            roles = {"model": files.model}
            if files.mmproj:
                roles["mmproj"] = files.mmproj
            sha256s = {}
            for _role, fname in roles.items():
                _link_or_move(fetched[fname][0], staging / fname)
                sha256s[fname] = fetched[fname][1]
            _check_kinds(entry, staging, roles)
            extra: dict[str, Any] = {}
        else:
            say(f"converting {entry.name} to {quant}...")
            roles = _convert(entry, downloads, staging, quant)
            sha256s = {f: hub.sha256_file(staging / f) for f in roles.values()}
            extra = {"source_files": {f: fetched[f][1] for f in wanted}}

        hub_repo_url = f"{hub.endpoint()}/{repo}"
        store_manifest = {
            "name": entry.name,
            "kind": entry.kind,
            "quant": quant,
            "source": src,
            "repo": repo,
            "url": hub_repo_url,
            "revision": rev,
            "commit": snapshot.commit,
            "files": roles,
            "sha256": sha256s,
            "sizes": {f: (staging / f).stat().st_size for f in roles.values()},
            "license": entry.license,
            "vlmcli_version": __version__,
            **extra,
        }
        write_manifest(staging, store_manifest)
        installed = store.install(staging, entry.name, quant)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # The files now live in the model's folder; what is left in downloads/ is not needed.
    shutil.rmtree(store.downloads_for(entry.name), ignore_errors=True)
    say(f"installed {entry.name} {quant} ({_mb(installed.size_bytes)}) in {installed.path}")
    return installed


def _files_to_fetch(entry: ModelEntry, quant: str, src: str, snapshot: hub.RepoSnapshot) -> list[str]:
    if src == "gguf":
        assert entry.gguf is not None
        names = entry.gguf.quants[quant].names()
        missing = [n for n in names if n not in snapshot.files]
        if missing:
            ggufs = sorted(f for f in snapshot.files if f.endswith(".gguf"))
            raise hub.HubError(
                f"file not found at revision {snapshot.revision} "
                f"(the repository has: {', '.join(ggufs) or 'no .gguf files'})",
                f"{snapshot.repo}/{missing[0]}",
            )
        return names
    assert entry.convert is not None
    # Only files at the repository root: real repos also carry onnx/ exports and other formats.
    names = sorted(
        f for f in snapshot.files if "/" not in f and any(fnmatch.fnmatchcase(f, p) for p in entry.convert.files)
    )
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise hub.HubError(
            f"not a transformers safetensors checkpoint at revision {snapshot.revision} "
            "(needs config.json and model*.safetensors)",
            snapshot.repo,
        )
    return names


def _check_space(store: Store, downloads: Path, wanted: list[str], snapshot: hub.RepoSnapshot, factor: int) -> None:
    """Fail before downloading when the store's disk clearly cannot hold the model."""
    need = 0
    for f in wanted:
        size = snapshot.files[f].size or 0
        have = downloads / f
        need += size * factor - (have.stat().st_size if have.is_file() else 0)
    try:
        free = shutil.disk_usage(store.root).free
    except OSError:
        return
    if need > free:
        raise StoreError(
            f"not enough free space: the pull needs about {_mb(need)}, {_mb(free)} free; "
            "free some space or set VLM_HOME to a folder on another disk",
            store.root,
        )


def _link_or_move(src: Path, dst: Path) -> None:
    """Hard-link (keeps the download for a retry if the install fails), else move: never copy GBs."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        os.replace(src, dst)


def _check_kinds(entry: ModelEntry, folder: Path, roles: dict[str, str]) -> None:
    """The files must be what the entry says: a language model + projector, or a two-tower CLIP."""
    from vlmcli.gguf.validate import require_kind

    if entry.kind == "vlm":
        require_kind(folder / roles["model"], "llm")
        require_kind(folder / roles["mmproj"], "mmproj")
    else:
        require_kind(folder / roles["model"], "clip")


def _convert(entry: ModelEntry, checkpoint: Path, out_dir: Path, quant: str) -> dict[str, str]:
    """Run the project's converter and name the roles of what it wrote."""
    try:
        from vlmcli.convert import convert_checkpoint
    except ImportError as e:
        raise ModelError(f"the converter is not available in this installation ({e})", entry.name) from None
    from vlmcli.gguf.reader import inspect_gguf

    outputs = [Path(p) for p in convert_checkpoint(checkpoint, out_dir, quant)]
    roles: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for p in outputs:
        if p.parent.resolve() != out_dir.resolve():
            _link_or_move(p, out_dir / p.name)
            p = out_dir / p.name
        kind = inspect_gguf(p).kind
        role = {"llm": "model", "clip": "model", "mmproj": "mmproj"}[kind]
        if role in roles:
            raise ModelError(f"the converter wrote two {kind} files ({roles[role]}, {p.name})", out_dir)
        roles[role] = p.name
        kinds[role] = kind
    want = {"vlm": {"model": "llm", "mmproj": "mmproj"}, "clip": {"model": "clip"}}[entry.kind]
    if kinds != want:
        raise ModelError(f"the converter wrote {sorted(roles.values())}, expected a {entry.kind} model", out_dir)
    return roles
