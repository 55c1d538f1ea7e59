"""VQA accuracy and answer normalisation against the official evaluation (GT-Vision-Lab/VQA vqaEval.py).

The normalisation table below was produced by running the official vqaEval.py (commit a013f00; its
Python 2 print statements changed to print() calls, nothing else) on these inputs; the accuracy
cases are worked by hand from its definition."""

from __future__ import annotations

import pytest

from vlmcli.metrics.vqa import clean_answer, normalize_answer, score_vqa, vqa_accuracy

# input -> processDigitArticle(processPunctuation(input)), from the official code.
OFFICIAL_NORMALISATION = {
    "Yes.": "yes",
    "two dogs": "2 dogs",
    "The cat!": "cat",
    "1,000": "1000",
    "3.5": "3.5",
    "3.": "3",
    ".5": ".5",
    "dont know": "don't know",
    "none": "0",
    "a-b": "b",  # "-" becomes a space, then "a" is an article
    "a - b": "b",
    "red, white": "red white",
    "1,2 a-b": "12 ab",  # a digit-comma-digit anywhere: every mark is deleted, not spaced
    "(left)": "left",
    "left (side)": "left side",
    "U.S.": "us",
    "Im here": "im here",  # the table's capitalised keys never match lower-cased words
    "somebody'd": "somebodyd",  # the table's backwards entry
    "yall": "y'all",
    "ten": "10",
    "An apple": "apple",
    "hello?": "hello",
    "what ?": "what",
    "a;b": "b",
    "x/y": "x y",
    "x / y": "x y",
    "its": "its",
    "it's": "it's",
    "#1": "#1",
    "50%": "50%",
    "a.b.c": "abc",
    "." * 40 + "x": "." * 8 + "x",  # at most 32 periods go: re.UNICODE (32) passed as re.sub's count
    "Two Zero": "2 0",
}


@pytest.mark.parametrize("text, expected", sorted(OFFICIAL_NORMALISATION.items()))
def test_normalize_answer_matches_the_official_tool(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_clean_answer() -> None:
    assert clean_answer("  yes\tno\n") == "yes no"
    assert normalize_answer(" Yes\n") == "yes"


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy(matches: int, expected: float) -> None:
    # k of 10 humans agree: the k subsets without one of them have k-1 matches, the others k;
    # mean of min(1, m/3): 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.
    answers = ["cat"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_unanimous_ground_truth_is_not_normalised() -> None:
    # The official tool normalises only when the ten answers are not all the same string.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # cleaning always happens
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["yeah"]) == 1.0


def test_normalisation_applies_to_both_sides() -> None:
    answers = ["two"] * 3 + ["2"] * 2 + ["three"] * 5
    assert vqa_accuracy("2", answers) == 1.0  # "two" -> "2": five matches
    assert vqa_accuracy("Three.", answers) == 1.0
    assert vqa_accuracy("the 3", answers) == 1.0


def test_ties_and_fewer_answers() -> None:
    assert vqa_accuracy("a", ["a", "b"]) == pytest.approx((0 + 1 / 3) / 2)
    with pytest.raises(ValueError):
        vqa_accuracy("a", [])


def test_score_overall_and_per_type_rounded_as_the_official_tool() -> None:
    s = score_vqa(
        [
            ("yes", ["yes"] * 10, "yes/no", "is this"),
            ("no", ["yes"] * 10, "yes/no", "is this"),
            ("2", ["2"] * 2 + ["3"] * 8, "number", "how many"),  # 0.6
            ("red", ["red"] * 3 + ["blue"] * 7, "other", "what color"),  # 0.9
        ]
    )
    assert s.overall == round(100 * (1 + 0 + 0.6 + 0.9) / 4, 2) == 62.5
    assert s.per_answer_type == {"yes/no": 50.0, "number": 60.0, "other": 90.0}
    assert s.per_question_type == {"is this": 50.0, "how many": 60.0, "what color": 90.0}
    assert s.count == 4 and s.counts_per_answer_type == {"yes/no": 2, "number": 1, "other": 1}
    d = s.to_dict()
    assert d["accuracy"] == 62.5 and d["questions"] == 4
    # Rounding to 2 places of the percentage: 1/3 of the questions right -> 33.33.
    assert (
        score_vqa([("a", ["a"] * 10, None, None), ("b", ["a"] * 10, None, None), ("c", ["a"] * 10, None, None)]).overall
        == 33.33
    )


def test_metrics_import_no_model_code() -> None:
    # The VQA normalisation is imported by other layers (best-of voting): it must stay pure Python.
    import ast
    import subprocess
    import sys
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "vlmcli" / "metrics"
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not [n for n in names if n.startswith(("vlmcli.", "llama_cpp", "PIL"))], (path.name, names)
    code = "import vlmcli.metrics.vqa, vlmcli.metrics.caption, vlmcli.metrics.tokenize, sys; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "numpy" not in loaded
