"""What a worker publishes for one request on its pub/sub channel (`keys.events_channel`).

Events are numbered: `index` starts at 0 and grows by 1 per event, so the API notices a lost one.
Deltas come first, then exactly one terminal event (`done` or `error`).
"""

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter

from contract.errors import ErrorType


class DeltaEvent(BaseModel):
    """A piece of generated text."""

    type: Literal["delta"] = "delta"
    index: int  # position of this event in the request's event stream
    text: str  # new text, stop sequences already removed
    output_tokens: int  # tokens generated so far (cumulative)


class DoneEvent(BaseModel):
    """The request finished and is settled; always the last event."""

    type: Literal["done"] = "done"
    index: int
    status: Literal["succeeded", "cancelled"]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence"] | None
    stop_sequence: str | None  # the matched stop sequence, if that ended it
    input_tokens: int
    output_tokens: int
    credits_charged: int  # whole credits charged for this request
    remaining_credits: int  # account balance minus reservations after settlement
    cost_usd: str  # exact USD cost as a decimal string


class ErrorEvent(BaseModel):
    """The request failed; always the last event. Nothing was charged."""

    type: Literal["error"] = "error"
    index: int
    error_type: ErrorType
    message: str


WorkerEvent = DeltaEvent | DoneEvent | ErrorEvent
_ADAPTER: TypeAdapter[WorkerEvent] = TypeAdapter(
    Annotated[WorkerEvent, Field(discriminator="type")]
)


def parse_event(raw: bytes | str) -> WorkerEvent:
    """Decode one published event."""
    return _ADAPTER.validate_json(raw)
