"""The effect of pycocoevalcap's caption tokenization, in Python (no Java).

pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer (``-preserveLines -lowerCase``) on every
caption and then drops the tokens ``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``.
``ptb_tokenize`` reproduces what that pipeline does to English captions:

- lower case; curly quotes and apostrophes read as straight ones, dashes (en, em, ``--``) and
  ``...`` / ``…`` split off and dropped, like ``. , ; : ? !``, quotes and backticks;
- clitics split off: ``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``, ``can't`` -> ``ca n't``,
  ``won't`` -> ``wo n't``, ``'re 've 'm 'll 'd`` likewise, ``cannot`` -> ``can not``, ``gonna`` ->
  ``gon na`` (also gotta, wanna, lemme, gimme), ``'tis`` -> ``'t is``; a plural possessive's
  apostrophe (``dogs'``) is dropped;
- a word's final period is split off (and dropped) unless the word is an abbreviation or initials
  (``mr.``, ``st.``, ``u.s.``, ``p.m.``, ``b.``; ``no.`` before a number);
- ``$``, ``#``, ``%``, ``*``, ``+``, ``=`` and the like become tokens of their own;
  ``1,000``, ``3.5``, ``5:30``, ``t-shirt``, ``black/white`` and ``at&t`` stay whole;
- brackets become ``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-`` and, a quirk of the reference, stay in the
  text: ``-lowerCase`` lower-cases them after escaping, so pycocoevalcap's punctuation list (which
  spells them in capitals) never removes them;
- runs of ``!`` and ``?`` (``!!!``, ``?!``) stay as one token and are not dropped, as in the reference.

Where it can differ from the Java tokenizer: emoticons, URLs and e-mail addresses, ``<`` and ``>``
(which the Java lexer can read as markup), periods between words without a space ("dogs.The"),
abbreviations outside the list below, time expressions such as ``4:45pm``, and non-English or
unusual Unicode punctuation. tests/test_metrics_tokenize.py compares it with the real tokenizer
where Java and pycocoevalcap are installed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["ptb_tokenize", "tokenize_captions", "PUNCTUATIONS"]

# pycocoevalcap/tokenizer/ptbtokenizer.py's list, as written there (capitals included).
PUNCTUATIONS = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)

_ABBREVIATIONS = frozenset(
    """
mr mrs ms messrs dr prof st jr sr gen col lt sgt capt cpl maj adm rev hon gov sen rep pres supt
mt ft ave rd blvd inc co corp ltd bros vs etc dept est
jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
ala ariz calif colo conn fla ga ind kan kans ky md mich minn mo mont neb nev okla penn tenn va vt
wis wisc wyo
""".split()
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}

_NORMALISE = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2033": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u00a0": " ",
        "\u2009": " ",
        "\u200a": " ",
        "\u2002": " ",
        "\u2003": " ",
    }
)

_ASSIMILATIONS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}
_SPECIAL = {"'tis": ("'t", "is"), "'twas": ("'t", "was"), "y'all": ("y'", "all")}

# Pieces split out of a whitespace-separated chunk before the word-level rules run.
_SPLIT = re.compile(
    r"(\.\.\.+|\u2026|--+|[\u2013\u2014\u2015]"  # ellipses and dashes
    r"|[;\"`()\[\]{}*+=|~^<>@]"  # always their own token (@ only when leading: see below)
    r")"
)
_SENTENCE_MARKS = re.compile(r"^(.*?)([!?]+)$")
_INITIALS = re.compile(r"^(?:[a-z]\.)+[a-z]?\.?$")
_DOTTED = re.compile(r"^[a-z]+(?:\.[a-z]+)+\.$")
_NUMBER = re.compile(r"^[0-9]")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'m|'ll|'d)$")


def _split_chunk(chunk: str) -> list[str]:
    pieces: list[str] = []
    for part in _SPLIT.split(chunk):
        if not part:
            continue
        if part == "@":
            # "@home" and "foo@bar.com" stay whole in the reference: re-join with the neighbours.
            pieces.append(part)
            continue
        pieces.append(part)
    # Re-join "@" with what follows (and precedes, inside a word): the reference keeps @name whole.
    joined: list[str] = []
    i = 0
    while i < len(pieces):
        p = pieces[i]
        if p == "@" and i + 1 < len(pieces) and not _SPLIT.fullmatch(pieces[i + 1]):
            if joined and not _SPLIT.fullmatch(joined[-1]):
                joined[-1] += "@" + pieces[i + 1]
            else:
                joined.append("@" + pieces[i + 1])
            i += 2
            continue
        joined.append(p)
        i += 1
    return joined


def _word(piece: str, next_piece: str | None, out: list[str]) -> None:
    """The word-level rules on one piece without brackets, quotes, dashes or ellipses."""
    if not piece:
        return
    lead: list[str] = []
    # Leading marks: quotes, hyphens, currency and number signs before a number.
    while piece:
        if piece[0] == "'" and not re.match(r"^'(?:[0-9]{2}s?|t(?:is|was)|n')$", piece):
            lead.append("'")
            piece = piece[1:]
        elif piece[0] == "-" and len(piece) > 1:
            lead.append("-")
            piece = piece[1:]
        elif piece[0] in "$#" and len(piece) > 1:
            lead.append(piece[0])
            piece = piece[1:]
        elif piece[0] in ",:" and len(piece) > 1:
            lead.append(piece[0])
            piece = piece[1:]
        else:
            break
    out.extend(lead)
    if not piece:
        return
    trail: list[str] = []
    while piece:
        m = _SENTENCE_MARKS.match(piece)
        if m and m.group(1):
            trail.append(m.group(2))
            piece = m.group(1)
            continue
        if piece[-1] in ",;:" and len(piece) > 1:
            trail.append(piece[-1])
            piece = piece[:-1]
            continue
        if piece[-1] == "%" and len(piece) > 1:
            trail.append("%")
            piece = piece[:-1]
            continue
        if piece[-1] == "-" and len(piece) > 1:
            trail.append("-")
            piece = piece[:-1]
            continue
        if piece.endswith("'") and len(piece) > 1 and not piece.endswith("n'") and not re.match(r"^[a-z]'$", piece):
            trail.append("'")
            piece = piece[:-1]
            continue
        if piece.endswith(".") and len(piece) > 1:
            stem = piece[:-1]
            if stem.endswith("."):  # ".." and more: an ellipsis, dropped
                trail.append(".")
                piece = stem
                continue
            if _keeps_period(piece, next_piece):
                break
            trail.append(".")
            piece = stem
            continue
        break
    _clitics(piece, out)
    out.extend(reversed(trail))


def _keeps_period(word: str, next_piece: str | None) -> bool:
    stem = word[:-1]
    if _INITIALS.match(word) or _DOTTED.match(word):
        return True
    if stem in _ABBREVIATIONS:
        return True
    if stem == "no" and next_piece is not None and _NUMBER.match(next_piece):
        return True
    return False


def _clitics(piece: str, out: list[str]) -> None:
    if piece in _ASSIMILATIONS:
        out.extend(_ASSIMILATIONS[piece])
        return
    if piece in _SPECIAL:
        out.extend(_SPECIAL[piece])
        return
    if piece == "rock'n'roll":
        out.extend(("rock", "'n'", "roll"))
        return
    tail: list[str] = []
    while True:
        m = _CLITIC.match(piece)
        if not m or m.group(1) in ("'",) or (m.group(2) == "n't" and len(m.group(1)) < 1):
            break
        stem, clitic = m.group(1), m.group(2)
        if stem.endswith("'"):
            break
        tail.append(clitic)
        piece = stem
    # A comma between letters splits ("a,b"); between digits it is a thousands separator.
    out.extend(_split_commas(piece))
    out.extend(reversed(tail))


def _split_commas(piece: str) -> list[str]:
    if "," not in piece:
        return [piece]
    parts = re.split(r"(?<![0-9]),|,(?![0-9])", piece)
    tokens: list[str] = []
    for i, p in enumerate(parts):
        if i:
            tokens.append(",")
        if p:
            tokens.append(p)
    return tokens


def _tokens(line: str) -> list[str]:
    text = line.translate(_NORMALISE).replace("&amp;", "&").lower()
    # Internal ";" and ":" between letters split; ":" between digits (5:30) stays.
    text = re.sub(r";", " ; ", text)
    text = re.sub(r"(?<![0-9]):|:(?![0-9])", " : ", text)
    pieces: list[str] = []
    for chunk in text.split():
        pieces.extend(_split_chunk(chunk))
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if piece in _BRACKETS:
            out.append(_BRACKETS[piece])
        elif _SPLIT.fullmatch(piece):
            if piece.startswith("..") or piece == "\u2026":
                out.append("...")
            elif piece[0] in "-\u2013\u2014\u2015":
                out.append("--")
            elif piece == '"':
                out.append("''")
            elif piece == "`":
                out.append("`")
            else:
                out.append(piece)
        else:
            nxt = pieces[i + 1] if i + 1 < len(pieces) else None
            _word(piece, nxt, out)
    return out


def ptb_tokenize(caption: str) -> str:
    """One caption as pycocoevalcap's tokenizer leaves it: lower-case tokens joined by single spaces."""
    return " ".join(t for t in _tokens(caption.replace("\n", " ")) if t not in PUNCTUATIONS)


def tokenize_captions(captions: Iterable[str]) -> list[str]:
    return [ptb_tokenize(c) for c in captions]
