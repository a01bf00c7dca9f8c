"""Publishing the answer of every running request from one thread, once per engine step.

A task thread per request that wakes for each token and publishes it alone costs one GIL
handoff and one Redis round trip per sequence per decode step; at 16 sequences that slowed the
stepping thread by about a quarter (docs/benchmarks.md). Here the engine calls `notify()` after
each step; one thread drains every watched generation, shapes its new text into content-block
operations (workers/shaping.py), publishes those of all requests in one pipeline, and hands each
request's terminal event to its `on_end` callback once its last text is out (the runtime
settles it then, on a thread of its own: the pump never waits).

A request's first text goes out at once; after that its text is held until `min_interval_s`
has passed since its previous delta (or it ends), so a delta carries a few tokens when steps
are fast, without holding any text for longer than that interval plus one step.
"""

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis

from workers.backends.seam import EngineEvent, Failed, Finished, Generation, TextChunk
from workers.shaping import BlockOp, Shaper, TextShaper, coalesced

log = logging.getLogger("abl.worker")


class BlockPublisher(Protocol):
    """The per-request publisher (`workers.runtime.Publisher`): numbers and sends events."""

    next_index: int

    def block_op(self, op: BlockOp, output_tokens: int, via: "redis.client.Pipeline") -> None: ...


@dataclass
class _Stream:
    request_id: str
    generation: Generation
    publisher: BlockPublisher
    shaper: Shaper
    on_end: Callable[[Finished | Failed], None]
    final: Finished | Failed | None = None
    held: list[BlockOp] = field(default_factory=list)  # operations not yet published
    tokens: int = 0  # output tokens after `held`
    sent_at: float | None = None  # monotonic time of the last publication


def coalesce(events: list[EngineEvent]) -> tuple[str, int, Finished | Failed | None]:
    """The text of a run of events, the token count after it, and the terminal event if any."""
    text, tokens = "", 0
    for event in events:
        if isinstance(event, TextChunk):
            text += event.text
            tokens = event.output_tokens
        elif isinstance(event, Finished | Failed):  # (CacheUse never reaches the queue)
            return text, tokens, event
    return text, tokens, None


def _with_stop_reason(final: Finished | Failed, shaper: Shaper) -> Finished | Failed:
    """The engine's terminal event with the answer's stop reason (a tool call: `tool_use`)."""
    if not isinstance(final, Finished) or final.cancelled:
        return final
    reason = shaper.stop_reason(final.stop_reason)
    if reason == final.stop_reason:
        return final
    return dataclasses.replace(final, stop_reason=reason, stop_sequence=None)


class DeltaPump:
    """One thread that relays every watched generation's text to Redis pub/sub."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        muted: Callable[[str], bool],
        on_publish_error: Callable[[str], None],
        min_interval_s: float = 0.0,
    ) -> None:
        self._client = client
        self._min_interval_s = min_interval_s
        self._muted = muted  # requests whose text must no longer go out (being aborted)
        self._on_publish_error = on_publish_error
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="delta-pump", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def notify(self) -> None:
        """New events may be waiting (called by the engine's stepping thread)."""
        self._wake.set()

    def watch(
        self,
        generation: Generation,
        publisher: BlockPublisher,
        on_end: Callable[[Finished | Failed], None],
        shaper: Shaper | None = None,
    ) -> None:
        """Relays `generation`'s answer (shaped into blocks by `shaper`, one text block by
        default) until it ends, then calls `on_end` with its terminal event (on the pump's
        thread: it must return quickly)."""
        stream = _Stream(
            generation.request_id, generation, publisher, shaper or TextShaper(), on_end
        )
        with self._lock:
            self._streams[stream.request_id] = stream
        # Events queued before the stream was watched must not wait for the next step.
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self._pump()
            except Exception:  # keep relaying for every other request
                log.exception("delta pump failed")
            if self._stopping:  # after a last pass: the engines' final events are out
                return

    def _pump(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        pipe = self._client.pipeline(transaction=False)
        sent: list[tuple[_Stream, int]] = []  # streams published, and their index before
        ended: list[_Stream] = []
        try:
            now = time.monotonic()
            for stream in streams:
                text, tokens, final = coalesce(stream.generation.drain())
                if text:
                    stream.held += stream.shaper.feed(text)
                    stream.tokens = tokens
                if final is not None:
                    stream.held += stream.shaper.finish()
                    stream.final = _with_stop_reason(final, stream.shaper)
                    ended.append(stream)
                if stream.held and (final is not None or self._due(stream, now)):
                    if not self._muted(stream.request_id):
                        sent.append((stream, stream.publisher.next_index))
                        for op in coalesced(stream.held):
                            stream.publisher.block_op(op, stream.tokens, pipe)
                    stream.held, stream.sent_at = [], now
            if sent:
                self._execute(pipe, sent)
        finally:
            # Only after its last text is out: the runtime publishes the terminal event next.
            with self._lock:
                for stream in ended:
                    del self._streams[stream.request_id]
            for stream in ended:
                assert stream.final is not None
                try:
                    stream.on_end(stream.final)
                except Exception:  # one request's bookkeeping must not stop the others'
                    log.exception("ending %s failed", stream.request_id)

    def _due(self, stream: _Stream, now: float) -> bool:
        return stream.sent_at is None or now - stream.sent_at >= self._min_interval_s

    def _execute(self, pipe: "redis.client.Pipeline", sent: list[tuple[_Stream, int]]) -> None:
        try:
            pipe.execute()
        except redis.RedisError:
            for stream, index in sent:
                stream.publisher.next_index = index  # never delivered: the numbers are free
                self._on_publish_error(stream.request_id)
