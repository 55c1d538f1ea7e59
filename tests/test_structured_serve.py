"""`vlm serve` structured output through real clients: the official `openai` client (both response_format
kinds, streaming, logprobs), LangChain's with_structured_output (json_schema and json_mode) and simonw's
`llm --schema`; unsupported fields are 400s naming them. One module-scoped server on a random-weight model."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from serving import start_server, stop_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from vlmcli.tasks.structured import from_schema  # noqa: E402  (after the skips: the server extra)

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"
IMAGE_URL = "data:image/jpeg;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "scene": {"enum": ["in", "out"]},
    },
    "required": ["ok", "tags", "scene"],
    "additionalProperties": False,
}
MAX_TOKENS = 36  # the shortest answer takes 32 tokens in the test model's vocabulary


@pytest.fixture(scope="module")
def server(smolvlm2_folder, tmp_path_factory):
    model_dir = smolvlm2_folder("tiny")
    log = open(tmp_path_factory.mktemp("structured-serve-log") / "server.log", "w+")
    args = ["--model", str(model_dir), "--workers", "1", "--max-n", "50", "--timeout", "300"]
    process, url = start_server(args, log)
    yield url + "/v1"
    stop_server(process)
    log.close()


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=300)


def messages(text: str = "Tag this image as JSON.") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}}, {"type": "text", "text": text}],
        }
    ]


def json_schema_format(schema: dict = SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "tags", "schema": schema, "strict": True}}


def test_a_hundred_choices_parse_and_validate(client) -> None:
    """n=50 choices per request (decoded together, each constrained) at temperature 1: 100 following a
    json_schema, 50 json_object answers."""
    structure = from_schema(SCHEMA)
    for fmt, questions in (
        (json_schema_format(), ("Tag this image as JSON.", "What is in it? JSON.")),
        ({"type": "json_object"}, ("Tag this image as JSON.",)),
    ):
        choices = []
        for question in questions:
            r = client.chat.completions.create(
                model="tiny", messages=messages(question), max_tokens=MAX_TOKENS, temperature=1, n=50,
                response_format=fmt,
            )  # fmt: skip
            choices += r.choices
        assert len(choices) == 50 * len(questions)
        for c in choices:
            assert c.finish_reason == "stop", c
            value = json.loads(c.message.content)
            if fmt["type"] == "json_schema":
                assert structure.parse(c.message.content) == (value, None)
            else:
                assert isinstance(value, dict)


def test_streaming_and_logprobs(client) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=messages(), max_tokens=MAX_TOKENS, temperature=1, seed=5, stream=True,
        response_format=json_schema_format(), logprobs=True, top_logprobs=3,
    )  # fmt: skip
    text, content, finish = "", [], None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None and c.logprobs.content:
                content += c.logprobs.content
            finish = c.finish_reason or finish
    assert finish == "stop" and from_schema(SCHEMA).parse(text)[1] is None
    assert "".join(t.token for t in content).strip() == text.strip()
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in content)
    r = client.chat.completions.create(
        model="tiny", messages=messages(), max_tokens=8, temperature=0, logprobs=True, top_logprobs=0
    )
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens and all(t.top_logprobs == [] and t.bytes for t in lp)

    # The beta parse helper (strict schemas, finish_reason checked) reads every answer.
    from pydantic import BaseModel

    class Tags(BaseModel):
        ok: bool
        tags: list[str]
        scene: Literal["in", "out"]

    for seed in range(3):
        parsed = client.chat.completions.parse(
            model="tiny", messages=messages(), max_tokens=MAX_TOKENS, temperature=1, seed=seed, response_format=Tags
        )
        assert isinstance(parsed.choices[0].message.parsed, Tags)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"some_new_field": 1}, "some_new_field"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "n": 2}, "logprobs"),
        (
            {"response_format": json_schema_format({"type": "string", "pattern": "^a$"})},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_unsupported_fields_are_400s_naming_them(client, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages(), max_tokens=2, extra_body=extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


def test_harmless_fields_are_accepted(client) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=messages(), max_tokens=2, user="u1", metadata={"a": "b"}, store=False,
        frequency_penalty=0, presence_penalty=0, logit_bias={}, service_tier="auto",
    )  # fmt: skip
    assert r.choices[0].message.content is not None


def test_langchain_with_structured_output(server: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage
    from pydantic import BaseModel

    class Tags(BaseModel):
        ok: bool
        tags: list[str]
        scene: Literal["in", "out"]

    content = messages()[0]["content"]
    for seed in range(5):
        llm = langchain_openai.ChatOpenAI(
            base_url=server, api_key="unused", model="tiny", temperature=1, max_tokens=MAX_TOKENS, seed=seed,
            max_retries=0,
        )  # fmt: skip
        assert isinstance(llm.with_structured_output(Tags, method="json_schema").invoke([HumanMessage(content)]), Tags)
        # json_mode sends no schema (only "a JSON object"): the answer parses; what it holds is the model's.
        value = llm.with_structured_output(SCHEMA, method="json_mode").invoke([HumanMessage(content)])
        assert isinstance(value, dict)


def test_llm_schema(server: str, tmp_path: Path) -> None:
    llm_bin = shutil.which("llm", path=str(Path(sys.executable).parent))
    if llm_bin is None:
        pytest.skip("simonw's llm is not installed")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f'- model_id: vlm-tiny\n  model_name: tiny\n  api_base: "{server}"\n  supports_schema: true\n  vision: true\n'
    )
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": "unused"}
    schema = json.dumps(SCHEMA)
    for stream in (["--no-stream"], []):  # llm streams unless told not to
        r = subprocess.run(
            [llm_bin, "-m", "vlm-tiny", "--schema", schema, "-a", str(SAMPLE), *stream]
            + ["-o", "max_tokens", str(MAX_TOKENS), "-o", "temperature", "1", "Tag this image"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert from_schema(SCHEMA).parse(r.stdout)[1] is None, r.stdout
