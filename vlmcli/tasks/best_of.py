"""Inference-time scaling: SmolVLM2 samples N candidates for one prompt (engines/llama.py decodes
them together from one evaluated prompt) and a judge picks one.

- logprob: the highest mean token log-probability under the model;
- vote: self-consistency, the most frequent answer after VQA answer normalisation, ties by
  mean log-probability (for short answers);
- clip: the highest CLIP image-text cosine similarity (CLIPScore's ranking): SmolVLM2 writes, CLIP judges.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmcli.errors import InvalidOption

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from vlmcli.engines.clip import ClipModel
    from vlmcli.engines.llama import Candidate

SELECTIONS = ("logprob", "vote", "clip")
SAMPLING_TEMPERATURE = 0.7  # when N > 1 and no temperature is given: greedy candidates would all be equal
MAX_CANDIDATES = 64


def temperature_for(n: int, temperature: float | None) -> float:
    """The temperature to sample with: the one given, else greedy for one answer and
    SAMPLING_TEMPERATURE for several (greedy candidates would all be the same)."""
    if temperature is not None:
        return temperature
    return SAMPLING_TEMPERATURE if n > 1 else 0.0


def check(n: int, select: str) -> None:
    if not 1 <= n <= MAX_CANDIDATES:
        raise InvalidOption("best_of", f"{n} candidates: give 1 to {MAX_CANDIDATES}")
    if select not in SELECTIONS:
        raise InvalidOption("select", f"unknown selection {select!r} (choose {', '.join(SELECTIONS)})")


@dataclass
class Choice:
    index: int  # the chosen candidate
    scores: list[float]  # per candidate, what the selection compared (mean log-probability, votes, similarity)


def by_logprob(candidates: Sequence[Candidate]) -> Choice:
    scores = [c.mean_logprob for c in candidates]
    return Choice(max(range(len(scores)), key=lambda i: (scores[i], -i)), scores)


def by_vote(candidates: Sequence[Candidate], key: Callable[[str], str] | None = None) -> Choice:
    """The most frequent answer: compared after VQA normalisation, or by `key` (structured answers:
    their parsed objects as canonical JSON)."""
    from vlmcli.metrics.vqa import normalize_answer

    answers = [(key or normalize_answer)(c.text.strip()) for c in candidates]
    votes = Counter(answers)
    scores = [float(votes[a]) for a in answers]
    best = max(range(len(candidates)), key=lambda i: (scores[i], candidates[i].mean_logprob, -i))
    return Choice(best, scores)


class ClipJudge:
    """CLIP image-text similarity of the candidates, with the embeddings `vlm embed` computes."""

    def __init__(self, model: ClipModel, name: str):
        self.model = model
        self.name = name

    def similarities(self, image: Image.Image, texts: Sequence[str]) -> np.ndarray:
        import numpy as np

        from vlmcli.tasks.embed import embed_pixels, embed_texts, preprocess_image

        image_row = embed_pixels(self.model, preprocess_image(image, self.model.config)[None])[0]
        text_rows, _ = embed_texts(self.model, list(texts))
        return text_rows.astype(np.float64) @ image_row.astype(np.float64)

    def choose(self, image: Image.Image, candidates: Sequence[Candidate]) -> Choice:
        scores = [float(s) for s in self.similarities(image, [c.text.strip() for c in candidates])]
        return Choice(max(range(len(scores)), key=lambda i: (scores[i], -i)), scores)


def candidates_record(select: str, choice: Choice, candidates: Sequence[Candidate]) -> dict[str, Any]:
    """What a record carries about the candidates: every one with its score, and the chosen one."""
    return {
        "select": select,
        "chosen": choice.index,
        "candidates": [
            {
                "text": c.text.strip(),
                "score": round(score, 6),
                "mean_logprob": round(c.mean_logprob, 6),
                "tokens": len(c.tokens),
                "stop_reason": c.stop_reason,
            }
            for c, score in zip(candidates, choice.scores)
        ],
    }
