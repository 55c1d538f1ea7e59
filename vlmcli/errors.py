"""User-facing errors: one line on stderr, a non-zero exit code, no traceback."""

from __future__ import annotations

import os

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1  # the command failed
EXIT_USAGE = 2  # bad command line (Typer/Click use 2 as well)
EXIT_PARTIAL = 3  # batch mode: finished, but some inputs failed
EXIT_INTERRUPTED = 130  # Ctrl-C


class VlmError(Exception):
    """A failure the user can act on. `path` names the file it is about, if any."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ImageError(VlmError):
    """An input image cannot be used (missing, unreadable, unsupported, too large)."""


class ModelError(VlmError):
    """A model file or model name cannot be used."""
