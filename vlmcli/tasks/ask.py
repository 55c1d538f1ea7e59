"""`ask`: questions about an image, answered by SmolVLM2; one record per image (or per video, per
group of images and videos given together, per video segment, or per text-only prompt: media_inputs.py).

The image is decoded in a worker thread, encoded once, and every question is answered from the
same KV cache (engines/llama.py). A front end that streams sets `on_token` / `on_answer_start` /
`on_progress` on the task; the record is the same whether the answers streamed or not.
ChatTask answers a whole conversation instead (`vlm serve`): its turns go through the chat template.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

from vlmcli.defaults import DEFAULT_MAX_PIXELS
from vlmcli.errors import VlmError
from vlmcli.tasks import best_of
from vlmcli.tasks.media_inputs import MediaInput, PreparedMedia, load_media, sampling_identity
from vlmcli.tasks.resume import FileKey, Record
from vlmcli.tasks.task import Task
from vlmcli.tasks.video import Sampling, is_video

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
    from vlmcli.engines.media import Media
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
    sampling = Sampling()  # how videos' frames are taken (with_sampling: --fps, --max-frames)

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
                **sampling_identity(self.sampling),
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

    def with_sampling(self: VlmT, sampling: Sampling) -> VlmT:
        """This task taking videos' frames by `sampling` (--fps, --max-frames)."""
        self.sampling = sampling
        self.identity = self._identity()
        return self

    def close(self) -> None:
        self.engine.close()

    def base(self, input: str) -> Record:
        return {**MediaInput.parse(input).base(), **self.identity}

    def key(self, input: str, use_hash: bool) -> FileKey | None:
        return MediaInput.parse(input).key(use_hash)

    def load_input(self, input: str) -> Image.Image | PreparedMedia:
        """A plain image as ever; a video, several files, a segment or no file as PreparedMedia."""
        item = MediaInput.parse(input)
        if item.plain and not is_video(item.paths[0]):
            return self.load(item.paths[0])
        return PreparedMedia(item, load_media(item, self.max_pixels, self.engine.vision.tile_size, self.sampling))

    def _inputs(self) -> dict[str, Any]:
        return {"prompts": self.prompts}

    def load(self, path: str) -> Image.Image:
        from vlmcli.images import load_image

        return load_image(path, max_pixels=self.max_pixels)

    def generate(self, image: Media | Sequence[Media] | None) -> list[Answer]:
        """Every prompt answered about a decoded image, or several images and videos in order, or none
        (with best-of: the chosen candidate)."""
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
        self,
        image: Media | Sequence[Media] | None,
        on_token: TokenCallback | None,
        on_candidate: CandidateCallback | None,
    ) -> Iterator[Generation]:
        return self.engine.ask(image, self.prompts, self.generation, on_token, self.on_progress, on_candidate)

    def _choose(self, image: Media | Sequence[Media] | None, gen: Generation) -> Answer:
        if not gen.candidates:
            return Answer(gen)
        if self.judge is not None:
            return Answer(gen, self.judge.choose(_still(image), gen.candidates))
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

    def record(self, answers: list[Answer], prepared: PreparedMedia | None = None) -> Record:
        """The record of one input's answers; with `prepared` (anything but one plain image) its media listed."""
        gens = [a.generation for a in answers]
        first = gens[0]
        enc = first.image
        timings: dict[str, float] = {}
        for g in gens:
            for k, v in g.timings.as_dict().items():
                if k.endswith("_ms"):
                    timings[k] = round(timings.get(k, 0.0) + v, 2)
        timings["load_ms"] = 0.0  # the model loads once per run, not per image
        record: Record = {
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
        if prepared is not None:
            record["media"] = prepared.describe(first.media)
        return record


class AskTask(VlmTask):
    """Several questions per image; records carry "answers": [{prompt, answer, stop_reason, generated_tokens}]."""

    name = "ask"

    def prepare(self, path: str) -> Image.Image | PreparedMedia:
        return self.load_input(path)

    def run(self, prepared: list[Image.Image | PreparedMedia]) -> list[Record | VlmError]:
        out: list[Record | VlmError] = []
        for item in prepared:
            try:
                if isinstance(item, PreparedMedia):
                    out.append(self.record(self.generate(item.media), item))
                else:
                    out.append(self.record(self.generate(item)))
            except VlmError as e:
                if isinstance(item, PreparedMedia) and e.path is None:
                    e.path = item.input.label()  # not the runner's input string (NUL-joined paths)
                out.append(e)
        return out


class ChatTask(AskTask):
    """One conversation (system, user and assistant turns; images and videos anywhere in them, or none),
    answered as its next assistant turn: the whole history goes through the chat template, and the KV
    cells of the history the last turn shares with this one are kept. The record is AskTask's, its one
    prompt being the last user turn's text."""

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
        # A conversation's next turn shares its history with the last: keep the KV cells between calls.
        engine.options.reuse_kv = True
        users = [t for t in self.turns if t.role == "user"]
        question = "".join(users[-1].parts) if users else ""
        super().__init__(engine, [question], generation, max_pixels, n_best, select, judge, structure)

    def _inputs(self) -> dict[str, Any]:
        turns = [{"role": t.role, "parts": list(t.parts), "media": [list(m) for m in t.slots()]} for t in self.turns]
        return {"turns": turns}

    def _generations(
        self,
        image: Media | Sequence[Media] | None,
        on_token: TokenCallback | None,
        on_candidate: CandidateCallback | None,
    ) -> Iterator[Generation]:
        return self.engine.chat_turns(image, self.turns, self.generation, on_token, self.on_progress, on_candidate)


def turns_from(messages: Sequence[dict[str, Any]]) -> list[Turn]:
    """A front end's parsed messages, {"role", "parts": [texts], "media": [[index, "image" | "video"], ...]}
    (or the one-image form "image_at": index), as ChatTask's turns."""
    from vlmcli.engines.prompt import Turn  # here, not at the top: the CLI imports this module for its defaults

    return [
        Turn(m["role"], tuple(m["parts"]), m.get("image_at"), tuple((int(i), str(k)) for i, k in m.get("media", ())))
        for m in messages
    ]


def _still(media: Media | Sequence[Media] | None) -> Image.Image:
    """The picture a CLIP judge compares answers with: the first image, or a video's middle frame."""
    from vlmcli.engines.media import VideoFrames

    items: list[Media] = []
    if isinstance(media, (list, tuple)):
        items = list(media)
    elif media is not None:
        items = [cast("Media", media)]
    for item in items:
        if isinstance(item, VideoFrames):
            if item.frames:
                return item.frames[len(item.frames) // 2]
        else:
            return item
    raise VlmError("--select clip compares answers with an image; this prompt has none")


def answers_text(record: Record) -> str:
    """The answers on one line (text output, sidecars)."""
    return " | ".join(" ".join(str(a.get("answer", "")).split()) for a in record.get("answers", []))
