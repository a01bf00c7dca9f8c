"""The job a worker runs: the Celery task name and its only argument, `GenerateJob` (JSON).

Version the payload (`v`) when a field changes meaning.
"""

from typing import Any, Literal

from pydantic import BaseModel, Field

# Celery task name; the API enqueues by name and never imports the task.
TASK_GENERATE = "abl.generate"
PROTOCOL_VERSION = 2


class SamplingParams(BaseModel):
    """How to pick tokens."""

    max_tokens: int = Field(ge=1)  # upper bound on generated tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # 0 = greedy, deterministic
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # nucleus mass, None = off
    top_k: int | None = Field(default=None, ge=1)  # keep the k best tokens, None = off
    stop_sequences: list[str] = Field(default_factory=list)  # matched on decoded text


class ToolSpec(BaseModel):
    """A tool the model may call (a custom tool of the request)."""

    name: str
    input_schema: dict[str, Any]  # JSON Schema of the call's `input` (already checked)


class ToolUse(BaseModel):
    """The request's tools and whether the answer must call one (Anthropic's tool_choice)."""

    tools: list[ToolSpec]
    # auto: the model decides; any: it must call one; tool: it must call `name`;
    # none: it must not call any.
    choice: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None  # the tool to call, with choice "tool"
    parallel: bool = True  # false: at most one call (disable_parallel_tool_use)


class GenerateJob(BaseModel):
    """What a worker needs to run one request; sent as the task's only argument (JSON)."""

    v: int = PROTOCOL_VERSION  # payload version
    request_id: str  # public id (req_...), primary key of the request row
    model: str  # catalogue id; the queue already routed it to a worker serving this model
    input_ids: list[int]  # the rendered, tokenized prompt (the API counted exactly these)
    sampling: SamplingParams  # decoding parameters
    # Tools: calls are parsed out of the generated text into tool_use blocks; a forced call
    # (choice any/tool) is generated under a grammar, so it is valid JSON for its schema.
    tool_use: ToolUse | None = None
    # Structured output: the whole answer is JSON valid against this schema (grammar).
    output_schema: dict[str, Any] | None = None
    # Extended thinking: at most this many tokens of it (models without a reasoning
    # section produce none).
    thinking_budget: int | None = None
    # Prompt caching: the prompt's first tokens, up to this many, may be read from and written
    # to the worker's prompt cache (the prefix up to the request's last cache_control
    # breakpoint; 0: no caching). docs/caching.md.
    cache_prefix_tokens: int = Field(default=0, ge=0)
    # Who sent it, for the worker's request log line only (never for decisions).
    account_id: str | None = None
    key_prefix: str | None = None
    # The Message Batch this job runs a request of (None: interactive). Nobody streams it: the
    # worker stores its answer with its settlement (db/batches.py), and the engine runs it
    # only in room interactive requests leave (docs/batches.md).
    batch_id: str | None = None
