"""`ask`: questions about an image, answered by SmolVLM2; one record per image.

The image is decoded in a worker thread, encoded once, and every question is answered from the
same KV cache (engines/llama.py). A front end that streams sets `on_token` / `on_answer_start` /
`on_progress` on the task; the record is the same whether the answers streamed or not.
ChatTask answers a whole conversation instead (`vlm serve`): its turns go through the chat template.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from vlmcli.defaults import DEFAULT_MAX_PIXELS
from vlmcli.errors import VlmError
from vlmcli.tasks import best_of
from vlmcli.tasks.resume import Record
from vlmcli.tasks.task import Task

if TYPE_CHECKING:
    from PIL import Image

    from vlmcli.engines.llama import (
        CandidateCallback,
        EncodeProgress,
        Generation,
        GenerationOptions,
        TokenCallback,
        VlmEngine,
    )
    from vlmcli.engines.prompt import Turn
    from vlmcli.tasks.structured import Structure

VlmT = TypeVar("VlmT", bound="VlmTask")


@dataclass
class Answer:
    """One prompt's result: the generation, and with best-of the judge's choice among its candidates."""

    generation: Generation
    choice: best_of.Choice | None = None

    @property
    def text(self) -> str:
        g = self.generation
        return (g.candidates[self.choice.index].text if self.choice else g.text).strip()

    @property
    def stop_reason(self) -> str:
        g = self.generation
        return g.candidates[self.choice.index].stop_reason if self.choice else g.stop_reason


class VlmTask(Task):
    """SmolVLM2 answering prompts about one image from one encoding: the settings, identity,
    generation (streaming, best-of) and record that ask, caption, chat and eval's VQA share."""

    batch_size = 1  # see benchmarks/bench_batch.py: multi-sequence decoding is measured there
    # One image decoded ahead is enough to hide decoding behind an answer (a second or more per
    # image); more decode threads only take CPU from llama.cpp's own threads.
    workers: int | None = 1
    prefetch: int | None = 2

    def __init__(
        self,
        engine: VlmEngine,
        prompts: list[str],
        generation: GenerationOptions,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        n_best: int = 1,
        select: str = "logprob",
        judge: best_of.ClipJudge | None = None,
        structure: Structure | None = None,
    ):
        if not prompts:
            raise VlmError("no question given")
        best_of.check(n_best, select)
        if select == "clip" and n_best > 1 and judge is None:
            raise VlmError("selecting by CLIP needs a CLIP model")
        self.engine = engine
        self.prompts = list(prompts)
        self.structure = structure  # --json-schema / --grammar: what the answers follow (tasks/structured.py)
        # The engine samples n_best candidates per prompt, under the structure's grammar.
        self.generation = replace(generation, n=n_best, constraint=structure.constraint() if structure else None)
        self.max_pixels = max_pixels
        self.select = select
        self.judge = judge if select == "clip" else None
        self.on_token: TokenCallback | None = None  # each generated piece (streaming)
        self.on_answer_start: Callable[[int], None] | None = None  # before answer i
        self.on_progress: EncodeProgress | None = None  # vision encoder passes done / in all
        self.on_candidate_token: CandidateCallback | None = None  # best-of streaming: (candidate, piece)
        self.n_best = n_best
        self.identity: dict[str, Any] = self._identity()

    def _identity(self) -> dict[str, Any]:
        g, opts, engine, n_best = self.generation, self.engine.options, self.engine, self.n_best
        return {
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
                # Only with best-of, so that records of plain runs stay reusable on resume.
                **({"best_of": n_best, "select": self.select} if n_best > 1 else {}),
                **({"judge": self.judge.name} if n_best > 1 and self.judge else {}),
                **(self.structure.identity() if self.structure else {}),
            },
        }

    def with_best_of(self: VlmT, n_best: int) -> VlmT:
        """This task over the same model, sampling `n_best` candidates per answer at the temperature
        best_of.temperature_for gives (eval: a row per N)."""
        best_of.check(n_best, self.select)
        task = copy.copy(self)
        temperature = best_of.temperature_for(n_best, self.generation.temperature or None)
        task.generation = replace(self.generation, n=n_best, temperature=temperature)
        task.n_best = n_best
        task.identity = task._identity()
        return task

    def close(self) -> None:
        self.engine.close()

    def _inputs(self) -> dict[str, Any]:
        return {"prompts": self.prompts}

    def load(self, path: str) -> Image.Image:
        from vlmcli.images import load_image

        return load_image(path, max_pixels=self.max_pixels)

    def generate(self, image: Image.Image) -> list[Answer]:
        """Every prompt answered about one decoded image (with best-of: the chosen candidate)."""
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

        candidates_started: set[int] = set()

        def stream_candidate(index: int, piece: str) -> bool | None:
            if index not in candidates_started:
                piece = piece.lstrip()
                if not piece:
                    return None
                candidates_started.add(index)
            assert self.on_candidate_token is not None
            return self.on_candidate_token(index, piece)

        one = self.generation.n == 1
        gens = self._generations(
            image,
            stream if self.on_token and one else None,
            stream_candidate if self.on_candidate_token and not one else None,
        )
        answers = []
        for i in range(len(self.prompts)):
            if self.on_answer_start is not None:
                self.on_answer_start(i)
            started = False
            candidates_started.clear()
            answers.append(self._choose(image, next(gens)))
        return answers

    def _generations(
        self, image: Image.Image, on_token: TokenCallback | None, on_candidate: CandidateCallback | None
    ) -> Iterator[Generation]:
        return self.engine.ask(image, self.prompts, self.generation, on_token, self.on_progress, on_candidate)

    def _choose(self, image: Image.Image, gen: Generation) -> Answer:
        if not gen.candidates:
            return Answer(gen)
        if self.judge is not None:
            return Answer(gen, self.judge.choose(image, gen.candidates))
        if self.select == "vote":
            return Answer(gen, best_of.by_vote(gen.candidates, self.structure.vote_key if self.structure else None))
        return Answer(gen, best_of.by_logprob(gen.candidates))

    def _answer_fields(self, a: Answer) -> Record:
        extra = best_of.candidates_record(self.select, a.choice, a.generation.candidates) if a.choice else {}
        return {
            "answer": a.text,
            "stop_reason": a.stop_reason,
            "generated_tokens": a.generation.generated_tokens,
            **(self.structure.answer_fields(a.text) if self.structure else {}),
            **extra,
        }

    def _results(self, answers: list[Answer]) -> Record:
        return {"answers": [{"prompt": p, **self._answer_fields(a)} for p, a in zip(self.prompts, answers)]}

    def record(self, answers: list[Answer]) -> Record:
        gens = [a.generation for a in answers]
        first = gens[0]
        enc = first.image
        timings: dict[str, float] = {}
        for g in gens:
            for k, v in g.timings.as_dict().items():
                if k.endswith("_ms"):
                    timings[k] = round(timings.get(k, 0.0) + v, 2)
        timings["load_ms"] = 0.0  # the model loads once per run, not per image
        return {
            **self._results(answers),
            "image_size": [enc.width, enc.height],
            "detail": enc.detail,
            "tiles": enc.tiles,
            "cache": enc.cached,  # "kv" / "embd": the image's encoding came from the encoding cache
            "tokens": {
                "prompt": first.prompt_tokens,
                "image": enc.image_tokens,
                "generated": sum(g.generated_tokens for g in gens),
            },
            "timings": timings,
        }


class AskTask(VlmTask):
    """Several questions per image; records carry "answers": [{prompt, answer, stop_reason, generated_tokens}]."""

    name = "ask"

    def prepare(self, path: str) -> Image.Image:
        return self.load(path)

    def run(self, prepared: list[Image.Image]) -> list[Record | VlmError]:
        out: list[Record | VlmError] = []
        for image in prepared:
            try:
                out.append(self.record(self.generate(image)))
            except VlmError as e:
                out.append(e)
        return out


class ChatTask(AskTask):
    """One conversation about one image (system, user and assistant turns; the image in any of
    them), answered as its next assistant turn: the whole history goes through the chat template.
    The record is AskTask's, its one prompt being the last user turn's text."""

    name = "chat"

    def __init__(
        self,
        engine: VlmEngine,
        turns: Sequence[Turn],
        generation: GenerationOptions,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        n_best: int = 1,
        select: str = "logprob",
        judge: best_of.ClipJudge | None = None,
        structure: Structure | None = None,
    ):
        self.turns = list(turns)
        users = [t for t in self.turns if t.role == "user"]
        question = "".join(users[-1].parts) if users else ""
        super().__init__(engine, [question], generation, max_pixels, n_best, select, judge, structure)

    def _inputs(self) -> dict[str, Any]:
        return {"turns": [{"role": t.role, "parts": list(t.parts), "image_at": t.image_at} for t in self.turns]}

    def _generations(
        self, image: Image.Image, on_token: TokenCallback | None, on_candidate: CandidateCallback | None
    ) -> Iterator[Generation]:
        return self.engine.chat_turns(image, self.turns, self.generation, on_token, self.on_progress, on_candidate)


def turns_from(messages: Sequence[dict[str, Any]]) -> list[Turn]:
    """A front end's parsed messages, {"role", "parts": [texts], "image_at": index or None}, as ChatTask's turns."""
    from vlmcli.engines.prompt import Turn  # here, not at the top: the CLI imports this module for its defaults

    return [Turn(m["role"], tuple(m["parts"]), m.get("image_at")) for m in messages]


def answers_text(record: Record) -> str:
    """The answers on one line (text output, sidecars)."""
    return " | ".join(" ".join(str(a.get("answer", "")).split()) for a in record.get("answers", []))
