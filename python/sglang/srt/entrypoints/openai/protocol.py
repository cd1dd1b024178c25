"""Request schemas of the OpenAI-compatible API and the error type every endpoint answers with."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

# Request fields whose sampling-parameter name differs from the OpenAI name.
OPENAI_NAME_OF = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "json_schema": "response_format"}


class APIError(Exception):
    """A request failed; rendered as an OpenAI-style error body with this status code."""

    def __init__(self, message: str, param: str | None = None, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code

    def body(self) -> dict[str, Any]:
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        return error_body(self.message, self.param, self.status_code)


def error_body(message: str, param: str | None, status_code: int) -> dict[str, Any]:
    """OpenAI's error envelope."""
    kind = ERROR_TYPES.get(status_code, "APIError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status_code}}


class _Strict(BaseModel):
    # Unknown fields are rejected so that a typo is a 400 naming the field, not a silently ignored option.
    model_config = ConfigDict(extra="forbid")


class _Tolerant(BaseModel):
    # OpenAI clients routinely send fields this server has no use for (newer OpenAI options, other servers'
    # extensions). They are kept in model_extra for request_checks, which refuses the ones whose meaning we cannot
    # honour and logs the rest once per name; a 400 for each would break ordinary client traffic.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Tolerant):
    """`stream_options` of a streamed request."""

    include_usage: bool = False


class JsonSchemaFormat(_Tolerant):
    """`response_format.json_schema`: the schema every answer must match."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = None
    # "schema" would shadow a pydantic BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Tolerant):
    """`response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(_Tolerant):
    """Fields shared by completions and chat completions: model, sampling and streaming."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1)  # the upper bound is the server's --max-n
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # SGLang extensions, same names as in the native sampling_params.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None

    def sampling_params(self) -> dict[str, Any]:
        """The native sampling_params for one choice (n is served as n separate requests)."""
        names = (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "stop",
            "stop_token_ids",
            "ignore_eos",
            "skip_special_tokens",
            "seed",
            "logit_bias",
        )
        params = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        # Always set: a missing (None) limit means "until a stop condition or the context length", as upstream.
        params["max_new_tokens"] = self.max_tokens
        if self.min_tokens is not None:
            params["min_new_tokens"] = self.min_tokens
        params.update(response_format_params(self.response_format))
        return params

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ContentPart(_Strict):
    """One part of a multi-part message; only text parts are served."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    # Clients often send back an assistant message exactly as they received it (refusal, tool_calls, ...
    # set to null), so extra keys of a message are ignored rather than rejected.
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it."""
        content = self.content
        if isinstance(content, list):
            content = [part.model_dump() for part in content]
        message: dict[str, Any] = {"role": self.role, "content": content if content is not None else ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None

    def sampling_params(self) -> dict[str, Any]:
        """As for completions; max_completion_tokens is the newer name of max_tokens and wins over it."""
        params = super().sampling_params()
        if self.max_completion_tokens is not None:
            params["max_new_tokens"] = self.max_completion_tokens
        return params


def response_format_params(fmt: ResponseFormat | None) -> dict[str, Any]:
    """The native sampling params a response_format asks for (json_schema as a JSON string, as upstream)."""
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(
            "response_format of type json_schema needs json_schema.schema (a JSON Schema object).",
            param="response_format",
        )
    return {"json_schema": json.dumps(fmt.json_schema.schema_)}
