"""Commands: lib build (the C API: vlm.h + libvlm)."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcli.cli.app import app, stderr

lib_app = typer.Typer(
    help="The C library (libvlm + vlm.h) for calling the models from C, C++, Rust, Go, Julia...",
    no_args_is_help=True,
)
app.add_typer(lib_app, name="lib")


@lib_app.command()
def build(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder to write vlm.h and libvlm.so (libvlm.dylib on macOS) into."
    ),
    relocatable: bool = typer.Option(
        False, "--relocatable", help="Record the bare library name in linked programs (then link with -Wl,-rpath,OUT)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the compiler command."),
) -> None:
    """Build the shared library and its header; then: cc app.c -IOUT -LOUT -lvlm."""
    from vlmcli.capi.build import build_library

    built = build_library(out, relocatable=relocatable, verbose=verbose)
    rpath = f" -Wl,-rpath,{out.resolve()}" if relocatable else ""
    stderr.print(f"wrote {built.header} and {built.library} (runs on {built.python})", markup=False, soft_wrap=True)
    stderr.print(f"build a program with: cc app.c -I{out} -L{out} -lvlm{rpath}", markup=False, soft_wrap=True)
    print(built.library)
