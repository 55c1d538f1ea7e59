"""`vlm chat [IMAGE...]`: a conversation with SmolVLM2 about images and videos, or none.

Each line is a user turn; the answer streams to stdout. /image PATH and /video PATH add a file to the
next turn, /clear starts over, /exit (or end of input) ends. The history's KV cells stay in the cache
between turns (ChatTask keeps them), so a turn evaluates only what it adds. On a terminal lines are
edited with readline and the prompt goes to stderr; from a pipe the lines are read as they come.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import typer

from vlmcli.cli import media_options as media_cli
from vlmcli.cli.app import CtxOpt, GpuOpt, MaxPixelsOpt, NoCacheOpt, OfflineOpt, ThreadsOpt, app, info
from vlmcli.cli.messages import describe
from vlmcli.cli.vlm import (
    DetailOpt,
    GrammarOpt,
    JsonSchemaOpt,
    MaxTilesOpt,
    MaxTokensOpt,
    MmprojOpt,
    ModelOpt,
    SeedOpt,
    TemperatureOpt,
    TopPOpt,
    structure_of,
)
from vlmcli.defaults import DEFAULT_N_CTX
from vlmcli.errors import ContextOverflow, VlmError

if TYPE_CHECKING:
    from vlmcli.engines.llama import GenerationOptions, VlmEngine
    from vlmcli.engines.media import Media
    from vlmcli.engines.prompt import Turn
    from vlmcli.tasks.structured import Structure
    from vlmcli.tasks.video import Sampling

HELP = "/image PATH, /video PATH: add to your next message   /clear: start over   /exit: end"


@dataclass
class Conversation:
    """The turns so far, the media they hold (in order), and the files waiting for the next user turn."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)
    pending: list[tuple[str, Media]] = field(default_factory=list)  # (kind, decoded)

    def clear(self) -> None:
        self.turns, self.media, self.pending = [], [], []

    def user(self, text: str) -> list[Turn]:
        """The turns with this user message (and the pending files before it) added; not yet kept."""
        from vlmcli.engines.prompt import Turn

        turns = list(self.turns)
        if self.system and not turns:
            turns.append(Turn("system", (self.system,)))
        return [*turns, Turn("user", (text,), media=tuple((0, kind) for kind, _ in self.pending))]

    def answered(self, turns: list[Turn], answer: str) -> None:
        from vlmcli.engines.prompt import Turn

        self.media += [m for _, m in self.pending]
        self.pending = []
        self.turns = [*turns, Turn("assistant", (answer,))]


class Session:
    """The model, the options of each turn, and the conversation."""

    def __init__(
        self,
        engine: VlmEngine,
        gen: GenerationOptions,
        max_pixels: int,
        sampling: Sampling,
        system: str | None,
        verbose: bool = False,
        structure: Structure | None = None,
    ):
        self.engine, self.gen, self.max_pixels, self.sampling = engine, gen, max_pixels, sampling
        self.structure = structure  # --json-schema / --grammar: what every answer follows
        self.conversation = Conversation(system)
        self.verbose = verbose

    def add(self, path: str, want: str | None = None) -> None:
        """A file for the next user turn (want: "image" / "video" when the command named it)."""
        from vlmcli.engines.media import kind_of
        from vlmcli.tasks.media_inputs import MediaInput, load_media

        (item,) = load_media(MediaInput((path,)), self.max_pixels, self.engine.vision.tile_size, self.sampling)
        kind = kind_of(item)
        if want is not None and kind != want:
            raise VlmError(f"this is {'a video' if kind == 'video' else 'an image'}; use /{kind}", path)
        self.conversation.pending.append((kind, item))

    def say(self, text: str) -> str:
        """The answer to one user message, streamed to stdout as it is generated."""
        from vlmcli.tasks.ask import ChatTask

        c = self.conversation
        turns = c.user(text)
        task = ChatTask(self.engine, turns, self.gen, self.max_pixels, structure=self.structure)
        started = False

        def stream(piece: str) -> None:
            nonlocal started
            started = True
            sys.stdout.write(piece)
            sys.stdout.flush()

        task.on_token = stream
        answer = task.generate([*c.media, *(m for _, m in c.pending)])[0]
        sys.stdout.write("\n" if started else answer.text + "\n")
        sys.stdout.flush()
        c.answered(turns, answer.text)
        if self.verbose:
            g = answer.generation
            info(
                f"[{g.prompt_tokens} prompt tokens, {g.timings.prefill_tokens} evaluated now, "
                f"{g.image.encoder_passes} encoder passes, {g.generated_tokens} generated]"
            )
        return answer.text


def _lines(interactive: bool) -> Iterator[str]:
    """The user's lines: with readline's editing and a prompt on a terminal, plain lines from a pipe."""
    if interactive:
        importlib.import_module("readline")  # input() edits lines and keeps history once it is loaded

        while True:
            try:
                yield input("> ")
            except EOFError:
                sys.stderr.write("\n")
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


@app.command(help="Chat with SmolVLM2 about images and videos (or none); /image, /video, /clear, /exit.")
def chat(
    images: list[str] | None = typer.Argument(None, help="Images or videos for the first message."),
    system: str | None = typer.Option(None, "--system", help="A system message opening the conversation."),
    model: str | None = ModelOpt,
    mmproj: str | None = MmprojOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: float | None = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    threads: int | None = ThreadsOpt,
    n_gpu_layers: int = GpuOpt,
    ctx: int = CtxOpt,
    detail: str | None = DetailOpt,
    max_tiles: int | None = MaxTilesOpt,
    max_pixels: int = MaxPixelsOpt,
    fps: float | None = media_cli.FpsOpt,
    max_frames: int | None = media_cli.MaxFramesOpt,
    offline: bool = OfflineOpt,
    no_cache: bool = NoCacheOpt,
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="After each answer: prompt tokens, those evaluated now, encoder passes."
    ),
    json_schema: str | None = JsonSchemaOpt,
    grammar: str | None = GrammarOpt,
) -> None:
    """Chat with SmolVLM2 (the command's help is above: one line, as `vlm --help` lists it)."""
    from vlmcli.engines.llama import GenerationOptions
    from vlmcli.tasks.models import ModelSpec, open_model

    structure = structure_of(json_schema, grammar)
    for path in images or []:
        media_cli.check_single(path, max_pixels)  # a bad file fails before the model loads
    # A conversation grows and may take videos at any turn: the model's own context unless --ctx says.
    ctx = 0 if ctx == DEFAULT_N_CTX else ctx
    spec = ModelSpec(model, mmproj, offline or None, threads, n_gpu_layers, ctx, detail, max_tiles, cache=not no_cache)
    engine = open_model(spec, "vlm", notify=info).engine
    gen = GenerationOptions(max_tokens=max_tokens, temperature=temperature or 0.0, top_p=top_p, seed=seed)
    session = Session(engine, gen, max_pixels, media_cli.sampling(fps, max_frames), system, verbose, structure)
    for path in images or []:
        session.add(path)
    interactive = sys.stdin.isatty()
    if interactive:
        info(HELP)
    try:
        for line in _lines(interactive):
            if not _turn(session, line.strip()):
                break
    finally:
        engine.close()


def _turn(session: Session, line: str) -> bool:
    """One line of input: a command or a message. False ends the session."""
    command, _, arg = line.partition(" ")
    try:
        if not line:
            return True
        if command in ("/exit", "/quit"):
            return False
        if command == "/clear":
            session.conversation.clear()
        elif command in ("/image", "/video"):
            if not arg.strip():
                raise VlmError(f"{command} needs a file: {command} PATH")
            session.add(arg.strip(), command[1:])
        elif command == "/help":
            info(HELP)
        elif line.startswith("/") and " " not in command[1:] and command[1:].isalpha():
            raise VlmError(f"unknown command {command} ({HELP})")
        else:
            session.say(line)
    except VlmError as e:
        hint = " (or /clear to start over)" if isinstance(e, ContextOverflow) else ""
        info(f"vlm: error: {describe(e)}{hint}")
    return True
