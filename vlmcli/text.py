"""Text checks shared by the tokenizers and the front ends (no third-party imports)."""

from __future__ import annotations

from vlmcli.errors import VlmError


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in `text`, or None when it is valid Unicode. Python makes
    them from invalid UTF-8 in command-line arguments (surrogateescape) and from JSON's \\ud800
    escapes; they cannot be encoded to UTF-8, so no tokenizer can take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_text(text: str) -> None:
    """Raise VlmError naming the first lone surrogate in `text`, if any."""
    at = lone_surrogate(text)
    if at is not None:
        raise VlmError(
            f"the text is not valid Unicode: character {at + 1} is a lone surrogate U+{ord(text[at]):04X} "
            "(invalid UTF-8 in the input?)"
        )
