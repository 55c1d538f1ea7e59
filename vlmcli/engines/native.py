"""What every engine that holds native (llama.cpp / ggml) memory shares."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound="NativeResource")


class NativeResource:
    """Owns native memory: `close()` frees it (idempotently); a context manager; freed when collected."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the native libraries may already be gone
            pass
