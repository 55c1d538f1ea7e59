"""`ask`: questions about an image, answered by SmolVLM2; one record per image.

The image is decoded in a worker thread, encoded once, and every question is answered from the
same KV cache (engines/llama.py). A front end that streams sets `on_token` / `on_answer_start` /
`on_progress` on the task; the record is the same whether the answers streamed or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from vlmcli.errors import VlmError
from vlmcli.defaults import DEFAULT_MAX_PIXELS
from vlmcli.tasks.resume import Record

if TYPE_CHECKING:
    from PIL import Image

    from vlmcli.engines.llama import EncodeProgress, Generation, GenerationOptions, TokenCallback, VlmEngine

DEFAULT_ASK_MAX_TOKENS = 256


class AskTask:
    """Several questions per image; records carry "answers": [{prompt, answer, stop_reason, generated_tokens}]."""

    name = "ask"
    batch_size = 1  # see benchmarks/bench_batch.py: multi-sequence decoding is measured there
    # One image decoded ahead is enough to hide decoding behind an answer (a second or more per
    # image); more decode threads only take CPU from llama.cpp's own threads.
    workers = 1
    prefetch = 2

    def __init__(self, engine: VlmEngine, prompts: list[str], generation: GenerationOptions, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        if not prompts:
            raise VlmError("no question given")
        self.engine = engine
        self.prompts = list(prompts)
        self.generation = generation
        self.max_pixels = max_pixels
        self.on_token: TokenCallback | None = None  # each generated piece (streaming)
        self.on_answer_start: Callable[[int], None] | None = None  # before answer i
        self.on_progress: EncodeProgress | None = None  # vision encoder passes done / in all
        g, opts = generation, engine.options
        self.identity: dict[str, Any] = {
            "task": self.name,
            "model": engine.model_path.name,
            "mmproj": engine.mmproj_path.name,
            "quant": getattr(engine.model_info, "file_type", None),
            **self._inputs(),
            "options": {
                "max_tokens": g.max_tokens,
                "temperature": g.temperature,
                "top_p": g.top_p,
                "seed": g.seed,
                "detail": opts.detail,
                "max_tiles": opts.max_tiles,
            },
        }

    def _inputs(self) -> dict[str, Any]:
        return {"prompts": self.prompts}

    def prepare(self, path: str) -> Image.Image:
        from vlmcli.images import load_image

        return load_image(path, max_pixels=self.max_pixels)

    def run(self, prepared: list[Image.Image]) -> list[Record | VlmError]:
        out: list[Record | VlmError] = []
        for image in prepared:
            try:
                out.append(self.record(self.generate(image)))
            except VlmError as e:
                out.append(e)
        return out

    def generate(self, image: Image.Image) -> list[Generation]:
        """Every prompt answered about one decoded image."""
        started = False  # per answer: the stream starts at its first non-blank piece, as the record's text does

        def stream(piece: str) -> bool | None:
            nonlocal started
            if not started:
                piece = piece.lstrip()
                if not piece:
                    return None
                started = True
            assert self.on_token is not None
            return self.on_token(piece)

        gens = self.engine.ask(image, self.prompts, self.generation, stream if self.on_token else None, self.on_progress)
        answers = []
        for i in range(len(self.prompts)):
            if self.on_answer_start is not None:
                self.on_answer_start(i)
            started = False
            answers.append(next(gens))
        return answers

    def _results(self, gens: list[Generation]) -> Record:
        return {
            "answers": [
                {"prompt": p, "answer": g.text.strip(), "stop_reason": g.stop_reason, "generated_tokens": g.generated_tokens}
                for p, g in zip(self.prompts, gens)
            ]
        }

    def record(self, gens: list[Generation]) -> Record:
        first = gens[0]
        enc = first.image
        timings: dict[str, float] = {}
        for g in gens:
            for k, v in g.timings.as_dict().items():
                if k.endswith("_ms"):
                    timings[k] = round(timings.get(k, 0.0) + v, 2)
        timings["load_ms"] = 0.0  # the model loads once per run, not per image
        return {
            **self._results(gens),
            "image_size": [enc.width, enc.height],
            "detail": enc.detail,
            "tiles": enc.tiles,
            "tokens": {"prompt": first.prompt_tokens, "image": enc.image_tokens, "generated": sum(g.generated_tokens for g in gens)},
            "timings": timings,
        }


def answers_text(record: Record) -> str:
    """The answers on one line (text output, sidecars)."""
    return " | ".join(" ".join(str(a.get("answer", "")).split()) for a in record.get("answers", []))
