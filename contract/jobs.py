"""The job a worker runs: the Celery task name and its only argument, `GenerateJob` (JSON).

Version the payload (`v`) when a field changes meaning.
"""

from pydantic import BaseModel, Field

# Celery task name; the API enqueues by name and never imports the task.
TASK_GENERATE = "abl.generate"
PROTOCOL_VERSION = 1


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
