"""The OpenAI request bodies `vlm serve` takes, as Pydantic models.

Types are strict, as OpenAI's API is (a string is not a number, true is not 1). A chat request's
fields this server does not implement are refused by name, or accepted where they are harmless
(serve/response.py); elsewhere they are ignored, except where ignoring one would change the answer
(`dimensions`). Checks that need the server's settings (which models, which image sources)
are the routes'.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vlmcli.text import lone_surrogate


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ImageURL(_Request):
    url: StrictStr = Field(min_length=1)


def _url_object(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


class ContentPart(_Request):
    """A text, image_url or video_url part (vLLM's name for a video): chat messages' content, and
    embeddings' input items (no videos there). After validation exactly the field its type names is set."""

    type: StrictStr
    text: StrictStr | None = None
    image_url: Annotated[ImageURL, BeforeValidator(_url_object)] | None = None
    video_url: Annotated[ImageURL, BeforeValidator(_url_object)] | None = None

    @field_validator("text")
    @classmethod
    def _unicode(cls, text: str | None) -> str | None:
        if text is not None and lone_surrogate(text) is not None:
            raise PydanticCustomError("invalid_unicode", "the text is not valid Unicode (a lone surrogate)")
        return text

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> ContentPart:
        if self.type == "text":
            if self.text is None:
                raise PydanticCustomError("missing", "a text part needs a string 'text'")
            self.image_url = self.video_url = None
        elif self.type == "image_url":
            if self.image_url is None:
                raise PydanticCustomError("missing", "an image_url part needs 'image_url' with a 'url'")
            self.text = self.video_url = None
        elif self.type == "video_url":
            if self.video_url is None:
                raise PydanticCustomError("missing", "a video_url part needs 'video_url' with a 'url'")
            self.text = self.image_url = None
        else:
            raise PydanticCustomError(
                "unsupported_content",
                "content type '{type}' is not supported (text, image_url, video_url)",
                {"type": self.type},
            )
        return self


def _text_as_parts(value: Any) -> Any:
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for system instructions.
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[list[ContentPart], BeforeValidator(_text_as_parts)] | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _user_says_something(cls, content: list[ContentPart] | None, info: ValidationInfo) -> list[ContentPart] | None:
        if content is None and info.data.get("role") == "user":
            raise PydanticCustomError("missing", "a user message needs a string or an array of content parts")
        return content


StopSequences = Annotated[
    list[Annotated[StrictStr, Field(min_length=1)]], BeforeValidator(_one_or_many), Field(max_length=4)
]


class JsonSchemaFormat(_Request):
    name: StrictStr = Field(min_length=1, max_length=64)
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Request):
    # Fields beyond these are kept, so that the route can accept the harmless ones and refuse the
    # rest by name (serve/response.py) instead of ignoring them.
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: StrictInt | None = None
    n: StrictInt | None = Field(None, ge=1)
    stream: StrictBool | None = None
    stop: StopSequences | None = None
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)


def _input_item(value: Any) -> Any:
    """A string is a text, or an image when it is a data:image/ URL; an object is a content part."""
    if isinstance(value, str):
        if value[:11].lower().startswith("data:image/"):
            return {"type": "image_url", "image_url": {"url": value}}
        return {"type": "text", "text": value}
    if isinstance(value, (dict, ContentPart)):
        return value
    raise PydanticCustomError(
        "input_item", "an input item must be a string or a content part (token arrays are not supported)"
    )


class EmbeddingsRequest(_Request):
    model: StrictStr | None = None
    input: Annotated[
        list[Annotated[ContentPart, BeforeValidator(_input_item)]], BeforeValidator(_one_or_many), Field(min_length=1)
    ]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Any = None

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: Any) -> None:
        if value is not None:
            raise PydanticCustomError("unsupported", "not supported: CLIP embeddings have the model's size")
