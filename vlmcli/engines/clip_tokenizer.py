"""CLIP's tokenizer: byte-level BPE with `</w>` word ends, as OpenAI CLIP / open_clip's SimpleTokenizer.

Written without the `regex` and `ftfy` packages (not dependencies of vlmcli):
- the pre-tokenisation pattern `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
  [^\\s\\p{L}\\p{N}]+` is emulated by a small scanner over Unicode general categories (`\\p{L}` = L*,
  `\\p{N}` = N*) and the Unicode White_Space set that `regex`'s `\\s` uses;
- `ftfy.fix_text` is approximated by `fix_text` below (see its docstring for what is left out).
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import unicodedata
from pathlib import Path

import numpy as np

from vlmcli.errors import ModelError

BOS_ID = 49406
EOS_ID = 49407
CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP uses the first 49152 - 256 - 2 merges of its merges file: 256 byte tokens + their `</w>` forms
# + the merges + 2 special tokens = a 49408-token vocabulary.
N_MERGES = 49152 - 256 - 2

DEFAULT_MERGES_FILE = Path(__file__).resolve().parent.parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

# Unicode White_Space (what `regex`'s `\s` matches). Python's str.isspace() also says yes to
# U+001C..U+001F, which `regex` does not treat as whitespace.
WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # tried in this order, like the pattern


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from bytes to printable characters (the BPE's alphabet).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, soft hyphen...)
    map to U+0100 onwards, in byte order. The dict's order (printable bytes first, then the others) is
    the order of the first 256 vocabulary entries.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    printable += list(range(ord("\xae"), ord("\xff") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def vocabulary_from_merges(merges: list[str]) -> list[str]:
    """The token list CLIP derives from its merges: bytes, bytes + `</w>`, each merge, then the two specials."""
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    return vocab


def read_merges_file(path: str | os.PathLike[str]) -> list[str]:
    """The merges CLIP uses from a bpe_simple_vocab_16e6.txt(.gz) or an HF merges.txt ("a b" strings)."""
    p = Path(path)
    try:
        raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
        lines = raw.decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ModelError(f"cannot read BPE merges ({e})", p) from None
    # The first line is a "#version" header; CLIP's own file holds more merges than the model uses.
    if lines and "#version" in lines[0]:
        lines = lines[1:]
    merges = [line for line in lines[:N_MERGES] if line]
    if not merges or any(len(m.split(" ")) != 2 for m in merges):
        raise ModelError("not a BPE merges file (expected lines of two symbols)", p)
    return merges


def fix_text(text: str) -> str:
    """The part of ftfy.fix_text (CLIP's first cleaning step) that needs no ftfy data.

    Done here, with ftfy's default settings: remove ANSI terminal escapes, turn curly quotes into
    straight ones, expand Latin ligatures (ﬁ -> fi), map fullwidth/halfwidth forms to their normal
    width, remove control characters ftfy drops, NFC-normalise.
    Left out (needs ftfy's heuristics and tables): repairing mojibake (UTF-8 decoded as Windows-1252 /
    Latin-1 and similar, e.g. "cafÃ©" -> "café"), C1 control fixes, and repairing surrogate pairs. Such
    text is rare in labels and prompts; it tokenizes as written.
    """
    if "\x1b" in text:
        text = _remove_terminal_escapes(text)
    text = text.translate(_FTFY_TRANSLATION)
    return unicodedata.normalize("NFC", text)


def _remove_terminal_escapes(text: str) -> str:
    import re

    return re.sub(r"\x1b\[((?:\d|;)*)([a-zA-Z])", "", text)


def _build_ftfy_translation() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    # uncurl_quotes
    for c in "\u02bc\u2018\u2019\u201a\u201b":
        table[ord(c)] = "'"
    for c in "\u201c\u201d\u201e\u201f":
        table[ord(c)] = '"'
    # fix_latin_ligatures
    ligatures = {
        "\u0132": "IJ", "\u0133": "ij", "\u0149": "\u02bcn", "\u01f1": "DZ", "\u01f2": "Dz", "\u01f3": "dz",
        "\u01c4": "D\u017d", "\u01c5": "D\u017e", "\u01c6": "d\u017e", "\u01c7": "LJ", "\u01c8": "Lj",
        "\u01c9": "lj", "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj", "\ufb00": "ff", "\ufb01": "fi",
        "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "\u017ft", "\ufb06": "st",
    }
    table.update({ord(k): v for k, v in ligatures.items()})
    # fix_character_width: fullwidth ASCII, halfwidth katakana and the ideographic space
    table[0x3000] = " "
    for cp in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(cp))
        if alt != chr(cp):
            table[cp] = alt
    # remove_control_chars (tab, newline, form feed and carriage return are kept)
    for cp in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
               *range(0xFFF9, 0xFFFD)]:
        table[cp] = None
    return table


_FTFY_TRANSLATION = _build_ftfy_translation()


def clean_text(text: str) -> str:
    """CLIP's cleaning: ftfy-style fix, HTML unescaped twice, whitespace runs to one space, lower case."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return _collapse_whitespace(text).lower()


def _collapse_whitespace(text: str) -> str:
    out: list[str] = []
    in_space = False
    for ch in text:
        if ch in WHITE_SPACE:
            in_space = True
            continue
        if in_space and out:
            out.append(" ")
        in_space = False
        out.append(ch)
    return "".join(out)


def _char_class(ch: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'O' anything else (punctuation, symbols, marks...)."""
    if ch in WHITE_SPACE:
        return "S"
    cat = unicodedata.category(ch)[0]
    return cat if cat in ("L", "N") else "O"


def pre_tokenize(text: str) -> list[str]:
    """Split cleaned text into words as CLIP's regex does (see the module docstring)."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text.startswith(BOS_TOKEN, i) or text.startswith(EOS_TOKEN, i):
            tok = BOS_TOKEN if text.startswith(BOS_TOKEN, i) else EOS_TOKEN
            words.append(tok)
            i += len(tok)
            continue
        if text[i] == "'":
            contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if contraction:
                words.append(contraction)
                i += len(contraction)
                continue
        kind = _char_class(text[i])
        if kind == "S":
            i += 1
        elif kind == "N":  # numbers are split into single characters
            words.append(text[i])
            i += 1
        else:  # a run of letters, or a run of "other" (which may contain apostrophes)
            j = i + 1
            while j < n and _char_class(text[j]) == kind:
                j += 1
            words.append(text[i:j])
            i = j
    return words


class ClipTokenizer:
    """CLIP's BPE tokenizer. `tokens` is the vocabulary in id order (derived from `merges` if omitted)."""

    def __init__(
        self,
        merges: list[str],
        tokens: list[str] | None = None,
        bos_id: int = BOS_ID,
        eos_id: int = EOS_ID,
    ) -> None:
        self.merges = list(merges)
        self.tokens = list(tokens) if tokens is not None else vocabulary_from_merges(self.merges)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.encoder = {t: i for i, t in enumerate(self.tokens)}
        self.byte_encoder = bytes_to_unicode()
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(self.merges)}
        # Special tokens typed in the text are kept whole, as SimpleTokenizer's cache does.
        self._cache: dict[str, list[str]] = {BOS_TOKEN: [BOS_TOKEN], EOS_TOKEN: [EOS_TOKEN]}

    @classmethod
    def from_merges_file(cls, path: str | os.PathLike[str] = DEFAULT_MERGES_FILE) -> "ClipTokenizer":
        return cls(read_merges_file(path))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def bpe(self, word: str) -> list[str]:
        """BPE-merge one pre-token (already byte-encoded); the last symbol carries `</w>`."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            # The adjacent pair with the lowest merge rank; merge all its non-overlapping occurrences.
            best_rank, best = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = self.ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        if len(self._cache) < 100_000:  # labels repeat; bound the cache for huge text files
            self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        ids: list[int] = []
        for word in pre_tokenize(clean_text(text)):
            if word in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.encoder[word])
                continue
            encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            for piece in self.bpe(encoded):
                token_id = self.encoder.get(piece)
                if token_id is None:  # only with a vocabulary that does not match its merges
                    raise ModelError(f"CLIP vocabulary has no token {piece!r} (vocabulary and merges disagree)")
                ids.append(token_id)
        return ids

    def tokenize(self, texts: list[str] | str, context_length: int = CONTEXT_LENGTH) -> tuple[np.ndarray, list[bool]]:
        """(N, context_length) int32 rows of bos + tokens + eos, zero padded, and which rows were truncated.

        Too-long texts are cut to `context_length` with eos kept as the last token (open_clip's behaviour).
        """
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), context_length), dtype=np.int32)
        truncated: list[bool] = []
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode(text), self.eos_id]
            cut = len(ids) > context_length
            if cut:
                ids = ids[:context_length]
                ids[-1] = self.eos_id
            out[row, : len(ids)] = ids
            truncated.append(cut)
        return out, truncated

    def decode(self, ids: list[int]) -> str:
        """Text back from ids (for messages and debugging): bytes joined, `</w>` as a space."""
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        pieces = "".join(self.tokens[i] for i in ids if i not in (self.bos_id, self.eos_id))
        data = bytes(byte_decoder[c] for c in pieces if c in byte_decoder)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The tokenizer of every OpenAI / LAION CLIP, from the merges file shipped with vlmcli."""
    return ClipTokenizer.from_merges_file(DEFAULT_MERGES_FILE)
