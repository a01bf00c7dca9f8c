"""The model engine: one model, continuous batching, streamed events per request.

One stepping thread owns the model. Each step it drops cancelled sequences, prefills newly
submitted ones (together, in one left-padded forward), then runs one batched forward for
every active sequence. The batch shares one left-padded KV cache (`kv_batch`); sequences join
and leave it between steps. No Celery or Redis here: callers submit token ids and read events
from the returned `Generation`. A worker runs it in a child process of its own
(`workers.engine_process`); tests and the benchmarks' baselines run it in-process.
"""

import inspect
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from contract.jobs import SamplingParams
from contract.rendering import PromptRenderer
from workers.backends.seam import (
    EngineStats,
    Failed,
    Finished,
    Generation,
    StopReason,
    Submission,
    TextChunk,
)
from workers.backends.textstream import IncrementalDecoder, StopMatcher
from workers.backends.transformers.kv_batch import KV, BatchCache, kv_bytes_per_token, layers_of
from workers.backends.transformers.sampling import make_generator, sample_next

log = logging.getLogger(__name__)

# Prompt tokens prefilled per step before the running batch gets its next decode step, so a
# burst of long prompts cannot stall everyone else's tokens for long.
PREFILL_TOKENS_PER_STEP = 4096
# After an interactive request, how long no background (Message Batch) request starts: a
# client's next request is usually on its way (docs/batches.md).
BACKGROUND_LINGER_S = 0.2
# Most bytes the running batch's KV cache may reserve: fits a 2-core, 8 GB laptop beside the
# default model (~1.1 GB resident), the API, Postgres and Redis.
DEFAULT_KV_BUDGET_BYTES = 1536 * 1024 * 1024


@dataclass
class _Sequence:
    generation: Generation
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    decoder: IncrementalDecoder
    stopper: StopMatcher
    output: list[int]  # the Generation's token_ids list, shared
    # KV positions it may come to hold: prompt + max_tokens, within the context window.
    reserve: int
    owner: str  # whose request (its account): admission is fair between owners
    background: bool = False  # a Message Batch request: after every other, never the reserve


class _Batch:
    """The running sequences, row for row with their shared KV cache."""

    def __init__(self) -> None:
        self.seqs: list[_Sequence] = []
        self.kv = BatchCache()

    def join(self, seqs: list[_Sequence], caches: list[DynamicCache]) -> None:
        self.kv.join(caches)
        self.seqs += seqs

    def join_padded(
        self, seqs: list[_Sequence], layers: list[KV], mask: torch.Tensor, rows: list[int]
    ) -> None:
        self.kv.join_padded(layers, mask, rows)
        self.seqs += seqs

    def keep(self, rows: list[int]) -> None:
        self.kv.keep(rows)
        self.seqs = [self.seqs[r] for r in rows]


class TransformersEngine:
    """One model, many concurrent requests, one stepping thread."""

    def __init__(
        self,
        model_path: Path,
        *,
        max_batch: int = 16,
        device: str | None = None,
        max_context: int | None = None,
        num_threads: int | None = None,
        kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
        background_reserve: int = 0,
    ) -> None:
        self.model_path = Path(model_path)
        self.max_batch = max_batch
        # Rows a full batch may still take for owners with nothing running.
        self.hard_max_batch = max_batch + max(1, max_batch // 4)
        # Rows background requests leave free for interactive ones.
        self.background_rows = max(1, max_batch - background_reserve)
        self._interactive_at = -BACKGROUND_LINGER_S  # when an interactive request last ran
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            # torch defaults to every physical core; a container may be allowed fewer. One core
            # is left to the rest of the process and to whatever runs beside it (the API,
            # Redis, Postgres): OpenMP threads that lose their core to another process stall
            # each other at every op (docs/benchmarks.md: 2 threads on 2 shared cores served
            # a tenth of what 1 thread did).
            allowed = len(os.sched_getaffinity(0))
            torch.set_num_threads(num_threads or max(1, min(torch.get_num_threads(), allowed - 1)))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' .to() stub
        self.renderer = PromptRenderer.from_folder(self.model_path)
        config = self.model.config.get_text_config()
        self.vocab_size: int = int(config.vocab_size)
        self.max_context: int = max_context or int(
            getattr(config, "max_position_embeddings", 0) or 2048
        )
        eos = set(self.renderer.eos_token_ids)
        eos.update(_ids(getattr(self.model.generation_config, "eos_token_id", None)))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        # Fills the left padding of a batched prefill; masked out, so any id in range works.
        pad = getattr(config, "pad_token_id", None)
        self.pad_token_id: int = pad if isinstance(pad, int) else min(self.eos_token_ids, default=0)
        self.kv_bytes_per_token = kv_bytes_per_token(config, dtype)
        self.kv_budget_tokens = max(1, kv_budget_bytes // self.kv_bytes_per_token)
        params = inspect.signature(self.model.forward).parameters
        # transformers 5 renamed past_key_values to cache; accept either spelling.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params

        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._cancel: set[str] = set()
        self._live: dict[str, _Sequence] = {}  # waiting or active, by request id
        # Called on the stepping thread when new events are out (workers.pump.DeltaPump).
        self.on_events: Callable[[], None] | None = None
        self._batch = _Batch()
        # Terminal events of this step, published once the batch no longer holds them.
        self._finals: list[tuple[_Sequence, Finished | Failed]] = []
        self._stats = EngineStats()
        self._running = False
        self._thread: threading.Thread | None = None

    @classmethod
    def load(cls, model_path: Path, **kw: Any) -> "TransformersEngine":
        """Loads the model and starts the stepping thread."""
        engine = cls(model_path, **kw)
        engine.start()
        return engine

    def start(self) -> None:
        """Starts the stepping thread (idempotent)."""
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops stepping; requests still waiting or running get Failed."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for seq in list(self._live.values()):
            self._fail(seq, "the engine stopped")
        self._waiting.clear()
        self._batch = _Batch()
        self._publish_finals()

    def submit(self, submission: Submission) -> Generation:
        """Queues a request; its events arrive on the returned Generation."""
        request_id, sampling = submission.request_id, submission.sampling
        generation = Generation(request_id)
        seq = _Sequence(
            generation=generation,
            output=generation.token_ids,
            prompt=list(submission.input_ids),
            params=sampling,
            generator=make_generator(sampling, self.device),
            decoder=IncrementalDecoder(self.renderer.decode),
            stopper=StopMatcher(sampling.stop_sequences),
            reserve=min(len(submission.input_ids) + sampling.max_tokens, self.max_context),
            owner=submission.owner or request_id,
            background=submission.background,
        )
        problem = self._check_prompt(seq.prompt)
        if problem is not None:
            generation._put(Failed(problem))
            return generation
        with self._cond:
            if request_id in self._live:
                raise ValueError(f"request {request_id} is already running")
            self._live[request_id] = seq
            self._waiting.append(seq)
            self._cond.notify_all()
        return generation

    def cancel(self, request_id: str) -> bool:
        """Drops the request at the next step; False if it is not waiting or running."""
        with self._cond:
            if request_id not in self._live:
                return False
            self._cancel.add(request_id)
            self._cond.notify_all()
            return True

    @property
    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                **{
                    **self._stats.__dict__,
                    "active": len(self._batch.seqs),
                    "waiting": len(self._waiting),
                    "kv_tokens": sum(self._batch.kv.lengths),
                    "kv_allocated_tokens": len(self._batch.kv) * self._batch.kv.width,
                    "kv_capacity_tokens": min(
                        self.kv_budget_tokens, self.max_batch * self.max_context
                    ),
                    "kv_reserved_tokens": _reserved(self._batch.seqs),
                    "kv_budget_tokens": self.kv_budget_tokens,
                    "kv_bytes_per_token": self.kv_bytes_per_token,
                }
            )

    def _check_prompt(self, ids: list[int]) -> str | None:
        if not ids:
            return "the prompt is empty"
        if len(ids) >= self.max_context:
            return f"the prompt has {len(ids)} tokens; the context window is {self.max_context}"
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            return f"the prompt has token ids outside the vocabulary (0..{self.vocab_size - 1})"
        return None

    # The stepping thread.

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while self._running and not (self._waiting or self._batch.seqs or self._cancel):
                        self._cond.wait()
                    if not self._running:
                        return
                    cancels, self._cancel = self._cancel, set()
                    admitted = self._admit(cancels)
                    if not (admitted or self._batch.seqs or cancels):
                        # Only background requests wait, for idle capacity: not a busy loop.
                        self._cond.wait(BACKGROUND_LINGER_S)
                        continue
                try:
                    self._step(cancels, admitted)
                except Exception as exc:  # a bug here must not leave every caller waiting forever
                    log.exception("engine step failed")
                    ended = {id(seq) for seq, _ in self._finals}
                    for seq in {id(s): s for s in [*self._batch.seqs, *admitted]}.values():
                        if id(seq) not in ended:
                            self._fail(seq, f"engine error: {exc}")
                    self._batch = _Batch()
                # After the batch is updated, so whoever sees a terminal event also sees the
                # sequence gone from `stats` and its KV memory released.
                self._publish_finals()

    def _step(self, cancels: set[str], admitted: list[_Sequence]) -> None:
        self._drop_cancelled(cancels)
        if self._finals:
            # Cancelled sequences are out of the batch already: say so before the forward passes.
            self._publish_finals()
        self._prefill(admitted)
        if admitted:
            self._notify()  # first tokens go out now, not after the decode step
        if self._batch.seqs:
            self._decode_step()

    def _admit(self, cancels: set[str]) -> list[_Sequence]:
        """Takes waiting requests into the batch, first come first served, while slots, the
        prefill budget and the KV budget last.

        The cache is left-padded to its longest row, and rows only grow until they end, so
        the batch can come to hold rows x (the longest reserve among them): a newcomer fits
        when (rows + 1) x max(that width, its own reserve) stays within the budget. Reserving
        the end state, not the current lengths, means decoding never outgrows the budget
        (nothing here can evict a running sequence). A newcomer alone in an empty batch is
        always taken, so one that needs more than the budget still runs.
        """
        kept = deque(s for s in self._waiting if s.generation.request_id not in cancels)
        for seq in self._waiting:
            if seq.generation.request_id in cancels:
                self._finish(seq, None, None, cancelled=True)
        self._waiting = kept
        admitted: list[_Sequence] = []
        budget = PREFILL_TOKENS_PER_STEP
        rows = len(self._batch.seqs)
        width = max((s.reserve for s in self._batch.seqs), default=0)
        running = Counter(s.owner for s in self._batch.seqs)
        now = time.monotonic()
        interactive = any(not s.background for s in self._batch.seqs)
        if interactive:
            self._interactive_at = now
        while self._waiting:
            # Interactive first; of those, the first of the least served owner. A background
            # request starts only in idle capacity: no interactive request running (each row
            # slows every step on a CPU) nor for BACKGROUND_LINGER_S (a client's next request
            # is on its way), and never into the reserve rows.
            seq = min(self._waiting, key=lambda s: (s.background, running[s.owner]))
            if seq.background and (
                interactive
                or rows >= self.background_rows
                or now - self._interactive_at < BACKGROUND_LINGER_S
            ):
                break
            if not seq.background:
                interactive, self._interactive_at = True, now
            # A full batch still takes a request whose owner has nothing running, up to
            # `fair_extra` rows more: another account's first request does not wait for a
            # flooding account's to end (docs/architecture.md, "Queueing").
            if rows >= self.max_batch and (running[seq.owner] or rows >= self.hard_max_batch):
                break
            if admitted and len(seq.prompt) > budget:
                break
            if rows and (rows + 1) * max(width, seq.reserve) > self.kv_budget_tokens:
                break
            self._waiting.remove(seq)
            budget -= len(seq.prompt)
            admitted.append(seq)
            running[seq.owner] += 1
            rows, width = rows + 1, max(width, seq.reserve)
        return admitted

    def _drop_cancelled(self, cancels: set[str]) -> None:
        seqs = self._batch.seqs
        keep = [i for i, s in enumerate(seqs) if s.generation.request_id not in cancels]
        if len(keep) == len(seqs):
            return
        for seq in seqs:
            if seq.generation.request_id in cancels:
                self._finish(seq, None, None, cancelled=True)
        self._batch.keep(keep)

    def _prefill(self, admitted: list[_Sequence]) -> None:
        """Prefills the newcomers together, in one left-padded forward, and joins them.

        On this model a forward costs ~4 ms of Python before any arithmetic, so k newcomers in
        one forward instead of k saves (k - 1) of those per step (docs/benchmarks.md). If the
        batched forward fails, each newcomer is retried alone, so a bad one fails by itself.
        """
        if len(admitted) <= 1:
            self._prefill_each(admitted)
            return
        try:
            logits, cache, mask = self._prefill_batch([seq.prompt for seq in admitted])
            tokens = sample_next(
                logits, [s.params for s in admitted], [s.generator for s in admitted]
            )
        except Exception:
            log.exception("batched prefill of %d requests failed; one at a time", len(admitted))
            self._prefill_each(admitted)
            return
        rows = [
            i
            for i, (s, t) in enumerate(zip(admitted, tokens, strict=True))
            if not self._accept(s, t)
        ]
        if rows:
            self._batch.join_padded([admitted[i] for i in rows], layers_of(cache), mask, rows)

    def _prefill_batch(
        self, prompts: list[list[int]]
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """One forward over left-padded prompts: last-position logits, the cache, its mask."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        return self._forward(ids, mask, positions, cache), cache, mask

    def _prefill_each(self, admitted: list[_Sequence]) -> None:
        joined: list[_Sequence] = []
        caches: list[DynamicCache] = []
        for seq in admitted:
            cache = DynamicCache()
            try:
                ids = torch.tensor([seq.prompt], device=self.device)
                logits = self._forward(ids, None, None, cache)
                token = sample_next(logits, [seq.params], [seq.generator])[0]
            except Exception as exc:  # one bad request (or OOM) must not stop the engine
                log.exception("prefill failed for %s", seq.generation.request_id)
                self._fail(seq, f"prefill failed: {exc}")
                continue
            if not self._accept(seq, token):
                joined.append(seq)
                caches.append(cache)
        if joined:
            self._batch.join(joined, caches)

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch.kv.cache is not None
        # Each row feeds its last sampled token, which is not in the cache yet.
        ids = torch.tensor([[s.output[-1]] for s in batch.seqs], device=self.device)
        mask, positions = batch.kv.step_inputs()
        try:
            logits = self._forward(ids, mask, positions, batch.kv.cache)
            tokens = sample_next(
                logits, [s.params for s in batch.seqs], [s.generator for s in batch.seqs]
            )
        except Exception as exc:  # keep serving: fail this batch, not the process
            log.exception("decode step failed")
            for seq in batch.seqs:
                self._fail(seq, f"decode failed: {exc}")
            self._batch = _Batch()
            return
        batch.kv.advance(mask)
        with self._cond:
            self._stats.steps += 1
            self._stats.max_batch_seen = max(self._stats.max_batch_seen, len(batch.seqs))
        done = [self._accept(seq, token) for seq, token in zip(batch.seqs, tokens, strict=True)]
        if any(done):
            batch.keep([i for i, d in enumerate(done) if not d])

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """Logits of the last position of each row, [batch, vocab], as float32."""
        kwargs: dict[str, Any] = {self._cache_kwarg: cache, "use_cache": True}
        if self._keeps_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1, :].float()

    def _accept(self, seq: _Sequence, token: int) -> bool:
        """Records a sampled token and emits its text; True when the sequence has ended."""
        seq.output.append(token)
        count = len(seq.output)
        with self._cond:
            self._stats.tokens_generated += 1
        if token in self.eos_token_ids:
            return self._end(seq, "end_turn")
        safe, matched = seq.stopper.feed(seq.decoder.push(token))
        if safe:
            seq.generation._put(TextChunk(safe, count))
        if matched is not None:
            self._finish(seq, "stop_sequence", matched)
            return True
        if count >= seq.params.max_tokens or len(seq.prompt) + count >= self.max_context:
            return self._end(seq, "max_tokens")
        return False

    def _end(self, seq: _Sequence, reason: StopReason) -> bool:
        """Emits the text held back for an unfinished character or a possible stop sequence."""
        safe, matched = seq.stopper.feed(seq.decoder.flush())
        if matched is None:
            safe += seq.stopper.flush()
        if safe:
            seq.generation._put(TextChunk(safe, len(seq.output)))
        if matched is not None:
            self._finish(seq, "stop_sequence", matched)
        else:
            self._finish(seq, reason, None)
        return True

    def _finish(
        self,
        seq: _Sequence,
        reason: StopReason | None,
        stop: str | None,
        *,
        cancelled: bool = False,
    ) -> None:
        self._finals.append((seq, Finished(reason, stop, len(seq.output), cancelled)))

    def _fail(self, seq: _Sequence, message: str) -> None:
        self._finals.append((seq, Failed(message)))

    def _publish_finals(self) -> None:
        finals, self._finals = self._finals, []
        with self._cond:
            for seq, event in finals:
                self._live.pop(seq.generation.request_id, None)
                if isinstance(event, Failed):
                    self._stats.failed += 1
                elif event.cancelled:
                    self._stats.cancelled += 1
                else:
                    self._stats.finished += 1
        for seq, event in finals:
            seq.generation._put(event)
        self._notify()

    def _notify(self) -> None:
        if self.on_events is not None:
            self.on_events()


def _reserved(seqs: list[_Sequence]) -> int:
    """KV positions the batch may come to hold: rows x its longest reserve."""
    return len(seqs) * max((s.reserve for s in seqs), default=0)


def _ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, int)]
    return []
