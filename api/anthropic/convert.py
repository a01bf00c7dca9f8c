"""Pure conversions between wire models, the worker contract and the model catalogue."""

import hashlib
import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from api.anthropic import sse
from api.anthropic.blocks import (
    DocumentBlockParam,
    SearchResultBlockParam,
    TextBlockParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)
from api.anthropic.protocol import (
    ContentBlock,
    ConversationRequest,
    MessageResponse,
    MessagesRequest,
    ModelInfo,
    ModelList,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
    Usage,
)
from api.errors import InvalidRequestError
from contract import jobs
from contract.catalog import ModelSpec
from contract.conversation import Conversation, ToolCall, ToolResult, Turn, TurnPart
from contract.events import BlockStartEvent, ContentEvent, DeltaEvent, DoneEvent
from contract.jobs import SamplingParams
from contract.json_prefix import complete_prefix
from contract.toolcalls import ToolSpec

DEFAULT_PAGE_LIMIT = 20
MAX_PAGE_LIMIT = 1000


def estimated_cost_usd(cost_usd: str) -> float:
    """The exact decimal cost string as the float the seed's wire format shows (0.00085)."""
    return float(Decimal(cost_usd))


def sampling_params(
    request: MessagesRequest, max_tokens: int, spec: ModelSpec | None = None
) -> SamplingParams:
    """Decoding parameters for the job; admission has already defaulted and capped max_tokens.

    What the request leaves out comes from the model's defaults: its temperature, and its top_p
    unless the request chose a temperature (then it gets the distribution it asked for).
    """
    temperature = request.temperature
    top_p = request.top_p
    if spec is not None and top_p is None and temperature is None:
        top_p = spec.default_top_p
    if temperature is None:
        temperature = spec.default_temperature if spec is not None else 1.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=request.top_k,
        stop_sequences=list(request.stop_sequences or []),
    )


def conversation_of(request: ConversationRequest) -> Conversation:
    """What the prompt is rendered from: consecutive messages of one role merged into one turn,
    documents and search results flattened to text, thinking left out."""
    called: dict[str, str] = {}  # tool_use id -> the tool's name, for later results
    turns: list[Turn] = []
    for message in request.messages:
        parts: list[TurnPart] = []
        for block in message.content:
            if isinstance(block, TextBlockParam) and block.text:
                parts.append(block.text)
            elif isinstance(block, DocumentBlockParam | SearchResultBlockParam):
                parts.append(block.flat_text())
            elif isinstance(block, ToolUseBlockParam):
                called[block.id] = block.name
                parts.append(ToolCall(block.id, block.name, block.input))
            elif isinstance(block, ToolResultBlockParam):
                name = called.get(block.tool_use_id)
                text = block.content_text()
                parts.append(ToolResult(block.tool_use_id, text, bool(block.is_error), name))
        if turns and turns[-1].role == message.role:
            turns[-1].parts.extend(parts)
        else:
            turns.append(Turn(message.role, parts))
    tools = [ToolSpec(t.name, t.input_schema, t.description or "") for t in request.tools or []]
    thinking = request.thinking is not None and request.thinking.on
    return Conversation(request.system_text(), turns, tools, thinking)


def tool_use(request: ConversationRequest) -> jobs.ToolUse | None:
    """The job's tools and tool choice (None without tools)."""
    if not request.tools:
        return None
    choice = request.tool_choice
    return jobs.ToolUse(
        tools=[jobs.ToolSpec(name=t.name, input_schema=t.input_schema) for t in request.tools],
        choice=choice.type if choice else "auto",
        name=choice.name if choice and choice.type == "tool" else None,
        parallel=not (choice and choice.disable_parallel_tool_use),
    )


def thinking_budget(request: MessagesRequest, max_tokens: int) -> int | None:
    """At most this many tokens of thinking: the budget asked for (enabled) within max_tokens,
    all of max_tokens (adaptive: the model decides), or None (no thinking)."""
    thinking = request.thinking
    if thinking is None or not thinking.on:
        return None
    if thinking.budget_tokens is None:
        return max_tokens
    return max(1, min(thinking.budget_tokens, max_tokens - 1))


class ContentAssembler:
    """The content blocks of an answer, from its block events (for the non-streaming Message)."""

    def __init__(self) -> None:
        self._blocks: dict[int, tuple[BlockStartEvent, list[str]]] = {}

    def add(self, event: ContentEvent) -> None:
        if isinstance(event, BlockStartEvent):
            self._blocks[event.block] = (event, [])
        elif isinstance(event, DeltaEvent):
            self._blocks[event.block][1].append(event.text)

    def blocks(self) -> list[ContentBlock]:
        out: list[ContentBlock] = []
        for start, parts in (self._blocks[b] for b in sorted(self._blocks)):
            text = "".join(parts)
            if start.block_type == "tool_use":
                assert start.tool_use_id is not None and start.tool_name is not None
                tool_input = tool_input_of(text)
                out.append(
                    ToolUseBlock(id=start.tool_use_id, name=start.tool_name, input=tool_input)
                )
            elif start.block_type == "thinking":
                out.append(ThinkingBlock(thinking=text, signature=thinking_signature(text)))
            else:
                out.append(TextBlock(text=text))
        # Never empty, so `message.content[0].text` works for clients of an empty answer.
        return out or [TextBlock(text="")]


def tool_input_of(partial_json: str) -> dict[str, Any]:
    """A tool_use block's `input` from its deltas; a call cut short (max_tokens) keeps the
    members that were complete."""
    if not partial_json:
        return {}
    try:
        value = json.loads(partial_json)
    except ValueError:
        value = complete_prefix(partial_json)
    return value if isinstance(value, dict) else {}


class ThinkingSignatures:
    """The thinking text of a stream's open thinking blocks, for the `signature_delta` that
    closes each (the same signature the non-streamed Message carries)."""

    def __init__(self) -> None:
        self._open: dict[int, list[str]] = {}

    def add(self, event: BlockStartEvent | DeltaEvent) -> None:
        if isinstance(event, BlockStartEvent):
            if event.block_type == "thinking":
                self._open[event.block] = []
        elif event.block in self._open:
            self._open[event.block].append(event.text)

    def closing(self, block: int) -> str | None:
        """The signature of `block` if it is a thinking block (it is forgotten then)."""
        parts = self._open.pop(block, None)
        return None if parts is None else thinking_signature("".join(parts))


def block_opening(start: BlockStartEvent) -> dict[str, Any]:
    """A block as `content_block_start` shows it: empty, its content comes in deltas."""
    if start.block_type == "tool_use":
        return {"type": "tool_use", "id": start.tool_use_id, "name": start.tool_name, "input": {}}
    if start.block_type == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "text", "text": ""}


def thinking_signature(thinking: str) -> str:
    """The `signature` of a thinking block: a digest of its text (nothing verifies it here)."""
    return hashlib.sha256(thinking.encode()).hexdigest()


def message_response(
    *, message_id: str, model: str, content: list[ContentBlock], done: DoneEvent
) -> MessageResponse:
    """The non-streaming Message: its content blocks, usage and metering from `done`."""
    return MessageResponse(
        id=message_id,
        model=model,
        content=content,
        stop_reason=done.stop_reason,
        stop_sequence=done.stop_sequence,
        usage=Usage(
            input_tokens=done.input_tokens,
            output_tokens=done.output_tokens,
            cache_read_input_tokens=done.cache_read_input_tokens,
            cache_creation_input_tokens=done.cache_creation_input_tokens,
        ),
        remaining_credits=done.remaining_credits,
        estimated_credits_used=done.credits_charged,
        estimated_cost_usd=estimated_cost_usd(done.cost_usd),
    )


def message_delta_event(done: DoneEvent) -> bytes:
    """The stream's `message_delta` frame for a finished request."""
    return sse.message_delta(
        stop_reason=done.stop_reason,
        stop_sequence=done.stop_sequence,
        output_tokens=done.output_tokens,
        input_tokens=done.input_tokens,
        remaining_credits=done.remaining_credits,
        estimated_credits_used=done.credits_charged,
        estimated_cost_usd=estimated_cost_usd(done.cost_usd),
        cache_read_input_tokens=done.cache_read_input_tokens,
        cache_creation_input_tokens=done.cache_creation_input_tokens,
    )


def model_info(spec: ModelSpec) -> ModelInfo:
    return ModelInfo(
        id=spec.id,
        display_name=spec.display_name,
        created_at=spec.created_at,
        max_input_tokens=spec.context_window,
        max_tokens=spec.max_output_tokens,
    )


def models_page(
    models: Sequence[ModelSpec],
    after_id: str | None = None,
    before_id: str | None = None,
    limit: int = DEFAULT_PAGE_LIMIT,
) -> ModelList:
    """One page of `models` (already in listing order), paginated the way the SDK pages.

    Forward (no cursor or `after_id`): the `limit` models after the cursor; `has_more` says more
    follow, and the SDK asks next for `after_id=last_id`. Backward (`before_id`): the `limit`
    models right before the cursor; `has_more` says more precede, and the SDK asks next for
    `before_id=first_id`.
    An unknown cursor gives an empty last page, so a client iterating never loops.
    """
    if not 1 <= limit <= MAX_PAGE_LIMIT:
        raise InvalidRequestError(f"limit: Input should be between 1 and {MAX_PAGE_LIMIT}")
    if after_id is not None and before_id is not None:
        raise InvalidRequestError("after_id and before_id cannot both be set")
    ids = [m.id for m in models]
    cursor = after_id if after_id is not None else before_id
    if cursor is not None and cursor not in ids:
        page: Sequence[ModelSpec] = []
        has_more = False
    elif before_id is not None:
        end = ids.index(before_id)
        start = max(0, end - limit)
        page, has_more = models[start:end], start > 0
    else:
        start = ids.index(after_id) + 1 if after_id is not None else 0
        page, has_more = models[start : start + limit], start + limit < len(models)
    data = [model_info(m) for m in page]
    return ModelList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )
