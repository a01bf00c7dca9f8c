"""Request content blocks (Anthropic's `*BlockParam` types): what a message may hold.

Supported: text; tool_use (assistant) and tool_result (user, string or text-block content,
`is_error`); document with a text source and search_result, flattened to text; thinking and
redacted_thinking (assistant history: accepted, left out of the prompt). Every other type is
refused with a 400 that names it: images and non-text documents because the models served are
text-only, server-tool blocks because server tools do not run here.

Blocks form a union discriminated on `type`. Pydantic puts the tag into error locations
(`messages.0.content.1.tool_use.input`); `_untagged` takes it out again, so paths read as they
always have (`messages.0.content.1.input: ...`).
"""

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from contract.conversation import BLOCK_SEPARATOR


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore", serialize_by_alias=True)


def _valid_unicode(text: str) -> str:
    # JSON may spell a lone UTF-16 surrogate ("\\ud800"); no tokenizer or encoder accepts one.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "unicode", "unpaired UTF-16 surrogate at character {index}", {"index": exc.start}
        ) from None
    return text


def _valid_json_unicode(value: Any) -> Any:
    # Iterative: client JSON may nest as deep as the parser allows.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            _valid_unicode(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_valid_json_unicode)]


class CacheControlParam(WireModel):
    """A prompt-cache breakpoint: the prefix up to the end of its block is cached
    (docs/caching.md). Entries live as long as the worker's cache keeps them, whatever `ttl`."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlockParam(WireModel):
    """`{"type": "text", "text": ...}`; `citations` is accepted and ignored."""

    type: Literal["text"]
    text: Text
    cache_control: CacheControlParam | None = None


class ToolUseBlockParam(WireModel):
    """An earlier tool call of the assistant (`caller` ignored)."""

    type: Literal["tool_use"]
    id: Text
    name: Text
    input: JsonObject
    cache_control: CacheControlParam | None = None


class TextDocumentSource(WireModel):
    type: Literal["text"]
    media_type: str = "text/plain"
    data: Text


def _text_source(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") not in (None, "text"):
        raise PydanticCustomError(
            "unsupported_source",
            'document source type "{source}" is not supported (this model accepts text only;'
            ' send the document as {"type": "text", "media_type": "text/plain", "data": ...})',
            {"source": value.get("type")},
        )
    return value


class DocumentBlockParam(WireModel):
    """A text document; flattened to its title, context and text (`citations` ignored)."""

    type: Literal["document"]
    source: Annotated[TextDocumentSource, BeforeValidator(_text_source)]
    title: Text | None = None
    context: Text | None = None
    cache_control: CacheControlParam | None = None

    def flat_text(self) -> str:
        return BLOCK_SEPARATOR.join(p for p in (self.title, self.context, self.source.data) if p)


class SearchResultBlockParam(WireModel):
    """A search result; flattened to its title, source and text blocks."""

    type: Literal["search_result"]
    source: Text
    title: Text
    content: list[TextBlockParam]
    cache_control: CacheControlParam | None = None

    def flat_text(self) -> str:
        body = BLOCK_SEPARATOR.join(b.text for b in self.content if b.text)
        return BLOCK_SEPARATOR.join(p for p in (f"{self.title}\n{self.source}", body) if p)


class ThinkingBlockParam(WireModel):
    """Earlier thinking, echoed back by clients; never part of the prompt."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlockParam(WireModel):
    type: Literal["redacted_thinking"]
    data: str


# Why a block type is refused, for the types whose reason is known.
_REFUSALS = {
    "image": "this model accepts text only",
    "container_upload": "code execution does not run on this platform",
    "server_tool_use": "server tools do not run on this platform",
    "mcp_tool_use": "MCP servers are not connected to this platform",
    "mcp_tool_result": "MCP servers are not connected to this platform",
}


def _refusal(block_type: str) -> str:
    if block_type in _REFUSALS:
        return f" ({_REFUSALS[block_type]})"
    if block_type.endswith("_tool_result"):
        return " (server tools do not run on this platform)"
    return ""


def _accepting(*types: str, reason: str | None = None) -> BeforeValidator:
    """Refuses a block whose type is not one of `types`, naming the type (and why)."""

    def check(value: Any) -> Any:
        if not isinstance(value, dict):
            raise PydanticCustomError("block_type", "content blocks must be JSON objects")
        block_type = value.get("type")
        if isinstance(block_type, str) and block_type not in types:
            raise PydanticCustomError(
                "unsupported_block",
                'content block type "{block_type}" is not supported{why}',
                {
                    "block_type": block_type,
                    "why": f" ({reason})" if reason else _refusal(block_type),
                },
            )
        return value

    return BeforeValidator(check)


def _drop_tag(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError as exc:
        errors: list[InitErrorDetails] = []
        for error in exc.errors():
            loc, kind, message = error["loc"], error["type"], error["msg"]
            if loc and loc[0] == _tag(value):
                loc = loc[1:]
            elif kind == "union_tag_not_found":  # no usable `type`: name the field
                missing = not isinstance(value, dict) or "type" not in value
                kind, loc = ("missing", ("type",)) if missing else ("string_type", ("type",))
                message = "Field required" if missing else "Input should be a valid string"
            custom = PydanticCustomError(kind, message)
            errors.append(InitErrorDetails(type=custom, loc=loc, input=error["input"]))
        raise ValidationError.from_exception_data(exc.title, errors) from None


_untagged = WrapValidator(_drop_tag)


def _tag(value: Any) -> str | None:
    block_type = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return block_type if isinstance(block_type, str) else None


def text_or_blocks(value: Any) -> Any:
    """A string is shorthand for one text block."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise PydanticCustomError(
            "content_type", "Input should be a string or a list of content blocks"
        )
    return value


ToolResultContentParam = Annotated[
    Annotated[TextBlockParam, Tag("text")]
    | Annotated[DocumentBlockParam, Tag("document")]
    | Annotated[SearchResultBlockParam, Tag("search_result")],
    Discriminator(_tag),
    _untagged,
    _accepting("text", "document", "search_result"),
]


class ToolResultBlockParam(WireModel):
    """The result of an earlier tool call; its content flattened to text."""

    type: Literal["tool_result"]
    tool_use_id: Text
    content: Annotated[list[ToolResultContentParam], BeforeValidator(text_or_blocks)] = []
    is_error: bool | None = None
    cache_control: CacheControlParam | None = None

    def content_text(self) -> str:
        return BLOCK_SEPARATOR.join(t for t in (_flat(b) for b in self.content) if t)


ContentBlockParam = Annotated[
    Annotated[TextBlockParam, Tag("text")]
    | Annotated[ToolUseBlockParam, Tag("tool_use")]
    | Annotated[ToolResultBlockParam, Tag("tool_result")]
    | Annotated[DocumentBlockParam, Tag("document")]
    | Annotated[SearchResultBlockParam, Tag("search_result")]
    | Annotated[ThinkingBlockParam, Tag("thinking")]
    | Annotated[RedactedThinkingBlockParam, Tag("redacted_thinking")],
    Discriminator(_tag),
    _untagged,
    _accepting(
        "text",
        "tool_use",
        "tool_result",
        "document",
        "search_result",
        "thinking",
        "redacted_thinking",
    ),
]
AnyBlockParam = (
    TextBlockParam
    | ToolUseBlockParam
    | ToolResultBlockParam
    | DocumentBlockParam
    | SearchResultBlockParam
    | ThinkingBlockParam
    | RedactedThinkingBlockParam
)
# Blocks each role may hold.
ROLE_BLOCKS = {
    "user": frozenset({"text", "tool_result", "document", "search_result"}),
    "assistant": frozenset({"text", "tool_use", "thinking", "redacted_thinking"}),
    "system": frozenset({"text"}),
}
# A system prompt (`system`) takes text blocks only.
SystemBlockParam = Annotated[
    TextBlockParam, _accepting("text", reason="a system prompt takes text blocks only")
]


def _flat(block: TextBlockParam | DocumentBlockParam | SearchResultBlockParam) -> str:
    return block.text if isinstance(block, TextBlockParam) else block.flat_text()


def has_content(block: AnyBlockParam) -> bool:
    """Whether a block counts as content (an empty text block does not)."""
    return not isinstance(block, TextBlockParam) or bool(block.text)
