"""SmolVLM2 prompts, rendered with the chat template the model file carries.

The template (transformers' SmolVLM processor default, see MODELS.md) turns a user turn holding an
image and a question into `<|im_start|>User:<image>What is this?<end_of_utterance>\\nAssistant:`.
We render it once with placeholders and split it there, so the part before the question is the
same for every question about one image (and its KV cache can be reused).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def render_user_turn(template: str | None, question: str, image_placeholder: str = "<image>") -> str:
    """The full prompt for one user turn (image first, then the question) and the assistant cue."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = env.from_string(template or DEFAULT_TEMPLATE).render(
        messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
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
        if rendered.count(_IMAGE) != 1 or rendered.count(_QUESTION) != 1 or rendered.index(_IMAGE) > rendered.index(_QUESTION):
            # A template that puts the question before the image cannot share the image prefix.
            raise ValueError("chat template does not place the image before the question")
        before, rest = rendered.split(_IMAGE)
        between, after = rest.split(_QUESTION)
        return cls(before, between, after)

    def after_image(self, question: str) -> str:
        return self.between + question + self.after_question

    def full(self, question: str, image: str = "<image>") -> str:
        return self.before_image + image + self.after_image(question)
