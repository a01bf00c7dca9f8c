"""The engine seam: what a backend implements, and what it hands back for each request.

A backend serves one model with many requests in flight: `submit` a `Submission`, read the
request's events (text chunks, then one terminal event) from the returned `Generation`, `cancel`
it, read backend-neutral `stats`. The worker drives every backend the same way, in a child
process of its own (`workers.engine_process`); which backend serves a model is the catalogue's
`backend` field (`workers.backends.create_backend`).

Kept free of torch, so the worker process, whose engines run in child processes, never loads it.
"""

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from contract.errors import API_ERROR, ErrorType
from contract.jobs import SamplingParams

# "tool_use" is never an engine's: the worker's shaping sets it when the answer called a tool.
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


@dataclass
class TextChunk:
    """New text (stop sequences removed) and the cumulative number of generated tokens."""

    text: str
    output_tokens: int


@dataclass
class Finished:
    """The request ended; always its last event."""

    stop_reason: StopReason | None
    stop_sequence: str | None
    output_tokens: int
    cancelled: bool = False


@dataclass
class Failed:
    """The request could not run; always its last event."""

    message: str
    # What the client is told: the platform failed (api_error), or the request cannot be run
    # as sent (invalid_request_error: a 400, e.g. max_tokens too small for a forced call).
    error_type: ErrorType = API_ERROR


@dataclass
class CacheUse:
    """What the prompt cache did for a request, known as soon as it is submitted: prompt
    tokens whose cached KV it reuses, and tokens whose KV it will store for later requests.
    Not queued with the other events: `Generation.cache_use` holds it."""

    read_tokens: int
    write_tokens: int


EngineEvent = TextChunk | Finished | Failed | CacheUse


def is_terminal(event: EngineEvent) -> bool:
    return isinstance(event, Finished | Failed)


class Generation:
    """Handle for one submitted request: its events, in order."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        # Generated ids, eos included; complete once the terminal event has been read.
        # Filled by an in-process engine only (an engine in a child process sends text).
        self.token_ids: list[int] = []
        self._events: queue.SimpleQueue[EngineEvent] = queue.SimpleQueue()
        # The prompt cache's answer (backends that cache put one at submit), or None.
        self.cache_use: CacheUse | None = None
        self._cache_known = threading.Event()

    def _put(self, event: EngineEvent) -> None:
        if isinstance(event, CacheUse):
            self.cache_use = event
            self._cache_known.set()
            return
        if is_terminal(event):
            self._cache_known.set()
        self._events.put(event)

    def wait_cache_use(self, timeout: float) -> CacheUse | None:
        """The prompt cache's answer, waiting up to `timeout` s; None if it has none (the
        request failed first, or the backend does not cache)."""
        self._cache_known.wait(timeout)
        return self.cache_use

    def get(self, timeout: float | None = None) -> EngineEvent | None:
        """The next event, waiting up to `timeout` seconds (None: forever); None on timeout."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[EngineEvent]:
        """Every event already queued, without waiting (lets the caller coalesce deltas)."""
        out: list[EngineEvent] = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._events.get_nowait())
        return out

    def events(self, timeout: float | None = None) -> Iterator[EngineEvent]:
        """Events until the terminal one; TimeoutError if one takes more than `timeout` s."""
        while True:
            event = self.get(timeout)
            if event is None:
                raise TimeoutError(f"no event for {self.request_id} in {timeout} s")
            yield event
            if is_terminal(event):
                return


@dataclass
class EngineStats:
    """What every backend reports about itself (the worker's heartbeat and metrics show it)."""

    active: int = 0  # sequences in the running batch
    waiting: int = 0  # submitted, not yet running
    steps: int = 0  # batched decode steps run
    tokens_generated: int = 0  # all output tokens, eos included
    max_batch_seen: int = 0  # most sequences in one decode step
    cancelled: int = 0
    finished: int = 0  # ended normally (end_turn, max_tokens, stop_sequence)
    failed: int = 0
    kv_tokens: int = 0  # tokens whose keys and values the running batch holds
    # Token slots the cache holds for them: padding, or rounding up to blocks, included.
    kv_allocated_tokens: int = 0
    kv_capacity_tokens: int = 0  # the most token slots the cache may hold
    kv_reserved_tokens: int = 0  # slots the running sequences may grow into (admission counts it)
    kv_budget_tokens: int = 0  # the backend's KV budget, in tokens
    kv_bytes_per_token: int = 0  # keys and values of one token, all layers
    # The prompt cache (prefix KV kept between requests): lookups made, lookups that reused
    # a prefix, prompt tokens reused and stored, blocks evicted, bytes held and allowed.
    prefix_lookups: int = 0
    prefix_hits: int = 0
    prefix_read_tokens: int = 0
    prefix_stored_tokens: int = 0
    prefix_evictions: int = 0
    prefix_bytes: int = 0
    prefix_budget_bytes: int = 0


@dataclass(frozen=True)
class Constraint:
    """What the output must be, by construction (the backend masks each step's logits).

    `json`: one JSON value valid under `schema` (structured output). `tool_call`: exactly one
    call, in the tool-call text format (`contract.toolcalls`), to tool `name` or, without a
    name, to any of `tools` (name -> input_schema). Schemas were checked by the API
    (`contract.json_schema_support`).
    """

    kind: Literal["json", "tool_call"]
    schema: dict[str, Any] | bool | None = None
    tools: dict[str, dict[str, Any]] | None = None
    name: str | None = None


@dataclass(frozen=True)
class Submission:
    """One request for a backend: the prompt's token ids and how to decode."""

    request_id: str
    input_ids: list[int]
    sampling: SamplingParams
    # Whose request it is (the account): backends share their batch fairly between owners.
    owner: str | None = None
    # A grammar the output must follow; None: free text.
    constraint: Constraint | None = None
    # A Message Batch request: started only when no other request runs or waits, and never
    # into the last `BackendOptions.background_reserve` rows of the batch.
    background: bool = False
    # Prompt caching: the KV of the prompt's first tokens, up to this many, may be read from
    # and stored in the backend's prompt cache (0: neither).
    cache_prefix_tokens: int = 0


@dataclass(frozen=True)
class BackendOptions:
    """How the worker sizes a backend (ABL_MAX_BATCH, ABL_TORCH_THREADS,
    ABL_PREFILL_CHUNK_TOKENS)."""

    max_batch: int = 16  # sequences decoded together at most
    num_threads: int | None = None  # CPU threads; None: the backend decides
    kv_budget_bytes: int | None = None  # memory for keys and values; None: the backend's default
    # Long prompts are prefilled this many tokens per step; None: the backend's default.
    prefill_chunk_tokens: int | None = None
    # Rows of the batch background (Message Batch) requests never take, kept for interactive
    # ones (ABL_BATCH_RESERVE); None: a quarter of max_batch, at least one.
    background_reserve: int | None = None

    def reserve_rows(self) -> int:
        if self.background_reserve is not None:
            return min(self.background_reserve, self.max_batch - 1)
        return max(1, self.max_batch // 4) if self.max_batch > 1 else 0

    prefix_cache_bytes: int = 0  # memory for the prompt cache (0: no prompt caching)


class Backend(Protocol):
    """A model engine with continuous batching: many requests decode together."""

    # Called (on the backend's own thread) whenever new events are out.
    on_events: Callable[[], None] | None

    def start(self) -> None:
        """Starts stepping (the model is already loaded)."""

    def stop(self) -> None:
        """Stops stepping; requests still waiting or running end with `Failed`."""

    def submit(self, submission: Submission) -> Generation:
        """Queues a request; ValueError if its id is already in flight here."""

    def cancel(self, request_id: str) -> bool:
        """Drops the request at the next step; False if it is not in flight."""

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the backend's counters and cache use."""
