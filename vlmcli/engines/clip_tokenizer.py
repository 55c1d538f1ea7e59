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
import heapq
import html
import os
import unicodedata
from pathlib import Path

import numpy as np

from vlmcli.errors import ModelError
from vlmcli.text import check_text

BOS_ID = 49406
EOS_ID = 49407
CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP uses the first 49152 - 256 - 2 merges of its merges file: 256 byte tokens + their `</w>` forms
# + the merges + 2 special tokens = a 49408-token vocabulary.
N_MERGES = 49152 - 256 - 2
# Texts are cut to this many characters before tokenizing, so one huge text (a server request, a
# label file with no newlines) costs bounded time. CLIP keeps 75 tokens besides bos/eos, and no
# vocabulary token is longer than 32 byte-characters, so 16,384 characters of letters, digits or
# punctuation always make more than 75 tokens: the cut changes the ids only of a text whose first
# 16,384 characters are mostly whitespace runs (collapsed to one space), HTML entities or removed
# control characters. A cut text is reported as truncated.
MAX_TEXT_CHARS = 16_384

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
        "\u0132": "IJ",
        "\u0133": "ij",
        "\u0149": "\u02bcn",
        "\u01f1": "DZ",
        "\u01f2": "Dz",
        "\u01f3": "dz",
        "\u01c4": "D\u017d",
        "\u01c5": "D\u017e",
        "\u01c6": "d\u017e",
        "\u01c7": "LJ",
        "\u01c8": "Lj",
        "\u01c9": "lj",
        "\u01ca": "NJ",
        "\u01cb": "Nj",
        "\u01cc": "nj",
        "\ufb00": "ff",
        "\ufb01": "fi",
        "\ufb02": "fl",
        "\ufb03": "ffi",
        "\ufb04": "ffl",
        "\ufb05": "\u017ft",
        "\ufb06": "st",
    }
    table.update({ord(k): v for k, v in ligatures.items()})
    # fix_character_width: fullwidth ASCII, halfwidth katakana and the ideographic space
    table[0x3000] = " "
    for cp in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(cp))
        if alt != chr(cp):
            table[cp] = alt
    # remove_control_chars (tab, newline, form feed and carriage return are kept)
    for cp in [
        *range(0x00, 0x09),
        0x0B,
        *range(0x0E, 0x20),
        0x7F,
        *range(0x206A, 0x2070),
        0xFEFF,
        *range(0xFFF9, 0xFFFD),
    ]:
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
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = path  # the model file the vocabulary comes from, named in errors
        self.merges = list(merges)
        # no vocabulary (None, or a file without tokenizer.ggml.tokens): the one CLIP derives from its merges
        self.tokens = list(tokens) if tokens else vocabulary_from_merges(self.merges)
        for what, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id)):
            if not 0 <= value < len(self.tokens):
                raise ModelError(
                    f"tokenizer.ggml.{what} = {value} is outside the vocabulary of {len(self.tokens)} tokens", path
                )
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.encoder = {t: i for i, t in enumerate(self.tokens)}
        self.byte_encoder = bytes_to_unicode()
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(self.merges)}
        # Special tokens typed in the text are kept whole, as SimpleTokenizer's cache does.
        self._cache: dict[str, list[str]] = {BOS_TOKEN: [BOS_TOKEN], EOS_TOKEN: [EOS_TOKEN]}

    @classmethod
    def from_merges_file(cls, path: str | os.PathLike[str] = DEFAULT_MERGES_FILE) -> ClipTokenizer:
        return cls(read_merges_file(path))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def bpe(self, word: str) -> list[str]:
        """BPE-merge one pre-token (already byte-encoded); the last symbol carries `</w>`.

        CLIP's rule, step by step: take the adjacent pair of lowest merge rank, merge all its
        non-overlapping occurrences left to right, repeat. Done here in O(n log n) rather than
        CLIP's O(n^2) rescans: the symbols are a linked list and every adjacent pair sits in a heap
        keyed by (rank, position). Each round pops every entry of the lowest rank (in position
        order, as CLIP's scan meets them), skips entries made stale by earlier merges, merges the
        rest and pushes the two pairs each merge creates. A merged pair can never be the pair being
        merged (it is longer than either half), so one round is exactly one of CLIP's passes; pairs
        of lower rank a round creates wait for the next round, as in CLIP.
        """
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        n = len(symbols)
        ranks = self.ranks
        if n > 1:
            nxt = list(range(1, n + 1))  # n = end of list
            prv = list(range(-1, n - 1))
            alive = [True] * n
            heap = [(r, i) for i in range(n - 1) if (r := ranks.get((symbols[i], symbols[i + 1]))) is not None]
            heapq.heapify(heap)

            def push(i: int) -> None:  # the pair starting at node i, if it is a merge
                j = nxt[i]
                if j < n:
                    r = ranks.get((symbols[i], symbols[j]))
                    if r is not None:
                        heapq.heappush(heap, (r, i))

            while heap:
                rank = heap[0][0]
                positions = []
                while heap and heap[0][0] == rank:
                    positions.append(heapq.heappop(heap)[1])
                for i in positions:
                    j = nxt[i] if alive[i] else n
                    if j >= n or ranks.get((symbols[i], symbols[j])) != rank:
                        continue  # stale: a neighbour was merged since this entry was pushed
                    symbols[i] += symbols[j]
                    alive[j] = False
                    nxt[i] = nxt[j]
                    if nxt[j] < n:
                        prv[nxt[j]] = i
                    if prv[i] >= 0:
                        push(prv[i])
                    push(i)
            symbols = [s for s, a in zip(symbols, alive) if a]
        if len(self._cache) < 100_000 and len(word) <= 1_000:  # labels repeat; bound the cache
            self._cache[word] = symbols
        return symbols

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`, without bos/eos; with `max_tokens`, stop once that many are made
        (the ids are the first `max_tokens` of the full encoding: words are encoded in order)."""
        check_text(text)
        ids: list[int] = []
        for word in pre_tokenize(clean_text(text)):
            if max_tokens is not None and len(ids) >= max_tokens:
                break
            if word in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.encoder[word])
                continue
            encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            for piece in self.bpe(encoded):
                token_id = self.encoder.get(piece)
                if token_id is None:  # only with a vocabulary that does not match its merges
                    raise ModelError(
                        f"CLIP vocabulary has no token {piece!r} (vocabulary and merges disagree)", self.path
                    )
                ids.append(token_id)
        return ids[:max_tokens] if max_tokens is not None else ids

    def tokenize(self, texts: list[str] | str, context_length: int = CONTEXT_LENGTH) -> tuple[np.ndarray, list[bool]]:
        """(N, context_length) int32 rows of bos + tokens + eos, zero padded, and which rows were truncated.

        Too-long texts are cut to `context_length` with eos kept as the last token (open_clip's behaviour).
        Only the tokens that can be kept are made, and a text is first cut to MAX_TEXT_CHARS characters
        (see there), so the work per text is bounded whatever its length; both cuts count as truncated.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        out = np.zeros((len(texts), context_length), dtype=np.int32)
        truncated: list[bool] = []
        keep = context_length - 2  # tokens besides bos and eos
        for row, text in enumerate(texts):
            capped = len(text) > MAX_TEXT_CHARS
            # One token more than can be kept tells whether the text was cut.
            body = self.encode(text[:MAX_TEXT_CHARS] if capped else text, max_tokens=keep + 1)
            cut = capped or len(body) > keep
            ids = [self.bos_id, *body[:keep], self.eos_id]
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
