"""What an engine hands back for each request: text chunks, then one terminal event.

Kept free of torch, so a worker process whose engine runs in a child process
(`workers.engine_proc`) does not load it.
"""

import contextlib
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]


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


Event = TextChunk | Finished | Failed


def is_terminal(event: Event) -> bool:
    return isinstance(event, Finished | Failed)


class Generation:
    """Handle for one submitted request: its events, in order."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        # Generated ids, eos included; complete once the terminal event has been read.
        # Filled by an in-process engine only (an engine in a child process sends text).
        self.token_ids: list[int] = []
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def _put(self, event: Event) -> None:
        self._events.put(event)

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to `timeout` seconds (None: forever); None on timeout."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[Event]:
        """Every event already queued, without waiting (lets the caller coalesce deltas)."""
        out: list[Event] = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._events.get_nowait())
        return out

    def events(self, timeout: float | None = None) -> Iterator[Event]:
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
    active: int = 0  # sequences in the running batch
    waiting: int = 0  # submitted, not yet prefilled
    steps: int = 0  # batched decode steps run
    tokens_generated: int = 0  # all output tokens, eos included
    max_batch_seen: int = 0  # most sequences in one decode step
    cancelled: int = 0
    finished: int = 0  # ended normally (end_turn, max_tokens, stop_sequence)
    failed: int = 0
    kv_tokens: int = 0  # real tokens held in the running batch's KV cache
    kv_padded_tokens: int = 0  # rows x width of that cache, left padding included
    kv_capacity_tokens: int = 0  # the most it can hold: the KV budget, or max_batch x context
    kv_reserved_tokens: int = 0  # rows x the longest prompt + max_tokens among them
    kv_budget_tokens: int = 0  # the engine's KV budget, in tokens
    kv_bytes_per_token: int = 0  # keys and values of one token, all layers
