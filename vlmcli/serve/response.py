"""What a chat request asks of its answer beyond the messages: response_format (a JSON object, or
JSON following a schema), logprobs / top_logprobs, and every other field OpenAI defines, each either
used, accepted as harmless, or refused with a 400 naming it (never silently ignored)."""

from __future__ import annotations

from typing import Any

from vlmcli.errors import InvalidOption
from vlmcli.serve.errors import bad
from vlmcli.serve.schemas import ChatRequest

# Accepted and without effect here: they describe the caller or OpenAI's own service, not the answer.
HARMLESS = {
    "user": "an end-user id for abuse monitoring",
    "safety_identifier": "an end-user id for abuse monitoring",
    "metadata": "tags for OpenAI's stored completions",
    "store": "whether OpenAI stores the completion",
    "service_tier": "OpenAI's processing tier",
    "prompt_cache_key": "OpenAI's prompt cache routing",
    "stream_options": "the last streamed chunk carries usage in any case",
    "parallel_tool_calls": "there are no tools",
}
# Accepted at their neutral value only.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "modalities": ["text"]}
REFUSED = {
    "tools": "tools (function calling) are not supported",
    "tool_choice": "tools (function calling) are not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "this model does not reason in a separate phase",
    "verbosity": "not supported",
    "frequency_penalty": "only 0 is supported",
    "presence_penalty": "only 0 is supported",
    "logit_bias": "only {} is supported",
    "modalities": 'only ["text"] is supported',
}


def check_fields(request: ChatRequest) -> None:
    """A 400 for the first field this server does not implement (by name)."""
    for name, value in (request.model_extra or {}).items():
        if name in HARMLESS or value is None:
            continue
        if name in NEUTRAL and value == NEUTRAL[name]:
            continue
        if name in REFUSED:
            raise bad(f"{name}: {REFUSED[name]}", name, "unsupported_parameter")
        raise bad(f"{name}: unknown field (this server implements OpenAI's chat completions fields)", name)


def response_options(request: ChatRequest) -> dict[str, Any]:
    """The worker job's "structure" (tasks/structured.py; None: free text) and "logprobs" (None: off,
    else how many alternatives per token). Schemas vlm cannot enforce are 400s naming the keyword."""
    from vlmcli.tasks import structured

    check_fields(request)
    fmt = request.response_format
    structure = None
    if fmt is not None and fmt.type == "json_object":
        structure = structured.json_object()
    elif fmt is not None and fmt.type == "json_schema":
        param = "response_format.json_schema"
        if fmt.json_schema is None:
            raise bad("response_format: type json_schema needs a json_schema object", param)
        schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
        try:
            structure = structured.from_schema(schema, "response_format")
        except InvalidOption as e:
            raise bad(f"{param}.schema: {e.message}", f"{param}.schema", "unsupported_schema") from None
    logprobs = None
    if request.top_logprobs is not None and not request.logprobs:
        raise bad("top_logprobs: needs logprobs set to true", "top_logprobs")
    if request.logprobs:
        if (request.n or 1) > 1:
            raise bad("logprobs: not supported with n > 1", "logprobs", "unsupported_parameter")
        logprobs = request.top_logprobs or 0
    return {"structure": structure, "logprobs": logprobs}


def logprobs_content(items: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A choice's "logprobs" as OpenAI writes it, from the worker's [{piece (bytes), logprob, top}]."""
    if items is None:
        return None

    def entry(piece: bytes, logprob: float) -> dict[str, Any]:
        return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}

    return {
        "content": [
            {**entry(i["piece"], i["logprob"]), "top_logprobs": [entry(p, lp) for p, lp in i["top"]]} for i in items
        ],
        "refusal": None,
    }
