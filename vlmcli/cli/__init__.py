"""Command-line entry point: `vlm`. Commands live in the modules imported below."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import typer

from vlmcli.cli.app import app, stderr
from vlmcli.errors import EXIT_ERROR, EXIT_INTERRUPTED, VlmError

# Importing the command modules registers their commands on `app`.
from vlmcli.cli import vlm as _vlm  # noqa: E402,F401  ask, caption
from vlmcli.cli import clip as _clip  # noqa: E402,F401  classify, embed
from vlmcli.cli import store as _store  # noqa: E402,F401  pull, models, rm
from vlmcli.cli import convert as _convert  # noqa: E402,F401  convert, quantize
from vlmcli.cli import lib as _lib  # noqa: E402,F401  lib build

__all__ = ["app", "main"]


def _cli_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(exit, abort, usage-error) exception types. Newer Typer releases carry their own copy of
    Click (and no longer depend on Click itself); older ones raise Click's: catch whichever exist."""
    exits: list[type] = [typer.Exit]
    aborts: list[type] = [typer.Abort, KeyboardInterrupt]
    usage: list[type] = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.ClickException)
        exits += [mod.Exit] if hasattr(mod, "Exit") else []
        aborts += [mod.Abort] if hasattr(mod, "Abort") else []
    return tuple(exits), tuple(aborts), tuple(usage)


_EXIT, _ABORT, _USAGE = _cli_exceptions()


def _fail(message: str, code: int) -> None:
    stderr.print(f"vlm: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. `--debug` (anywhere on the line, or VLM_DEBUG=1) shows tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("VLM_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        rc = app(args=args, prog_name="vlm", standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except _EXIT as e:
        sys.exit(e.exit_code)
    except _USAGE as e:
        e.show()
        sys.exit(e.exit_code)
    except _ABORT:
        if debug:
            traceback.print_exc()
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # `vlm ... | head`: the reader left; not an error worth a message.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_ERROR)
    except VlmError as e:
        if debug:
            traceback.print_exc()
        _fail(str(e), e.exit_code)
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback unless --debug
        if debug:
            traceback.print_exc()
        _fail(f"{type(e).__name__}: {e} (run with --debug for details)", EXIT_ERROR)
