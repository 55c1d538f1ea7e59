"""The Python PTB tokenization against the Java one pycocoevalcap runs.

The expected strings were produced by pycocoevalcap 1.2's PTBTokenizer (Stanford CoreNLP 3.4.1, run
with Java here) on these inputs. Where pycocoevalcap and java are installed, the whole caption file
tests/data/captions_tokenize.txt is also compared with the real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pycocoevalcap_reference as reference
import pytest

from vlmcli.metrics.tokenize import ptb_tokenize

# From the real tokenizer.
PTB = {
    "A man riding a horse.": "a man riding a horse",
    "The dog's bone, isn't it?": "the dog 's bone is n't it",
    "I can't believe they wanna keep 40% of that.": "i ca n't believe they wan na keep 40 % of that",
    "She cannot go; he's gonna stay & gotta leave, lemme gimme.": (
        "she can not go he 's gon na stay & got ta leave lem me gim me"
    ),
    "A (red) car [blue] {green} \"quoted\" 'single' `back`.": (
        "a -lrb- red -rrb- car -lsb- blue -rsb- -lcb- green -rcb- quoted single back"
    ),
    "black/white t-shirt 3.5 1,000 $5 #1 @home": "black/white t-shirt 3.5 1,000 $ 5 # 1 @home",
    "Mr. Smith and Dr. Jones at St. Louis.": "mr. smith and dr. jones at st. louis",
    "A U.S. flag. Mr.": "a u.s. flag mr.",
    "Two men... and -- dashes - here -- ok": "two men and dashes here ok",
    "E-mail o'clock rock'n'roll y'all ma'am": "e-mail o'clock rock 'n' roll y' all ma'am",
    "A caf\u00e9 \u2014 and \u201cfancy\u201d \u2018quotes\u2019 \u2026 end": "a caf\u00e9 and fancy quotes end",
    "Hello!!! What?! yes.no a.b.c. end.": "hello !!! what ?! yes.no a.b.c. end",
    "it\u2019s a dog\u2019s life": "it 's a dog 's life",
    "a,b c , d 1,2": "a b c d 1,2",
    "don't DON'T won't shan't ain't": "do n't do n't wo n't sha n't ai n't",
    "he'd I'd they'll 'tis 'twas": "he 'd i 'd they 'll 't is 't was",
    "dogs' toys the boys' bikes": "dogs toys the boys bikes",
    "i said no. then a no. 5": "i said no then a no. 5",
    "a '57 chevy at 5:30": "a '57 chevy at 5:30",
    "the sun. the sat. in the st.": "the sun the sat in the st.",
    "two cats;one dog, this is it:a test": "two cats one dog this is it a test",
    "x+y x=y x*y": "x + y x = y x * y",
    "a & b &amp; c": "a & b & c",
    "-leading hyphen and trailing- word": "leading hyphen and trailing word",
}


@pytest.mark.parametrize("text, expected", sorted(PTB.items()))
def test_matches_the_java_tokenizer(text: str, expected: str) -> None:
    assert ptb_tokenize(text) == expected


def test_newlines_are_spaces() -> None:
    assert ptb_tokenize("A dog\nrunning.") == "a dog running"


CAPTIONS = Path(__file__).resolve().parent / "data" / "captions_tokenize.txt"


@pytest.mark.skipif(not reference.available(tokenizer=True), reason="pycocoevalcap and java are not installed")
def test_caption_file_matches_the_real_tokenizer() -> None:
    lines = [ln for ln in CAPTIONS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    ref = reference.run(tokenize=lines)["tokens"]
    mismatches = [(s, r, ptb_tokenize(s)) for s, r in zip(lines, ref) if ptb_tokenize(s) != r]
    assert mismatches == []
