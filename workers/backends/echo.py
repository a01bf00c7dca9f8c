"""`EchoBackend`: a backend without a model, behind the same seam as the real ones.

Each request "generates" its prompt back, one token id per step, as the text `"<id> "`: all
sequences in flight advance together, one step at a time, like a continuously batched engine.
It ends with `end_turn` once the prompt is echoed, `max_tokens` when that comes first, or at a
stop sequence (matched on the text, as a real engine does). Tests of the worker runtime and the
engine process use it: it loads in milliseconds and needs no torch.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.backends.seam import (
    BackendOptions,
    CacheUse,
    EngineStats,
    Failed,
    Finished,
    Generation,
    StopReason,
    Submission,
    TextChunk,
)
from workers.backends.textstream import StopMatcher


@dataclass
class _Echo:
    generation: Generation
    prompt: list[int]
    max_tokens: int
    stopper: StopMatcher
    produced: int = 0
    cancelled: bool = False
    events: list[TextChunk | Finished | Failed] = field(default_factory=list)


class EchoBackend:
    """Echoes prompts back, `max_batch` sequences per step, a step every `step_s` seconds."""

    def __init__(self, options: BackendOptions = BackendOptions(), step_s: float = 0.002) -> None:
        self.max_batch = options.max_batch
        self.step_s = step_s
        self.on_events: Callable[[], None] | None = None
        self._live: dict[str, _Echo] = {}
        self._order: list[str] = []  # submission order: the first max_batch run
        self._stats = EngineStats(kv_capacity_tokens=0)
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._run, name="echo-step", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            for echo in self._live.values():
                echo.generation._put(Failed("the engine stopped"))
                self._stats.failed += 1
            self._live.clear()
            self._order.clear()
        self._notify()

    def submit(self, submission: Submission) -> Generation:
        generation = Generation(submission.request_id)
        if not submission.input_ids:
            generation._put(Failed("the prompt is empty"))
            return generation
        echo = _Echo(
            generation,
            list(submission.input_ids),
            submission.sampling.max_tokens,
            StopMatcher(submission.sampling.stop_sequences),
        )
        with self._cond:
            if submission.request_id in self._live:
                raise ValueError(f"request {submission.request_id} is already running")
            self._live[submission.request_id] = echo
            self._order.append(submission.request_id)
            generation._put(CacheUse(0, 0))  # no prompt cache here
            self._cond.notify_all()
        return generation

    def cancel(self, request_id: str) -> bool:
        with self._cond:
            echo = self._live.get(request_id)
            if echo is None:
                return False
            echo.cancelled = True
            self._cond.notify_all()
            return True

    @property
    def stats(self) -> EngineStats:
        with self._cond:
            active = min(len(self._order), self.max_batch)
            return EngineStats(
                **{**self._stats.__dict__, "active": active, "waiting": len(self._order) - active}
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._order:
                    self._cond.wait()
                if not self._running:
                    return
                touched = [self._live[r] for r in self._order]
                batch = [e for e in touched[: self.max_batch] if not e.cancelled]
                for echo in touched:
                    if echo.cancelled:
                        echo.events.append(Finished(None, None, echo.produced, cancelled=True))
                        self._stats.cancelled += 1
                for echo in batch:
                    self._advance(echo)
                self._order = [r for r in self._order if not self._ended(self._live[r])]
                self._live = {r: self._live[r] for r in self._order}
                self._stats.steps += 1
                self._stats.max_batch_seen = max(self._stats.max_batch_seen, len(batch))
            for echo in touched:
                events, echo.events = echo.events, []
                for event in events:
                    echo.generation._put(event)
            self._notify()
            time.sleep(self.step_s)

    def _advance(self, echo: _Echo) -> None:
        token = echo.prompt[echo.produced % len(echo.prompt)]
        echo.produced += 1
        self._stats.tokens_generated += 1
        safe, matched = echo.stopper.feed(f"{token} ")
        if safe:
            echo.events.append(TextChunk(safe, echo.produced))
        if matched is not None:
            echo.events.append(Finished("stop_sequence", matched, echo.produced))
        elif echo.produced >= echo.max_tokens or echo.produced >= len(echo.prompt):
            held = echo.stopper.flush()
            if held:
                echo.events.append(TextChunk(held, echo.produced))
            reason: StopReason = "end_turn" if echo.produced >= len(echo.prompt) else "max_tokens"
            echo.events.append(Finished(reason, None, echo.produced))
        else:
            return
        self._stats.finished += 1

    @staticmethod
    def _ended(echo: _Echo) -> bool:
        return any(isinstance(e, Finished | Failed) for e in echo.events)

    def _notify(self) -> None:
        if self.on_events is not None:
            self.on_events()
