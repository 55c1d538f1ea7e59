"""SmolVLM2 prompts, rendered with the chat template the model file carries.

The template (transformers' SmolVLM processor default, as the model repository ships it) turns a user turn holding an
image and a question into `<|im_start|>User:<image>What is this?<end_of_utterance>\\nAssistant:`.
We render it once with placeholders and split it there, so the part before the question is the
same for every question about one image (and its KV cache can be reused).
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' SmolVLM default, used when a GGUF carries no template.
DEFAULT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_IMAGE = "\x00IMAGE\x00"
_QUESTION = "\x00QUESTION\x00"


class TemplateProblem(Exception):
    """A chat template that cannot be rendered: a syntax error, an error while rendering, a result
    without the image or question, or a render over the bounds below. The message is one line."""

    def __init__(self, message: str):
        line = " ".join(message.split())
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in line))


# A chat template comes from the model file, so it is untrusted code. Jinja's sandbox stops it from
# reaching Python's internals, not from taking time or memory; these bounds do. Real templates (a few
# KB, loops over the messages) are far inside them.
MAX_TEMPLATE_CHARS = 1 << 20  # the template source
MAX_OUTPUT_CHARS = 1 << 20  # the rendered text
MAX_RENDER_STEPS = 200_000  # lines of compiled template code executed (loops, macro calls)
MAX_CALL_NUMBER = 1_000_000  # largest number passed to a function or filter (range(), center(), ...)
MAX_SEQUENCE = 100_000  # longest string or list made by `*` or `+`
_LONG_NUMBER = re.compile(r"\d{7,}")  # a literal of 7+ digits: widths, counts no real template needs


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise TemplateProblem(f"the template raises a number to the power {right}")
            result = left**right
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SEQUENCE:
                    raise TemplateProblem(f"the template makes a sequence of {len(seq) * n} items")
            result = left * right
        else:
            result = left + right
        if isinstance(result, int) and result.bit_length() > 64:
            raise TemplateProblem("the template computes a number beyond 64 bits")
        if isinstance(result, (str, list, tuple)) and len(result) > MAX_SEQUENCE and operator != "+":
            raise TemplateProblem(f"the template makes a sequence of {len(result)} items")
        return result

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_numbers(args, kwargs)
        return super().call(context, obj, *args, **kwargs)

    def __init__(self, **options: Any):
        super().__init__(**options)
        # Compiled templates call filters directly, not through call(): wrap them (center, indent,
        # truncate, batch... take sizes).
        self.filters = {name: _bounded_filter(f) for name, f in self.filters.items()}


def _bounded_filter(f: Any) -> Any:
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_numbers(args[1:], kwargs)
        return f(*args, **kwargs)

    return bounded


def _check_numbers(args: Any, kwargs: Any) -> None:
    for v in [*args, *kwargs.values()]:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > MAX_CALL_NUMBER:
            raise TemplateProblem(f"the template passes {v} to a function (at most {MAX_CALL_NUMBER})")


def _render_bounded(template: str, **context: Any) -> str:
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateProblem(f"the template has {len(template)} characters (at most {MAX_TEMPLATE_CHARS})")
    if (m := _LONG_NUMBER.search(template)) is not None:
        raise TemplateProblem(f"the template holds the number {m.group()[:20]} (at most 6 digits)")
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    steps = 0

    def step(frame: Any, event: str, arg: Any) -> Any:
        nonlocal steps
        steps += 1
        if steps > MAX_RENDER_STEPS:
            raise TemplateProblem(f"rendering the template takes more than {MAX_RENDER_STEPS} steps")
        return step

    def enter(frame: Any, event: str, arg: Any) -> Any:  # trace only the template's own code
        return step(frame, event, arg) if frame.f_code.co_filename == "<template>" else None

    try:
        compiled = env.from_string(template)
        pieces: list[str] = []
        size = 0
        previous = sys.gettrace()
        sys.settrace(enter)
        try:
            for piece in compiled.generate(**context):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateProblem(f"the template renders more than {MAX_OUTPUT_CHARS} characters")
                pieces.append(piece)
        finally:
            sys.settrace(previous)
        return "".join(pieces)
    except TemplateProblem:
        raise
    except jinja2.TemplateSyntaxError as e:
        raise TemplateProblem(f"syntax error on line {e.lineno}: {e.message}") from None
    except (
        jinja2.TemplateError,
        ArithmeticError,
        LookupError,
        TypeError,
        ValueError,
        AttributeError,
        RecursionError,
        MemoryError,
    ) as e:
        raise TemplateProblem(f"rendering failed ({type(e).__name__}: {e})") from None


def render_user_turn(template: str | None, question: str, image_placeholder: str = "<image>") -> str:
    """The full prompt for one user turn (image first, then the question) and the assistant cue.

    Raises TemplateProblem when the template cannot be rendered (within the bounds above)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = _render_bounded(
        template or DEFAULT_TEMPLATE, messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
    )
    return text.replace("<image>", image_placeholder)


@dataclass
class ChatPrompt:
    before_image: str  # e.g. "<|im_start|>User:"
    between: str  # text between the image and the question (empty for SmolVLM2)
    after_question: str  # e.g. "<end_of_utterance>\nAssistant:"

    @classmethod
    def from_template(cls, template: str | None) -> ChatPrompt:
        rendered = render_user_turn(template, _QUESTION, _IMAGE)
        if (
            rendered.count(_IMAGE) != 1
            or rendered.count(_QUESTION) != 1
            or rendered.index(_IMAGE) > rendered.index(_QUESTION)
        ):
            # A template that puts the question before the image cannot share the image prefix.
            raise TemplateProblem("it does not place the image once, before the question, in a user turn")
        before, rest = rendered.split(_IMAGE)
        between, after = rest.split(_QUESTION)
        return cls(before, between, after)

    def after_image(self, question: str) -> str:
        return self.between + question + self.after_question

    def full(self, question: str, image: str = "<image>") -> str:
        return self.before_image + image + self.after_image(question)


# ---- conversations ---------------------------------------------------------------------------

IMAGE_TOKEN = "<image>"  # what SmolVLM2's template writes for an image part
VIDEO_TOKEN = "<video>"  # ... and for a video part
MEDIA_TOKENS = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}
_MEDIA_SPLIT = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: its role, its texts in order, and where its images and videos go
    among them. `media` holds (index among `parts` the item comes before, "image" | "video") in order;
    `image_at` is the older one-image form (an image before parts[image_at]), used when `media` is empty."""

    role: str  # system | user | assistant (the template capitalizes it: "User:")
    parts: tuple[str, ...] = ()
    image_at: int | None = None
    media: tuple[tuple[int, str], ...] = ()

    def slots(self) -> tuple[tuple[int, str], ...]:
        """This turn's media, in order: (the index among parts it comes before, its kind)."""
        if self.media:
            return self.media
        return ((self.image_at, "image"),) if self.image_at is not None else ()

    def content(self) -> list[dict[str, str]]:
        """The message content as transformers' chat templates read it."""
        items: list[dict[str, str]] = []
        slots = list(self.slots())
        for i, text in enumerate(self.parts):
            while slots and slots[0][0] <= i:
                items.append({"type": slots.pop(0)[1]})
            items.append({"type": "text", "text": text})
        items += [{"type": kind} for _, kind in slots]
        # SmolVLM2's template reads content[0]: an empty message (an assistant turn with no text) is one empty text.
        return items or [{"type": "text", "text": ""}]


def render_turns(template: str | None, turns: list[Turn]) -> str:
    """The whole prompt for the next assistant turn, each image and video written as the template writes
    it (<image>, <video>). Raises TemplateProblem for a template fault."""
    messages = [{"role": t.role, "content": t.content()} for t in turns]
    return _render_bounded(
        template or DEFAULT_TEMPLATE, messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
    )


def split_media(template: str | None, turns: list[Turn]) -> tuple[list[str], list[str]]:
    """The rendered prompt cut at its media: (texts, kinds), len(texts) == len(kinds) + 1, the prompt being
    texts[0] + <kinds[0]> + texts[1] + ... Raises ValueError for texts holding a media token (the cut finds
    media by them), TemplateProblem when the template does not write each item once, in order."""
    for t in turns:
        for p in t.parts:
            for token in MEDIA_TOKENS.values():
                if token in p:
                    raise ValueError(f"message texts may not contain the {token.strip('<>')} token {token}")
    kinds = [kind for t in turns for _, kind in t.slots()]
    pieces = _MEDIA_SPLIT.split(render_turns(template, turns))
    texts, written = pieces[0::2], [p.strip("<>") for p in pieces[1::2]]
    if written != kinds:
        raise TemplateProblem(f"it writes the media as {written}, not as the messages give them ({kinds})")
    return texts, kinds


def render_conversation(template: str | None, turns: list[Turn]) -> tuple[str, str]:
    """The prompt for the next assistant turn, split where the one image goes: (before, after).

    `before + "<image>" + after` is exactly what the template renders for these messages with the
    generation cue. Raises TemplateProblem for a template fault, ValueError for a conversation that
    is not one image plus texts the split can trust."""
    kinds = [kind for t in turns for _, kind in t.slots()]
    if kinds.count("image") != 1 or len(kinds) != 1:
        raise ValueError(f"a conversation needs exactly one image (it has {len(kinds)})")
    if any(IMAGE_TOKEN in p for t in turns for p in t.parts):
        raise ValueError(f"message texts may not contain the image token {IMAGE_TOKEN}")
    texts, _ = split_media(template, turns)
    return texts[0], texts[1]


def question_layout(template: str | None, kinds: list[str]) -> tuple[list[str], str, str]:
    """One user turn of media (of these kinds, in order) and then a question: (the texts before each
    item, the text between the last item and the question, the text after the question)."""
    texts, _ = split_media(template, [Turn("user", (_QUESTION,), media=tuple((0, k) for k in kinds))])
    last = texts[-1]
    if last.count(_QUESTION) != 1 or any(_QUESTION in t for t in texts[:-1]):
        raise TemplateProblem("it does not place the question once, after the images")
    head, tail = last.split(_QUESTION)
    return texts[:-1], head, tail


# ---- video -----------------------------------------------------------------------------------
# The text transformers' SmolVLM processor writes around a video's frames (processing_smolvlm.py,
# video_processing_smolvlm.py): an intro with the frame count in words and the duration as H:MM:SS,
# "\nFrame from MM:SS:" before each frame (an unsplit image), and a blank line after the last.

MEDIA_OUTRO = "\n\n"


def video_intro(n_frames: int, duration_s: float) -> str:
    d = int(duration_s)
    return (
        f"You are provided the following series of {number_words(n_frames)} frames from a "
        f"{d // 3600}:{d // 60 % 60:02d}:{d % 60:02d} [H:MM:SS] video.\n"
    )


def frame_label(seconds: float) -> str:
    return f"\nFrame from {int(seconds // 60):02d}:{int(seconds % 60):02d}:"


_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
_ONES += "seventeen eighteen nineteen"
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety"


def number_words(n: int) -> str:
    """A count in English words as num2words writes it ("sixty-four", "one hundred and five")."""
    ones, tens = _ONES.split(), _TENS.split()
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return ones[n]
    if n < 100:
        return tens[n // 10] + ("-" + ones[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return ones[n // 100] + " hundred" + (" and " + number_words(rest) if rest else "")
    rest = n % 1000
    head = number_words(n // 1000) + " thousand"
    if not rest:
        return head
    return head + (" and " if rest < 100 else ", ") + number_words(rest)
