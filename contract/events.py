"""What a worker publishes for one request on its pub/sub channel (`keys.events_channel`).

Events are numbered: `index` starts at 0 and grows by 1 per event, so the API notices a lost one.
The order is: `claimed` (a worker took the request and says what it found before decoding), then
the answer's content blocks, each a `block_start`, its `delta`s and a `block_stop`, then exactly
one terminal event (`done` or `error`). An `error` may also come before `claimed`.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter

from contract.errors import ErrorType

# Content blocks of an answer, as Anthropic's Messages API names them.
BlockType = Literal["text", "tool_use", "thinking"]
# What a delta adds to its block: text, a piece of a tool call's JSON input, or thinking text.
DeltaKind = Literal["text", "input_json", "thinking"]
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class ClaimedEvent(BaseModel):
    """A worker claimed the request; always the first event of a request that runs."""

    type: Literal["claimed"] = "claimed"
    index: int
    worker: str  # the worker's name
    input_tokens: int  # prompt tokens, all of them
    # Of those, the tokens whose cached keys and values the worker reused, and the tokens it
    # will keep cached for later requests (both 0 without prompt caching).
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class BlockStartEvent(BaseModel):
    """A content block begins; blocks are numbered 0, 1, ... in the order they start."""

    type: Literal["block_start"] = "block_start"
    index: int
    block: int
    block_type: BlockType
    tool_use_id: str | None = None  # tool_use blocks: `toolu_...`
    tool_name: str | None = None  # tool_use blocks: the tool called


class DeltaEvent(BaseModel):
    """A piece of the open block's content."""

    type: Literal["delta"] = "delta"
    index: int  # position of this event in the request's event stream
    block: int = 0
    kind: DeltaKind = "text"
    text: str  # new text (stop sequences already removed), JSON or thinking text
    output_tokens: int  # tokens generated so far (cumulative)


class BlockStopEvent(BaseModel):
    """The block is complete."""

    type: Literal["block_stop"] = "block_stop"
    index: int
    block: int


class DoneEvent(BaseModel):
    """The request finished and is settled; always the last event."""

    type: Literal["done"] = "done"
    index: int
    status: Literal["succeeded", "cancelled"]
    stop_reason: StopReason | None
    stop_sequence: str | None  # the matched stop sequence, if that ended it
    input_tokens: int  # prompt tokens not read from the cache
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    credits_charged: int  # whole credits charged for this request
    remaining_credits: int  # account balance minus reservations after settlement
    cost_usd: str  # exact USD cost as a decimal string


class ErrorEvent(BaseModel):
    """The request failed; always the last event. Nothing was charged."""

    type: Literal["error"] = "error"
    index: int
    error_type: ErrorType
    message: str


ContentEvent = BlockStartEvent | DeltaEvent | BlockStopEvent
WorkerEvent = ClaimedEvent | BlockStartEvent | DeltaEvent | BlockStopEvent | DoneEvent | ErrorEvent
_ADAPTER: TypeAdapter[WorkerEvent] = TypeAdapter(
    Annotated[WorkerEvent, Field(discriminator="type")]
)


def parse_event(raw: bytes | str) -> WorkerEvent:
    """Decode one published event."""
    return _ADAPTER.validate_json(raw)
