"""Errors meant for users, structured so each front end can word them for its own users.

Engines and tasks raise these with neutral messages and fields (an option's name, token counts);
the CLI turns them into `vlm: error: PATH: cause` lines with flag names, the C API into a status and
vlm_options field names. Anything else is a bug.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1  # the command failed
EXIT_USAGE = 2  # bad command line (Typer/Click use 2 as well)
EXIT_PARTIAL = 3  # batch mode: finished, but some inputs failed
EXIT_INTERRUPTED = 130  # Ctrl-C

DEBUG_ENV = "VLM_DEBUG"  # set (not "0"): tracebacks, and the native libraries' own logs (llama.cpp, Ray workers)


def debugging() -> bool:
    """Whether the user asked for internals (`vlm --debug` sets DEBUG_ENV for the whole process tree)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class VlmError(Exception):
    """A failure the user can act on. `path` names the file it is about, if any."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __reduce__(self) -> tuple[Callable[..., VlmError], tuple[type[VlmError], str, dict[str, Any]]]:
        # Rebuilt from its fields, not from its constructor's arguments (subclasses take others), so
        # an error crosses a process boundary whole (Ray workers: tasks/ray_batch.py).
        return (_rebuild_error, (type(self), self.message, dict(self.__dict__)))


def _rebuild_error(cls: type[VlmError], message: str, state: dict[str, Any]) -> VlmError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class ImageError(VlmError):
    """An input image cannot be used (missing, unreadable, unsupported, too large)."""


class ModelError(VlmError):
    """A model file or model name cannot be used."""


class InvalidOption(VlmError):
    """A setting is out of range. `option` is its neutral name ("max_tiles", "n_ctx"): the CLI
    shows its flag, the C API its vlm_options field."""

    def __init__(self, option: str, message: str):
        super().__init__(message, exit_code=EXIT_USAGE)
        self.option = option


class ContextOverflow(VlmError):
    """The prompt, image tokens included, does not fit the context the model was opened with."""

    def __init__(self, needed: int, available: int, image_tokens: int | None = None, media: str = "the image"):
        for_image = f" ({image_tokens} for {media})" if image_tokens else ""
        super().__init__(f"the prompt needs {needed} tokens{for_image}, more than the context of {available}")
        self.needed = needed
        self.available = available
        self.image_tokens = image_tokens
