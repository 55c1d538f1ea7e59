"""Test-only helper: run the real pycocoevalcap (and its Java PTB tokenizer) on the same inputs.

The reference is found either in this interpreter (`import pycocoevalcap`) or in the interpreter
named by $VLM_PYCOCOEVALCAP_PYTHON (e.g. a separate venv with `pip install pycocoevalcap`). Tests that
use it are skipped when neither has it; the tokenizer also needs `java` on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, sys
req = json.load(sys.stdin)
out = {}
if req.get("tokenize") is not None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    caps = {i: [{"caption": c}] for i, c in enumerate(req["tokenize"])}
    tok = PTBTokenizer().tokenize(caps)
    out["tokens"] = [tok[i][0] for i in range(len(req["tokenize"]))]
if req.get("score") is not None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    cands, refs = req["score"]
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(cands)}
    b, bs = Bleu(4).compute_score(gts, res, verbose=0)
    r, rs = Rouge().compute_score(gts, res)
    c, cs = Cider().compute_score(gts, res)
    out["bleu"], out["bleu_each"] = b, bs
    out["rouge"], out["rouge_each"] = float(r), [float(x) for x in rs]
    out["cider"], out["cider_each"] = float(c), [float(x) for x in cs]
json.dump(out, sys.stdout)
"""


def _python() -> str | None:
    env = os.environ.get("VLM_PYCOCOEVALCAP_PYTHON")
    if env:
        return env
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def available(tokenizer: bool = False) -> bool:
    py = _python()
    if py is None:
        return False
    return not tokenizer or shutil.which("java") is not None


def run(tokenize: list[str] | None = None, score: tuple[list[str], list[list[str]]] | None = None) -> dict:
    py = _python()
    if py is None:
        pytest.skip("pycocoevalcap is not installed (set VLM_PYCOCOEVALCAP_PYTHON to a Python that has it)")
    if tokenize is not None and shutil.which("java") is None:
        pytest.skip("the PTB tokenizer needs java")
    r = subprocess.run(
        [py, "-c", _SCRIPT],
        input=json.dumps({"tokenize": tokenize, "score": score}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        raise RuntimeError(f"pycocoevalcap failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)
