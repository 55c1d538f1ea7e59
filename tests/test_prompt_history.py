"""Conversations through the chat template: prompt.render_conversation and the engine's chat_turns.

The reference is the template rendered as transformers renders it (plain jinja2, trim_blocks and
lstrip_blocks), with the template string the fixture GGUF carries (the model's own)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from fixtures.smolvlm2 import CHAT_TEMPLATE

from vlmcli.engines.prompt import ChatPrompt, Turn, render_conversation

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"

HISTORY = [
    Turn("system", ("You are terse.",)),
    Turn("user", ("Hello",), image_at=0),
    Turn("assistant", ("Hi.",)),
    Turn("user", ("What is this?",)),
]


def reference(template: str, turns: list[Turn]) -> str:
    """What transformers' apply_chat_template renders for these messages (add_generation_prompt)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": t.role, "content": t.content()} for t in turns]
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def test_a_history_renders_as_the_template_does() -> None:
    before, after = render_conversation(CHAT_TEMPLATE, HISTORY)
    assert before + "<image>" + after == reference(CHAT_TEMPLATE, HISTORY)
    assert before == "<|im_start|>System: You are terse.<end_of_utterance>\nUser:"
    expected = "Hello<end_of_utterance>\nAssistant: Hi.<end_of_utterance>\n"
    assert after == expected + "User: What is this?<end_of_utterance>\nAssistant:"


@pytest.mark.parametrize(
    "turns",
    [
        [Turn("user", ("Describe it.",), image_at=1)],  # the image after the text
        [Turn("user", ("First", "second"), image_at=1)],  # between two texts
        [Turn("user", ("Hi",)), Turn("assistant", ()), Turn("user", ("Now this:",), image_at=1)],  # in a later turn
    ],
)
def test_the_image_goes_where_the_messages_put_it(turns: list[Turn]) -> None:
    before, after = render_conversation(CHAT_TEMPLATE, turns)
    assert before + "<image>" + after == reference(CHAT_TEMPLATE, turns)


def test_one_user_turn_is_the_single_question_prompt() -> None:
    chat = ChatPrompt.from_template(CHAT_TEMPLATE)
    before, after = render_conversation(CHAT_TEMPLATE, [Turn("user", ("What is this?",), image_at=0)])
    assert (before, after) == (chat.before_image, chat.after_image("What is this?"))
    assert render_conversation(None, [Turn("user", ("q",), image_at=0)]) == render_conversation(
        CHAT_TEMPLATE, [Turn("user", ("q",), image_at=0)]
    )


@pytest.mark.parametrize(
    "turns, why",
    [
        ([Turn("user", ("no image",))], "exactly one image"),
        ([Turn("user", ("a",), image_at=0), Turn("user", ("b",), image_at=0)], "exactly one image"),
        ([Turn("user", ("look: <image>",), image_at=0)], "may not contain"),
    ],
)
def test_conversations_the_split_cannot_trust_are_refused(turns: list[Turn], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        render_conversation(CHAT_TEMPLATE, turns)


# ---- the engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(smolvlm2_gguf):
    from vlmcli.engines.llama import EngineOptions, VlmEngine

    with VlmEngine(
        smolvlm2_gguf.model, smolvlm2_gguf.mmproj, EngineOptions(n_threads=1, n_ctx=2048, detail="low", n_seq_max=2)
    ) as e:
        yield e


@pytest.fixture(scope="module")
def image():
    from vlmcli.images import load_image

    return load_image(SAMPLE)


def test_the_engine_renders_the_template_the_gguf_carries(engine, image, smolvlm2_checkpoint: Path) -> None:
    from vlmcli.engines.llama import GenerationOptions

    shipped = json.loads((smolvlm2_checkpoint / "tokenizer_config.json").read_text())["chat_template"]
    assert engine.chat_template == shipped
    g = next(engine.chat_turns(image, HISTORY, GenerationOptions(max_tokens=2)))
    assert g.prompt == reference(engine.chat_template, HISTORY)


def test_one_user_turn_is_answered_as_ask_answers_it(engine, image) -> None:
    from vlmcli.engines.llama import GenerationOptions

    opts = GenerationOptions(max_tokens=6)
    asked = next(engine.ask(image, ["What is this?"], opts))
    chatted = next(engine.chat_turns(image, [Turn("user", ("What is this?",), image_at=0)], opts))
    assert (chatted.prompt, chatted.prompt_tokens, chatted.text) == (asked.prompt, asked.prompt_tokens, asked.text)
    history = next(engine.chat_turns(image, HISTORY, opts))
    assert history.prompt_tokens > asked.prompt_tokens  # the earlier turns reached the model


def test_a_bad_conversation_is_an_invalid_option(engine, image) -> None:
    from vlmcli.errors import InvalidOption

    with pytest.raises(InvalidOption) as e:
        next(engine.chat_turns(image, [Turn("user", ("no image",))]))
    assert e.value.option == "messages"


def test_candidates_stream_their_own_text(engine, image) -> None:
    from vlmcli.engines.llama import GenerationOptions

    pieces: dict[int, list[str]] = {0: [], 1: []}
    opts = GenerationOptions(max_tokens=6, temperature=0.8, seed=5, n=2)
    g = next(engine.chat_turns(image, HISTORY, opts, on_candidate_token=lambda i, p: pieces[i].append(p)))
    assert ["".join(pieces[i]) for i in (0, 1)] == [c.text for c in g.candidates]
    plain = next(engine.chat_turns(image, HISTORY, opts))  # streaming changes nothing of the candidates
    assert [c.tokens for c in plain.candidates] == [c.tokens for c in g.candidates]

    def stop_second(index: int, piece: str) -> bool | None:
        return False if index == 1 else None  # candidate 1 ends at its first piece, candidate 0 goes on

    g = next(engine.chat_turns(image, HISTORY, opts, on_candidate_token=stop_second))
    one, zero = g.candidates[1], g.candidates[0]
    assert (
        one.stop_reason == "stopped"
        and one.tokens == plain.candidates[1].tokens[: len(one.tokens)]
        and len(one.tokens) < 6
    )
    assert zero.tokens == plain.candidates[0].tokens
