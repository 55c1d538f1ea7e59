"""Commands: pull (download a model into the store), models (list installed / available), rm."""

from __future__ import annotations

import shutil
import sys
from typing import TYPE_CHECKING

import typer

from vlmcli.cli.app import app, info, print_json

if TYPE_CHECKING:
    from rich.console import Console

_PULL_HELP = (
    "Download a model by name into the local store, ready for `vlm ask` / `vlm classify`.\n\n"
    "Ready GGUF files are downloaded when the model has them; otherwise (or with --from convert) the original "
    "safetensors checkpoint is downloaded and converted here. Files of a pull that failed are kept, so running it "
    "again only fetches what is missing. The store is $VLM_HOME (default: the platform cache folder, e.g. "
    "~/.cache/vlmcli). Set HF_TOKEN for gated repositories.\n\n"
    "Prints the installed model's folder on stdout (its manifest with --json)."
)


def _split_quant(name: str, quant: str | None) -> tuple[str, str | None]:
    """Accept NAME:QUANT as well as NAME --quant QUANT."""
    base, sep, q = name.partition(":")
    if sep and q:
        if quant and quant.upper() != q.upper():
            from vlmcli.errors import ModelError

            raise ModelError(f"two quantizations given: {q} in the name and {quant}", name)
        return base, q
    return name, quant


@app.command(help=_PULL_HELP)
def pull(
    name: str = typer.Argument(..., help="Model name (see `vlm models --available`), optionally NAME:QUANT."),
    quant: str | None = typer.Option(
        None, "--quant", "-q", help="Quantization, e.g. Q8_0, Q4_K_M, F16 (default: the model's)."
    ),
    source: str | None = typer.Option(
        None,
        "--from",
        help="gguf: ready GGUF files; convert: convert the original checkpoint here (default: gguf if offered).",
    ),
    revision: str | None = typer.Option(
        None, "--revision", help="Branch, tag or commit to download (default: the registry's)."
    ),
    force: bool = typer.Option(False, "--force", help="Download and install again even if installed."),
    json_out: bool = typer.Option(False, "--json", help="Print the installed model's record as JSON."),
) -> None:
    if source is not None and source not in ("gguf", "convert"):  # before importing the hub client
        from vlmcli.errors import EXIT_USAGE, VlmError

        raise VlmError(f"--from must be gguf or convert, not {source!r}", exit_code=EXIT_USAGE)
    from vlmcli.store.pull import pull_model

    name, quant = _split_quant(name, quant)
    result = pull_model(name, quant=quant, source=source, revision=revision, force=force, notify=info)
    m = result.model
    if result.already_installed:
        info(f"{m.name} {m.quant} is already installed in {m.path} (use --force to download it again)")
    if json_out:
        print_json(m.to_json())
    else:
        typer.echo(str(m.path))


def _human_size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "kB") else f"{n:.1f} {unit}" if n < 10 else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.0f} GB"


def _stdout_console() -> Console:
    from rich.console import Console

    # Piped output keeps whole rows (rich would otherwise wrap at 80 columns).
    width = None if sys.stdout.isatty() else max(200, shutil.get_terminal_size().columns)
    return Console(highlight=False, width=width, soft_wrap=False)


@app.command(name="models", help="List installed models (or, with --available, the models `vlm pull` knows).")
def models(
    available: bool = typer.Option(
        False, "--available", "-a", help="List the registry: every model `vlm pull` can install."
    ),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
) -> None:
    from rich.table import Table
    from rich.text import Text

    from vlmcli.store.registry import load_registry
    from vlmcli.store.store import Store

    store = Store()
    if available:
        registry = load_registry()
        installed: dict[str, list[str]] = {}
        for m in store.installed():
            installed.setdefault(m.name, []).append(m.quant)
        if json_out:
            for e in registry.entries.values():
                print_json(
                    {
                        "name": e.name,
                        "kind": e.kind,
                        "description": e.description,
                        "repo": e.repo,
                        "revision": e.revision,
                        "default_quant": e.default_quant,
                        "quants": e.quants(),
                        "sources": {
                            s: {"repo": src.repo, "revision": src.revision, "quants": list(e.quants(s))}
                            for s, src in (("gguf", e.gguf), ("convert", e.convert))
                            if src is not None
                        },
                        "license": e.license,
                        "size_mb": e.size_mb,
                        "installed": installed.get(e.name, []),
                        "registry": e.origin,
                    }
                )
            return
        table = Table(title="Models available to `vlm pull`", title_justify="left")
        for col in ("name", "kind", "quantizations", "sources", "size", "license", "installed", "description"):
            table.add_column(col, overflow="fold" if col == "description" else "ellipsis")
        for e in registry.entries.values():
            quants = ", ".join(q + ("*" if q == e.default_quant else "") for q in e.quants())
            table.add_row(
                e.name,
                e.kind,
                quants,
                ", ".join(e.sources()),
                _human_size(e.size_mb * 1e6 if e.size_mb else None),
                e.license,
                ", ".join(installed.get(e.name, [])),
                Text(e.description),
            )
        _stdout_console().print(table)
        info("* default quantization. Add your own models in " + " or ".join(str(p) for p in _user_registries()))
        return

    found = store.installed()
    if json_out:
        for m in found:
            print_json(m.to_json())
        return
    if not found:
        info(f"no models installed in {store.root}; see `vlm models --available`, then `vlm pull NAME`")
        return
    table = Table(title=Text(f"Installed models ({store.root})"), title_justify="left")
    for col in ("name", "kind", "quant", "size", "path", "revision"):
        table.add_column(col, overflow="fold" if col == "path" else "ellipsis")
    for m in found:
        commit = str(m.manifest.get("commit") or "")
        rev = str(m.manifest.get("revision") or "")
        shown = rev if not commit or rev == commit else f"{rev} ({commit[:12]})"
        table.add_row(m.name, m.kind, m.quant, _human_size(m.size_bytes), Text(str(m.path)), shown)
    _stdout_console().print(table)


def _user_registries() -> list[str]:
    from vlmcli.store.registry import user_registry_paths

    return [str(p) for p in reversed(user_registry_paths())]


@app.command(help="Remove an installed model (every quantization of it, or only --quant).")
def rm(
    name: str = typer.Argument(..., help="Installed model name, optionally NAME:QUANT."),
    quant: str | None = typer.Option(None, "--quant", "-q", help="Remove only this quantization."),
) -> None:
    from vlmcli.errors import ModelError
    from vlmcli.store.registry import normalize_quant
    from vlmcli.store.store import Store

    name, quant = _split_quant(name, quant)
    q = normalize_quant(quant) if quant else None
    store = Store()
    have = store.installed_quants(name)
    if not have or (q and not any(m.quant == q for m in have)):
        what = f"{name.lower()} {q}" if q else name.lower()
        installed = ", ".join(f"{m.name}:{m.quant}" for m in store.installed()) or "none"
        raise ModelError(f"not installed (installed: {installed})", what)
    with store.lock(name.lower(), on_wait=lambda: info(f"waiting for a pull of {name} to finish...")):
        removed = store.remove(name, q)
    for m in removed:
        info(f"removed {m.name} {m.quant} ({m.path})")
