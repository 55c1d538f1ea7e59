"""CLIP tokenizer: the real token ids of tokenizer_cases.json, cleaning, pre-tokenisation, truncation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from vlmcli.engines.clip_tokenizer import (
    BOS_ID,
    DEFAULT_MERGES_FILE,
    EOS_ID,
    ClipTokenizer,
    clean_text,
    default_tokenizer,
    pre_tokenize,
    read_merges_file,
    vocabulary_from_merges,
)
from vlmcli.errors import ModelError

# Token ids from the reference tokenizer (openai/CLIP's simple_tokenizer) for texts that exercise its rules.
CASES_FILE = Path(__file__).resolve().parent / "data" / "clip" / "tokenizer_cases.json"
CASES = json.loads(CASES_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return default_tokenizer()


def test_cases_file_has_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[repr(c["text"])[:40] for c in CASES])
def test_real_token_ids(tok: ClipTokenizer, case: dict) -> None:
    rows, truncated = tok.tokenize([case["text"]])
    ids = case["ids"]
    assert rows.shape == (1, 77) and rows.dtype == np.int32
    assert rows[0, : len(ids)].tolist() == ids
    assert not rows[0, len(ids) :].any()  # zero padded
    assert truncated == [len(tok.encode(case["text"])) + 2 > 77]


def test_packaged_merges_are_openais_file() -> None:
    # SHA-256 of bpe_simple_vocab_16e6.txt.gz as openai/CLIP ships it: the vocabulary every CLIP checkpoint uses.
    digest = hashlib.sha256(DEFAULT_MERGES_FILE.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert len(read_merges_file(DEFAULT_MERGES_FILE)) == 49408 - 256 - 256 - 2


def test_vocabulary_layout(tok: ClipTokenizer) -> None:
    assert tok.vocab_size == 49408
    assert tok.tokens[0] == "!" and tok.tokens[256] == "!</w>"
    assert tok.tokens[BOS_ID] == "<|startoftext|>" and tok.tokens[EOS_ID] == "<|endoftext|>"
    assert tok.tokens[512] == "in"  # the first merge, "i n"


def test_truncation_keeps_eos_last(tok: ClipTokenizer) -> None:
    long_text = " ".join(["cat"] * 200)
    rows, truncated = tok.tokenize([long_text, "a dog"])
    assert truncated == [True, False]
    assert rows[0, 0] == BOS_ID and rows[0, -1] == EOS_ID
    assert (rows[0, 1:-1] == tok.encode("cat")[0]).all()
    assert rows[1, :4].tolist() == [BOS_ID, *tok.encode("a dog"), EOS_ID]


def test_exactly_77_is_not_truncated(tok: ClipTokenizer) -> None:
    rows, truncated = tok.tokenize([" ".join(["cat"] * 75), " ".join(["cat"] * 76)])
    assert truncated == [False, True]
    assert rows[0, -1] == EOS_ID and rows[1, -1] == EOS_ID


def test_other_context_length(tok: ClipTokenizer) -> None:
    rows, truncated = tok.tokenize("a photo of a cat", context_length=4)
    assert rows.shape == (1, 4) and truncated == [True]
    assert rows[0].tolist() == [BOS_ID, 320, 1125, EOS_ID]


def test_cleaning() -> None:
    assert clean_text("  Hello\t\n  WORLD  ") == "hello world"
    assert clean_text("fish &amp;amp; chips") == "fish & chips"  # unescaped twice
    assert clean_text("don\u2019t") == "don't"  # curly quote straightened (ftfy's uncurl_quotes)
    assert clean_text("\ufb01sh") == "fish"  # ligature
    assert clean_text("\uff21\uff22\uff23") == "abc"  # fullwidth
    assert clean_text("cafe\u0301") == "caf\u00e9"  # NFC
    assert clean_text("a\x00b\u200bc") == "ab\u200bc"  # control char removed, ZWSP kept (not whitespace)


def test_pre_tokenize_classes() -> None:
    assert pre_tokenize("it's 3.14!!!'s x²") == ["it", "'s", "3", ".", "1", "4", "!!!'", "s", "x", "²"]
    assert pre_tokenize("<|endoftext|>ok") == ["<|endoftext|>", "ok"]
    # a letter run stops at a combining mark (category M is neither \p{L} nor \p{N})
    assert pre_tokenize("e\u0301x") == ["e", "\u0301", "x"]
    # U+001C is whitespace for str.isspace() but not for CLIP's regex
    assert pre_tokenize("a\x1cb") == ["a", "\x1c", "b"]


def test_typed_special_token_is_kept_whole(tok: ClipTokenizer) -> None:
    assert tok.encode("a <|endoftext|>") == [320, EOS_ID]


def test_curly_quotes_tokenize_like_straight(tok: ClipTokenizer) -> None:
    assert tok.encode("don\u2019t") == tok.encode("don't")


def test_tokens_given_explicitly(tok: ClipTokenizer) -> None:
    merges = read_merges_file(DEFAULT_MERGES_FILE)
    explicit = ClipTokenizer(merges, vocabulary_from_merges(merges))
    assert explicit.encode("a photo of a traffic light.") == tok.encode("a photo of a traffic light.")


def test_vocabulary_missing_a_merge_result_is_an_error() -> None:
    merges = read_merges_file(DEFAULT_MERGES_FILE)
    tokens = vocabulary_from_merges(merges)
    tokens[tokens.index("cat</w>")] = "something else"
    with pytest.raises(ModelError, match="cat</w>"):
        ClipTokenizer(merges, tokens).encode("cat")


def test_bad_merges_file(tmp_path: Path) -> None:
    bad = tmp_path / "merges.txt"
    bad.write_text("#version: 0.2\nthis line has three\n")
    with pytest.raises(ModelError, match="merges"):
        read_merges_file(bad)


def test_decode_roundtrip(tok: ClipTokenizer) -> None:
    assert tok.decode(tok.encode("a photo of a cat")) == "a photo of a cat"


# --- bounded work: the heap BPE, the early stop and the input-length cap ------------------------------


def reference_bpe(ranks: dict[tuple[str, str], int], word: str) -> list[str]:
    """CLIP's own BPE loop (open_clip's SimpleTokenizer.bpe): quadratic, the definition of the result."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [p for p in zip(symbols, symbols[1:]) if p in ranks]
        if not pairs:
            break
        first, second = min(pairs, key=lambda p: ranks[p])
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def test_heap_bpe_equals_clips_loop_on_random_words(tok: ClipTokenizer) -> None:
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 5, 8, 13, 40, 200]:
        for alphabet in ["ab", "aeiou", "abcdefghijklmnopqrstuvwxyz", "ðŁĺĤ"]:
            for _ in range(8):
                word = "".join(rng.choice(list(alphabet), n))
                tok._cache.clear()
                assert tok.bpe(word) == reference_bpe(tok.ranks, word), word


def test_heap_bpe_equals_clips_loop_when_merges_rank_against_their_order() -> None:
    """A merge list can rank a pair made by a merge *below* that merge (not learned that way, but a file
    can say it): CLIP still finishes each pass over one pair before the next; so must the heap."""
    merges = ["b c", "a bc", "a a", "aa a", "aa aa", "a a</w>", "aa a</w>", "c</w> a", "bc a", "a b", "ab ab"]
    tokens = vocabulary_from_merges(merges)
    t = ClipTokenizer(merges, tokens, bos_id=len(tokens) - 2, eos_id=len(tokens) - 1)
    rng = np.random.default_rng(1)
    for _ in range(2000):
        word = "".join(rng.choice(list("abc"), rng.integers(1, 14)))
        t._cache.clear()
        assert t.bpe(word) == reference_bpe(t.ranks, word), word


def test_a_100000_letter_word_tokenizes(tok: ClipTokenizer) -> None:
    """Quadratic BPE took 100 s on this; the heap makes it n log n (no timing asserted here)."""
    word = "".join(np.random.default_rng(2).choice(list("abcdefghij"), 100_000))
    rows, truncated = tok.tokenize([word])
    assert truncated == [True] and rows[0, 0] == BOS_ID and rows[0, -1] == EOS_ID
    # the kept tokens are the first 75 of the word's whole BPE (the heap is checked against CLIP's loop above)
    assert rows[0, 1:-1].tolist() == tok.encode(word)[:75]


def test_tokenize_stops_at_the_context_and_equals_the_full_encoding(tok: ClipTokenizer) -> None:
    texts = [" ".join(["a photo of a cat"] * n) for n in (10, 18, 19, 20, 60)]
    rows, truncated = tok.tokenize(texts)
    for text, row, cut in zip(texts, rows, truncated):
        full = [BOS_ID, *tok.encode(text), EOS_ID]
        assert cut == (len(full) > 77)
        want = full if not cut else full[:76] + [EOS_ID]
        assert row[: len(want)].tolist() == want


def test_input_longer_than_the_cap_is_cut_and_reported(tok: ClipTokenizer) -> None:
    from vlmcli.engines.clip_tokenizer import MAX_TEXT_CHARS

    spaced = "cat" + " " * MAX_TEXT_CHARS + "dog"  # the dog lies beyond the cap
    rows, truncated = tok.tokenize([spaced, "cat dog"])
    assert truncated == [True, False]
    assert rows[0, :3].tolist() == [BOS_ID, tok.encode("cat")[0], EOS_ID]


def test_lone_surrogate_is_a_clean_error(tok: ClipTokenizer) -> None:
    from vlmcli.errors import VlmError

    with pytest.raises(VlmError, match="lone surrogate U\\+DCE9"):
        tok.tokenize(["caf\udce9"])


def test_special_ids_outside_the_vocabulary_name_the_file() -> None:
    merges = read_merges_file(DEFAULT_MERGES_FILE)
    with pytest.raises(ModelError, match="bos_token_id = 1000000000") as e:
        ClipTokenizer(merges, bos_id=10**9, path="model.gguf")
    assert e.value.path == "model.gguf"
