"""The OpenAI request bodies promptq accepts: a chat completion, as `/v1/chat/completions`
takes it and as each line of a Batch API input file carries it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from promptq.errors import InvalidRequest
from promptq.schemas import MAX_ATTEMPTS_LIMIT, MAX_DEADLINE_S, ChatMessage
from promptq.service import check_storable, describe_validation_error

#: Most fallback models one request may name.
MAX_FALLBACK_MODELS = 5
#: Fields that steer promptq or the HTTP exchange and are not sent to the model.
NOT_FORWARDED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "n",
        "cache",
        "fallback_models",
        "max_attempts",
        "deadline_s",
    }
)


class ChatCompletionRequest(BaseModel):
    """An OpenAI chat completion request, plus promptq's own optional fields (`cache`,
    `fallback_models`, `max_attempts`, `deadline_s`). Other OpenAI fields pass through."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=255)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    #: A signed 64-bit integer, the range `/api/jobs` takes (promptq.schemas.ChatParams).
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    #: promptq runs one completion per job.
    n: int | None = Field(default=None, ge=1, le=1)
    #: Reuse a stored identical answer (true), never (false), or when deterministic (unset).
    cache: bool | None = None
    #: Models tried in order when `model` is unavailable or keeps failing.
    fallback_models: list[str] = Field(default_factory=list, max_length=MAX_FALLBACK_MODELS)
    max_attempts: int | None = Field(default=None, ge=1, le=MAX_ATTEMPTS_LIMIT)
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_S)

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @field_validator("fallback_models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        if any(not name or len(name) > 255 for name in value):
            raise ValueError("fallback model names must be 1 to 255 characters")
        return value

    def params(self) -> dict[str, Any]:
        """What is sent to the model besides model and messages (unset fields left out)."""
        data = self.model_dump(exclude_none=True)
        return {k: v for k, v in data.items() if k not in NOT_FORWARDED}

    def job_input(self) -> dict[str, Any]:
        """The `jobs.input` JSON: messages and params, and how the worker should run it."""
        data: dict[str, Any] = {
            "messages": [m.model_dump(exclude_none=False) for m in self.messages],
            "params": self.params(),
        }
        if self.stream:
            data["stream"] = True
        if self.fallback_models:
            data["fallback_models"] = list(self.fallback_models)
        return data

    @property
    def include_usage(self) -> bool:
        """A streamed answer ends with a usage chunk (`stream_options.include_usage`)."""
        return bool(self.stream_options and self.stream_options.get("include_usage") is True)


class BadRequest(InvalidRequest):
    """The request is not valid."""

    http_status = 400


def parse_chat_request(payload: Any) -> ChatCompletionRequest:
    """Validate a chat completion body; BadRequest (400) saying what is wrong."""
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        check_storable(payload)
        return ChatCompletionRequest.model_validate(payload)
    except InvalidRequest as exc:
        raise BadRequest(exc.message) from None
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None
