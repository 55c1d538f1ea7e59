"""`caption`: SmolVLM2 describes each image or video (or video segment): `ask` with one fixed instruction;
records carry "caption"."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmcli.defaults import DEFAULT_CAPTION_MAX_TOKENS, DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_PIXELS
from vlmcli.tasks.ask import Answer, AskTask
from vlmcli.tasks.resume import Record

if TYPE_CHECKING:
    from vlmcli.engines.llama import GenerationOptions, VlmEngine
    from vlmcli.tasks.best_of import ClipJudge
    from vlmcli.tasks.structured import Structure

__all__ = ["DEFAULT_CAPTION_MAX_TOKENS", "DEFAULT_CAPTION_PROMPT", "CaptionTask", "caption_text"]


class CaptionTask(AskTask):
    name = "caption"

    def __init__(
        self,
        engine: VlmEngine,
        generation: GenerationOptions,
        prompt: str = DEFAULT_CAPTION_PROMPT,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        n_best: int = 1,
        select: str = "logprob",
        judge: ClipJudge | None = None,
        structure: Structure | None = None,
    ):
        super().__init__(engine, [prompt], generation, max_pixels, n_best, select, judge, structure)

    def _inputs(self) -> dict[str, Any]:
        return {"prompt": self.prompts[0]}

    def _results(self, answers: list[Answer]) -> Record:
        fields = self._answer_fields(answers[0])
        del fields["generated_tokens"]  # in "tokens", as before best-of
        return {"caption": fields.pop("answer"), **fields}


def caption_text(record: Record) -> str:
    """A caption on one line (text output, CSV, sidecars); a video segment's after its times."""
    text = " ".join(str(record.get("caption", "")).split())
    segment = record.get("segment")
    if isinstance(segment, dict):
        return f"[{_clock(segment.get('start', 0))}-{_clock(segment.get('end', 0))}] {text}"
    return text


def _clock(seconds: Any) -> str:
    s = int(float(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"
