"""Command-line entry point: `vlm`. Commands live in the modules imported below."""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Protocol, cast

import typer

from vlmcli.cli import batch, chat, clip, convert, doctor, eval, index, lib, serve, store, vlm
from vlmcli.cli.app import app, lighten_help_flags, stderr
from vlmcli.cli.messages import describe
from vlmcli.errors import DEBUG_ENV, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, VlmError, debugging

__all__ = ["app", "main"]

# Importing the command modules registered their commands on `app`, in the order `vlm --help` lists
# them: classify, embed (clip); convert, quantize; doctor; eval vqa, caption, zeroshot, retrieval;
# index, search, dupes; lib build; serve; pull, models, rm (store); ask, caption (vlm).
COMMAND_MODULES = (chat, clip, convert, doctor, eval, index, lib, serve, store, vlm)
lighten_help_flags(app)

_Kinds = tuple[type[BaseException], ...]


class _ExitRequest(Protocol):
    """What Typer's and Click's Exit and ClickException carry (their classes differ by release)."""

    exit_code: int


class _UsageError(_ExitRequest, Protocol):
    def show(self) -> None: ...


def _cli_exceptions() -> tuple[_Kinds, _Kinds, _Kinds]:
    """(exit, abort, usage-error) exception types. Newer Typer releases carry their own copy of
    Click (and no longer depend on Click itself); older ones raise Click's: catch whichever Typer
    loaded (looked up, not imported: importing Click for nothing costs start-up time)."""
    exits: list[type[BaseException]] = [typer.Exit]
    aborts: list[type[BaseException]] = [typer.Abort, KeyboardInterrupt]
    usage: list[type[BaseException]] = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        usage.append(mod.ClickException)
        exits += [mod.Exit] if hasattr(mod, "Exit") else []
        aborts += [mod.Abort] if hasattr(mod, "Abort") else []
    return tuple(exits), tuple(aborts), tuple(usage)


_EXIT, _ABORT, _USAGE = _cli_exceptions()


def _fail(message: str, code: int) -> None:
    stderr.print(f"vlm: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


# Options whose values are text for a model (paths may be any bytes; these must be UTF-8).
_TEXT_OPTIONS = ("--text", "--labels", "-l", "--template", "--prompt", "-p")


def _check_text_arguments(args: list[str]) -> None:
    """Python decodes argv with surrogateescape: a text argument that is not UTF-8 gets one line
    naming it, instead of an encoding error deep inside a tokenizer. `ask`'s questions are its
    positional arguments after the image."""
    positional = 0
    for i, a in enumerate(args):
        previous = args[i - 1] if i else ""
        is_option_value = previous.startswith("-") and "=" not in previous
        if not a.startswith("-") and not is_option_value:
            positional += 1
        try:
            a.encode("utf-8")
            continue
        except UnicodeEncodeError:
            pass
        name = a.split("=", 1)[0] if a.startswith("--") and "=" in a else previous if is_option_value else None
        if name in _TEXT_OPTIONS:
            _fail(f"{name}: the text is not valid UTF-8", EXIT_USAGE)
        if args and args[0] == "ask" and positional >= 3:
            _fail(f"question {positional - 2} is not valid UTF-8", EXIT_USAGE)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. `--debug` (anywhere on the line, or VLM_DEBUG=1) shows tracebacks and native logs."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:  # in the environment, so the engines and Ray's workers see it too
        os.environ[DEBUG_ENV] = "1"
    debug = debugging()
    if not debug:  # libraries' warnings (Pillow's on a corrupt EXIF block...) are internals, as tracebacks are
        warnings.simplefilter("ignore")
    args = [a for a in args if a != "--debug"]
    _check_text_arguments(args)
    args = eval.sample_flag(args)
    args = batch.ray_flag(args)
    args = batch.sidecar_flag(args)
    try:
        rc = app(args=args, prog_name="vlm", standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except _EXIT as e:
        sys.exit(cast(_ExitRequest, e).exit_code)
    except _USAGE as e:
        usage = cast(_UsageError, e)
        usage.show()
        sys.exit(usage.exit_code)
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
        _fail(describe(e), e.exit_code)
    except Exception as e:  # the last line of defence: no traceback unless --debug
        if debug:
            traceback.print_exc()
        _fail(f"{type(e).__name__}: {e} (run with --debug for details)", EXIT_ERROR)
