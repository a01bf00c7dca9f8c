"""The API <-> worker contract: task name, job payload, and the events a worker publishes.

Pydantic and stdlib only. Both sides import this module; nothing else crosses the boundary.
Version the payload (`v`) when a field changes meaning.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter

# Celery task name; the API enqueues by name with send_task and never imports the task.
TASK_GENERATE = "abl.generate"
PROTOCOL_VERSION = 1


def events_channel(request_id: str) -> str:
    """Redis pub/sub channel on which a request's events are published."""
    return f"abl:req:{request_id}:events"


# Pub/sub channel on which the API announces cancellations; every worker listens.
CANCEL_CHANNEL = "abl:cancel"


def cancel_key(request_id: str) -> str:
    """Redis key set when a request is cancelled (for workers that claim it later)."""
    return f"abl:req:{request_id}:cancel"


def lease_key(request_id: str) -> str:
    """Redis key naming the worker running a request; it expires if that worker dies."""
    return f"abl:req:{request_id}:lease"


class SamplingParams(BaseModel):
    """How to pick tokens."""

    max_tokens: int = Field(ge=1)  # upper bound on generated tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # 0 = greedy, deterministic
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # nucleus mass, None = off
    top_k: int | None = Field(default=None, ge=1)  # keep the k best tokens, None = off
    stop_sequences: list[str] = Field(default_factory=list)  # matched on decoded text


class GenerateJob(BaseModel):
    """What a worker needs to run one request; sent as the task's only argument (JSON)."""

    v: int = PROTOCOL_VERSION  # payload version
    request_id: str  # public id (req_...), primary key of the request row
    model: str  # catalogue id; the queue already routed it to a worker serving this model
    input_ids: list[int]  # the rendered, tokenized prompt (the API counted exactly these)
    sampling: SamplingParams  # decoding parameters
    # Who sent it, for the worker's request log line only (never for decisions).
    account_id: str | None = None
    key_prefix: str | None = None


class DeltaEvent(BaseModel):
    """A piece of generated text. `seq` starts at 0 and increases by 1 per event."""

    type: Literal["delta"] = "delta"
    seq: int  # position of this event in the request's event stream
    text: str  # new text, stop sequences already removed
    output_tokens: int  # tokens generated so far (cumulative)


class DoneEvent(BaseModel):
    """The request finished and is settled; always the last event."""

    type: Literal["done"] = "done"
    seq: int
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
    seq: int
    error_type: str  # Anthropic error type: api_error, overloaded_error, ...
    message: str


Event = Annotated[DeltaEvent | DoneEvent | ErrorEvent, Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[DeltaEvent | DoneEvent | ErrorEvent] = TypeAdapter(Event)


def parse_event(raw: bytes | str) -> DeltaEvent | DoneEvent | ErrorEvent:
    """Decode one published event."""
    return EVENT_ADAPTER.validate_json(raw)
