"""Anthropic Messages API wire models (pydantic v2): their shape is Anthropic's, not ours.

Validation policy, chosen for compatibility with real clients:
- Unknown fields are ignored, at the top level and inside messages and blocks: SDKs and
  Claude-style clients keep adding fields (`service_tier`, `output_config`, `cache_control`, ...).
- What we cannot honour is rejected with a 400 rather than silently dropped: a non-empty `tools`
  list, a `tool_choice` that forces a tool call (`any`/`tool`), `thinking` of type `enabled`,
  and every content block whose type is not `text` (the models served are text-only).
  `thinking: {"type": "adaptive"}` and `{"type": "disabled"}` are accepted: never thinking is
  a valid adaptive choice.
- Per the seed, `max_tokens` is optional (the route fills a default) and `temperature` is 0-2.
- `stop_sequences`: at most 32 entries, each 1-256 characters (the engine matches them per step).
- Consecutive messages with the same role are merged into one turn, as the current API does.
- A string `content` (or `system`) is shorthand for one text block and is stored as one, so
  consumers see a single shape and error paths never carry pydantic union labels.

Errors keep pydantic's dotted locations (`messages.0.content.1: ...`). Rules that span the whole
request are raised at the root with the path already in the message; `api.errors` prints those
messages as they are.
"""

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 32
MAX_STOP_SEQUENCE_CHARS = 256
BLOCK_SEPARATOR = "\n\n"  # joins text blocks of one turn, and merged consecutive turns

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
Role = Literal["user", "assistant"]


class _WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------- request side


def _valid_unicode(text: str) -> str:
    # JSON may spell a lone UTF-16 surrogate ("\\ud800"); no tokenizer or encoder accepts one.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "unicode", "unpaired UTF-16 surrogate at character {index}", {"index": exc.start}
        ) from None
    return text


class TextBlockParam(_WireModel):
    """`{"type": "text", "text": ...}`; `cache_control` and `citations` are accepted and ignored."""

    type: Literal["text"]
    text: Annotated[str, AfterValidator(_valid_unicode)]


def _check_block_type(value: Any) -> Any:
    # The `type` tag picks the block model; naming unsupported types beats a generic tag error.
    if not isinstance(value, dict):
        raise PydanticCustomError("block_type", "content blocks must be JSON objects")
    block_type = value.get("type")
    if isinstance(block_type, str) and block_type != "text":
        raise PydanticCustomError(
            "unsupported_block",
            'content block type "{block_type}" is not supported (this model accepts text only)',
            {"block_type": block_type},
        )
    return value


# A discriminated union on `type` with one supported member; add members here as models grow.
ContentBlockParam = Annotated[TextBlockParam, BeforeValidator(_check_block_type)]


def _text_or_blocks(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise PydanticCustomError(
            "content_type", "Input should be a string or a list of content blocks"
        )
    return value


def _join(blocks: list[TextBlockParam]) -> str:
    return BLOCK_SEPARATOR.join(b.text for b in blocks if b.text)


class MessageParam(_WireModel):
    """One turn; a string `content` arrives here as a single text block."""

    role: Role
    content: Annotated[list[ContentBlockParam], BeforeValidator(_text_or_blocks)]

    def text(self) -> str:
        return _join(self.content)


class Metadata(_WireModel):
    user_id: str | None = Field(default=None, max_length=256)


def _unsupported(kind: str) -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported", "{kind} is not supported by this model", {"kind": kind}
    )


class ConversationRequest(_WireModel):
    """Fields shared by /v1/messages and /v1/messages/count_tokens."""

    model: str = Field(max_length=256)
    messages: list[MessageParam]
    system: Annotated[list[ContentBlockParam], BeforeValidator(_text_or_blocks)] | None = None
    # Declared only to be refused when they ask for something we cannot do.
    tools: list[Any] | None = Field(default=None, exclude=True)
    tool_choice: dict[str, Any] | None = Field(default=None, exclude=True)
    thinking: dict[str, Any] | None = Field(default=None, exclude=True)

    @field_validator("messages")
    @classmethod
    def _at_least_one(cls, messages: list[MessageParam]) -> list[MessageParam]:
        if not messages:
            raise PydanticCustomError("too_short", "at least one message is required")
        return messages

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise _unsupported("tool use")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _no_forced_tool(cls, choice: dict[str, Any] | None) -> dict[str, Any] | None:
        if choice and choice.get("type") in ("any", "tool"):
            raise _unsupported("tool use")
        return choice

    @field_validator("thinking")
    @classmethod
    def _no_thinking(cls, thinking: dict[str, Any] | None) -> dict[str, Any] | None:
        if thinking and thinking.get("type") == "enabled":
            raise _unsupported("extended thinking")
        return thinking

    @model_validator(mode="after")
    def _non_empty_content(self) -> "ConversationRequest":
        last = len(self.messages) - 1
        for index, message in enumerate(self.messages):
            if message.text() or (index == last and message.role == "assistant"):
                continue
            raise PydanticCustomError(
                "empty_content",
                "messages.{index}: all messages must have non-empty content"
                " except for the optional final assistant message",
                {"index": index},
            )
        return self

    def system_text(self) -> str | None:
        """The system prompt as one string, or None when absent or empty."""
        return _join(self.system) if self.system else None

    def conversation(self) -> list[tuple[Role, str]]:
        """(role, text) turns with consecutive same-role messages merged."""
        turns: list[tuple[Role, str]] = []
        for message in self.messages:
            text = message.text()
            if turns and turns[-1][0] == message.role:
                previous = turns[-1][1]
                turns[-1] = (message.role, BLOCK_SEPARATOR.join(t for t in (previous, text) if t))
            else:
                turns.append((message.role, text))
        return turns


class MessagesRequest(ConversationRequest):
    """POST /v1/messages body."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stop_sequences: (
        list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_SEQUENCE_CHARS)]] | None
    ) = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    stream: bool = False
    metadata: Metadata | None = None


class CountTokensRequest(ConversationRequest):
    """POST /v1/messages/count_tokens body; generation fields, if sent, are ignored."""


# --------------------------------------------------------------------------- response side


class TextBlock(_WireModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(_WireModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class ThinkingBlock(_WireModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str


ContentBlock = Annotated[TextBlock | ToolUseBlock | ThinkingBlock, Field(discriminator="type")]


class Usage(_WireModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    service_tier: Literal["standard"] = "standard"


class MessageResponse(_WireModel):
    """A complete Message plus the seed's three metering fields."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage
    remaining_credits: int
    estimated_credits_used: int
    estimated_cost_usd: float


def rfc3339(moment: datetime) -> str:
    """UTC, second precision, `Z` suffix: `2026-01-01T00:00:00Z`."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ModelInfo(_WireModel):
    type: Literal["model"] = "model"
    id: str
    display_name: str
    created_at: datetime
    max_input_tokens: int | None = None
    max_tokens: int | None = None
    # Required by SDK2's ModelInfo type; the catalogue has no deprecations yet.
    lifecycle: Literal["active", "deprecated", "retired"] = "active"

    @field_serializer("created_at")
    def _created_at(self, value: datetime) -> str:
        return rfc3339(value)


class ModelList(_WireModel):
    data: list[ModelInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None


class TokenCount(_WireModel):
    input_tokens: int
