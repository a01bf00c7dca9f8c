"""Anthropic Messages API wire models (pydantic v2): their shape is Anthropic's, not ours.

Validation policy, chosen for compatibility with real clients:
- Unknown fields are ignored, at the top level and inside messages and blocks: SDKs and
  Claude-style clients keep adding fields. Hints are accepted and change nothing:
  `output_config.effort`, `context_management`, `service_tier`,
  `metadata`, `container`, `speed`, `inference_geo`, the `anthropic-beta` header, `?beta=true`.
- What changes what the output must be is honoured or refused with a 400 that says what is not
  supported, never silently dropped: custom tools and every `tool_choice` (server tools are
  refused naming their type), `output_config.format` / `output_format` (structured output),
  `thinking` (enabled, adaptive, disabled), `mcp_servers` (refused). Schemas the decoder must
  enforce are checked first (api/anthropic/output_params.py). Content blocks: see
  api/anthropic/blocks.py (images and non-text documents are refused: text-only models).
- Roles: `user`, `assistant`, and `system` inside `messages` (SDK2's SystemMessageParam, sent
  by Claude Code): text only; rendered as a system turn where it is if the chat template takes
  that, else appended to the system prompt (contract/rendering.py).
- `cache_control` breakpoints (on tools, system blocks, message blocks, or at the top level)
  are honoured: at most 4, `{"type": "ephemeral"}` (api/anthropic/caching.py).
- Per the seed, `max_tokens` is optional (the route fills a default) and `temperature` is 0-2.
- `stop_sequences`: at most 32 entries, each 1-256 characters (the engine matches them per step).
- Consecutive messages with the same role are merged into one turn, as the current API does.
- A string `content` (or `system`) is shorthand for one text block and is stored as one, so
  consumers see a single shape and error paths never carry pydantic union labels.

Errors keep pydantic's dotted locations (`messages.0.content.1: ...`). Rules that span the whole
request are raised at the root with the path already in the message; `api.errors` prints those
messages as they are.
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_serializer, field_validator, model_validator
from pydantic_core import PydanticCustomError

from api.anthropic.blocks import (
    ROLE_BLOCKS,
    CacheControlParam,
    ContentBlockParam,
    SystemBlockParam,
    TextBlockParam,
    ToolUseBlockParam,
    WireModel,
    has_content,
    text_or_blocks,
)
from api.anthropic.output_params import (
    JsonSchemaFormat,
    OutputConfigParam,
    ThinkingParam,
    ToolChoiceParam,
    ToolParam,
    schema_problem,
    tools_problem,
)
from contract.conversation import BLOCK_SEPARATOR

MAX_STOP_SEQUENCES = 32
MAX_STOP_SEQUENCE_CHARS = 256

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
Role = Literal["user", "assistant", "system"]

# ---------------------------------------------------------------------------- request side


# Anthropic's limit on cache_control breakpoints in one request.
MAX_BREAKPOINTS = 4


@dataclass(frozen=True)
class Breakpoint:
    """A `cache_control` mark: on tool `index`, system block `index`, block `block` of message
    `index`, or at the top level ("end": the whole prompt)."""

    section: Literal["tools", "system", "messages", "end"]
    index: int
    block: int = 0


def _marked(block: Any) -> bool:
    """A block marked itself, or (tool results, search results) one of its text blocks."""
    if getattr(block, "cache_control", None) is not None:
        return True
    inner = getattr(block, "content", None)
    return isinstance(inner, list) and any(
        getattr(b, "cache_control", None) is not None for b in inner
    )


def _join(blocks: list[TextBlockParam]) -> str:
    return BLOCK_SEPARATOR.join(b.text for b in blocks if b.text)


class MessageParam(WireModel):
    """One turn; a string `content` arrives here as a single text block."""

    role: Role
    content: Annotated[list[ContentBlockParam], BeforeValidator(text_or_blocks)]

    def has_content(self) -> bool:
        return any(has_content(block) for block in self.content)


class Metadata(WireModel):
    user_id: str | None = Field(default=None, max_length=256)


def _request_error(message: str) -> PydanticCustomError:
    # Raised at the root with the path in the message (api.errors prints it as it is).
    return PydanticCustomError("invalid_request", "{message}", {"message": message})


class ConversationRequest(WireModel):
    """Fields shared by /v1/messages and /v1/messages/count_tokens."""

    model: str = Field(max_length=256)
    messages: list[MessageParam]
    system: Annotated[list[SystemBlockParam], BeforeValidator(text_or_blocks)] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None
    output_config: OutputConfigParam | None = None
    # The older spelling of output_config.format.
    output_format: JsonSchemaFormat | None = None
    # Automatic prompt caching: a breakpoint at the end of the prompt (docs/caching.md).
    cache_control: CacheControlParam | None = None
    # Declared only to be refused: MCP servers would add tools that run elsewhere.
    mcp_servers: list[Any] | None = Field(default=None, exclude=True)

    @field_validator("messages")
    @classmethod
    def _at_least_one(cls, messages: list[MessageParam]) -> list[MessageParam]:
        if not messages:
            raise PydanticCustomError("too_short", "at least one message is required")
        return messages

    @field_validator("mcp_servers")
    @classmethod
    def _no_mcp(cls, servers: list[Any] | None) -> list[Any] | None:
        if servers:
            raise PydanticCustomError(
                "unsupported", "the MCP connector is not supported by this platform"
            )
        return servers

    @model_validator(mode="after")
    def _check_messages(self) -> "ConversationRequest":
        last = len(self.messages) - 1
        for index, message in enumerate(self.messages):
            for at, block in enumerate(message.content):
                if block.type not in ROLE_BLOCKS[message.role]:
                    raise _request_error(
                        f"messages.{index}.content.{at}: {block.type} blocks are not allowed"
                        f" in {message.role} messages"
                    )
            if message.has_content() or (index == last and message.role == "assistant"):
                continue
            raise _request_error(
                f"messages.{index}: all messages must have non-empty content"
                " except for the optional final assistant message"
            )
        final = self.messages[last]
        if final.role == "assistant" and any(
            isinstance(b, ToolUseBlockParam) for b in final.content
        ):
            raise _request_error(
                f"messages.{last}: a final assistant message is continued (a prefill) and"
                " cannot hold tool_use blocks; send their tool_result blocks in a user message"
            )
        return self

    @model_validator(mode="after")
    def _check_cache_control(self) -> "ConversationRequest":
        found = len(self.cache_breakpoints())
        if found > MAX_BREAKPOINTS:
            raise _request_error(
                f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided."
                f" Found {found}."
            )
        return self

    @model_validator(mode="after")
    def _check_output(self) -> "ConversationRequest":
        problem = tools_problem(self.tools or [], self.tool_choice)
        thinking = self.thinking
        if (
            problem is None
            and thinking
            and thinking.type == "enabled"
            and not thinking.budget_tokens
        ):
            problem = 'thinking.budget_tokens: Field required (thinking type "enabled")'
        if problem is None:
            problem = self._format_problem()
        if problem is not None:
            raise _request_error(problem)
        return self

    def _format_problem(self) -> str | None:
        config_format = self.output_config.format if self.output_config else None
        if config_format is not None and self.output_format is not None:
            return "output_format: send either output_format or output_config.format, not both"
        where = "output_config.format" if config_format is not None else "output_format"
        output = self.output_format_schema()
        if output is None:
            return None
        callable_tools = self.tools and not (self.tool_choice and self.tool_choice.type == "none")
        if callable_tools:
            return (
                f"{where}: structured output together with tools the model may call is not"
                ' supported; send tool_choice {"type": "none"}, or no tools'
            )
        problem = schema_problem(output)
        return None if problem is None else f"{where}.schema: {problem}"

    def output_format_schema(self) -> dict[str, Any] | None:
        """The JSON schema the whole answer must match (structured output), or None."""
        chosen = self.output_config.format if self.output_config else None
        chosen = chosen or self.output_format
        return chosen.json_schema if chosen is not None else None

    def cache_breakpoints(self) -> list[Breakpoint]:
        """Every block marked with `cache_control`, in prompt order (tools, system, messages,
        then the top-level mark, which stands for the end of the prompt)."""
        found: list[Breakpoint] = [
            Breakpoint("tools", k) for k, t in enumerate(self.tools or []) if t.cache_control
        ]
        found += [
            Breakpoint("system", j) for j, b in enumerate(self.system or []) if b.cache_control
        ]
        for i, message in enumerate(self.messages):
            found += [
                Breakpoint("messages", i, j)
                for j, block in enumerate(message.content)
                if _marked(block)
            ]
        if self.cache_control is not None:
            found.append(Breakpoint("end", 0))
        return found

    def system_text(self) -> str | None:
        """The system prompt as one string, or None when absent or empty."""
        return _join(self.system) if self.system else None


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

    @model_validator(mode="after")
    def _budget_below_max_tokens(self) -> "MessagesRequest":
        budget = self.thinking.budget_tokens if self.thinking else None
        if budget is not None and self.max_tokens is not None and self.max_tokens <= budget:
            raise _request_error(
                f"thinking.budget_tokens: `max_tokens` must be greater than"
                f" `thinking.budget_tokens` ({self.max_tokens} <= {budget})"
            )
        return self


class CountTokensRequest(ConversationRequest):
    """POST /v1/messages/count_tokens body; generation fields, if sent, are ignored."""


# --------------------------------------------------------------------------- response side


class TextBlock(WireModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(WireModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class ThinkingBlock(WireModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str


ContentBlock = Annotated[TextBlock | ToolUseBlock | ThinkingBlock, Field(discriminator="type")]


class Usage(WireModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    service_tier: Literal["standard"] = "standard"


class MessageResponse(WireModel):
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


class ModelInfo(WireModel):
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


class ModelList(WireModel):
    data: list[ModelInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None


class TokenCount(WireModel):
    input_tokens: int
