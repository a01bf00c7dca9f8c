"""Message Batches wire models: Anthropic's shapes (the SDK's `types/messages/*batch*`).

The create body is parsed by hand (api/anthropic/batch_create.py), not by a model: one request
whose `params` are invalid ends `errored` without failing the batch, so each `params` is
validated on its own.
"""

from datetime import datetime
from typing import Literal

from api.anthropic.blocks import WireModel


class RequestCounts(WireModel):
    processing: int  # not ended yet
    succeeded: int
    errored: int
    canceled: int
    expired: int


class MessageBatch(WireModel):
    id: str  # msgbatch_...
    type: Literal["message_batch"] = "message_batch"
    processing_status: Literal["in_progress", "canceling", "ended"]
    request_counts: RequestCounts
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    cancel_initiated_at: datetime | None
    archived_at: datetime | None
    # Absolute, once the batch has ended (the SDK's `results()` reads it).
    results_url: str | None


class MessageBatchList(WireModel):
    data: list[MessageBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class DeletedMessageBatch(WireModel):
    id: str
    type: Literal["message_batch_deleted"] = "message_batch_deleted"
