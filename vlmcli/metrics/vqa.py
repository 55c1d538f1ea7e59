"""VQA accuracy exactly as the official VQA evaluation computes it.

Reference: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (commit a013f00, the
one every VQAv2 paper's number comes from). This is an independent implementation of its behaviour,
quirks included (each is pointed out where it is reproduced):

- An answer is cleaned (newlines and tabs to spaces, outer whitespace stripped), then, only when the
  ten ground-truth answers are not all the same string, the prediction and the ground truth go
  through the punctuation step and the digit/article step (``normalize_answer``). When all ten
  ground-truth answers are identical nothing is normalised at all: "Yes" against ten "yes" scores 0,
  as in the official tool.
- Punctuation: ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` are each deleted if the (cleaned) text
  has that mark next to a space anywhere, or if it has a digit-comma-digit anywhere ("1,000"), and
  replaced by a space otherwise. The apostrophe, colon and ``# $ % & * ^ ~ |`` are kept. Then a
  period not followed by a digit is deleted (the official look-behind is mistyped as a look-ahead,
  so "3." loses its period and "1.5" keeps it), at most 32 of them: the official call passes
  ``re.UNICODE`` (32) where ``re.sub`` takes its count.
- Digits and articles: lower-cased, split on whitespace, number words "none" and "zero" to "ten"
  become digits ("none" is "0"), the articles a/an/the are dropped, then the official contraction
  table is applied word by word ("dont" -> "don't"; its entries with capitals such as "Im" can never
  match lower-cased words and its "somebody'd" -> "somebodyd" is backwards; both kept).
- Digits are ASCII 0-9, as in the official Python 2 code (whose regular expressions were not
  Unicode).
- Accuracy of one answer: for each of the ten ground-truth answers, leave it out and count how many
  of the other nine equal the prediction; the question's accuracy is the mean over the ten subsets
  of min(1, matches / 3). Reported as 100 x the mean, rounded to 2 places (the official ``n=2``).

No model code is imported here; the module is pure Python.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "normalize_answer",
    "process_punctuation",
    "process_digit_article",
    "clean_answer",
    "vqa_accuracy",
    "VqaScore",
    "score_vqa",
]

# vqaEval.contractions, entry for entry.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

# In the official order (the order does not change the result, but it is the reference's).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

_PERIOD_STRIP = re.compile(r"(?!<=[0-9])(\.)(?![0-9])")  # the official regex, ASCII digits
_COMMA_STRIP = re.compile(r"([0-9])(,)([0-9])")
_PERIOD_COUNT = 32  # re.UNICODE passed as re.sub's count


def clean_answer(text: str) -> str:
    """Newlines and tabs to spaces, outer whitespace stripped (always applied, before anything else)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation."""
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        # The official test looks at the input text, not at the text being edited.
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """An answer as the official evaluation compares it when it normalises (clean, punctuation, digits/articles).

    Two answers the official tool would count as equal (when the ground truth is not unanimous)
    normalise to the same string. ``vqa_accuracy`` applies the tool's rule of normalising only
    when the ten ground-truth answers differ; this function always normalises.
    """
    return process_digit_article(process_punctuation(clean_answer(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the human answers (ten in VQAv2), in [0, 1].

    Mean over the leave-one-out subsets of min(1, matches / 3). The official tool removes the left-out
    answer by comparing answer records, which are unique by answer_id; here it is removed by position.
    """
    if not answers:
        raise ValueError("no ground-truth answers")
    gts = [clean_answer(a) for a in answers]
    pred = clean_answer(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    total_matches = sum(1 for a in gts if a == pred)
    acc = 0.0
    for a in gts:
        matches = total_matches - (1 if a == pred else 0)
        acc += min(1.0, matches / 3)
    return acc / len(gts)


def _pct(values: list[float], digits: int) -> float:
    return round(100 * float(sum(values)) / len(values), digits)


@dataclass
class VqaScore:
    """Overall and per-type accuracy, in percent rounded as the official tool rounds (``digits``)."""

    overall: float
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question_type: dict[str, float] = field(default_factory=dict)
    count: int = 0
    counts_per_answer_type: dict[str, int] = field(default_factory=dict)
    mean: float = 0.0  # unrounded mean accuracy in [0, 1]

    def to_dict(self) -> dict:
        return {
            "accuracy": self.overall,
            "per_answer_type": dict(self.per_answer_type),
            "per_question_type": dict(self.per_question_type),
            "questions": self.count,
            "questions_per_answer_type": dict(self.counts_per_answer_type),
            "mean": self.mean,
        }


def score_vqa(items: Iterable[tuple[str, Sequence[str], str | None, str | None]], digits: int = 2) -> VqaScore:
    """Score (prediction, answers, answer_type, question_type) tuples as vqaEval.evaluate + setAccuracy.

    A missing type (None) is left out of that breakdown but counts in the overall accuracy.
    """
    all_acc: list[float] = []
    by_ans: dict[str, list[float]] = {}
    by_ques: dict[str, list[float]] = {}
    for prediction, answers, answer_type, question_type in items:
        acc = vqa_accuracy(prediction, answers)
        all_acc.append(acc)
        if answer_type is not None:
            by_ans.setdefault(answer_type, []).append(acc)
        if question_type is not None:
            by_ques.setdefault(question_type, []).append(acc)
    if not all_acc:
        raise ValueError("no questions to score")
    return VqaScore(
        overall=_pct(all_acc, digits),
        per_answer_type={k: _pct(v, digits) for k, v in by_ans.items()},
        per_question_type={k: _pct(v, digits) for k, v in by_ques.items()},
        count=len(all_acc),
        counts_per_answer_type={k: len(v) for k, v in by_ans.items()},
        mean=sum(all_acc) / len(all_acc),
    )
