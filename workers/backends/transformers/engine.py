"""The model engine: one model, continuous batching, streamed events per request.

One stepping thread owns the model. Each step it drops cancelled sequences, prefills newly
submitted ones (together, in one left-padded forward; a prompt longer than
`prefill_chunk_tokens` one chunk per step instead), then runs one batched forward for every
active sequence. A constrained sequence (forced tool call, structured output) has a grammar
matcher that masks its row's logits before sampling (`constrained`). The batch shares one
left-padded KV cache (`kv_batch`); sequences join and leave it between steps. No Celery or
Redis here: callers submit token ids and read events from the returned `Generation`. A worker
runs it in a child process of its own (`workers.engine_process`); tests and the benchmarks'
baselines run it in-process.
"""

import inspect
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from contract.errors import INVALID_REQUEST
from contract.jobs import SamplingParams
from contract.rendering import PromptRenderer
from workers.backends.seam import (
    CacheUse,
    EngineStats,
    Failed,
    Finished,
    Generation,
    StopReason,
    Submission,
    TextChunk,
)
from workers.backends.textstream import IncrementalDecoder, StopMatcher
from workers.backends.transformers.constrained import (
    BudgetTooSmall,
    GrammarError,
    Matcher,
    RowGrammars,
    accept,
)
from workers.backends.transformers.kv_batch import (
    KV,
    BatchCache,
    kv_bytes_per_token,
    layers_of,
    make_cache,
)
from workers.backends.transformers.prefix_cache import DEFAULT_BLOCK_TOKENS, Plan, PrefixCache
from workers.backends.transformers.sampling import make_generator, sample_next

log = logging.getLogger(__name__)

# Prompt tokens prefilled per step before the running batch gets its next decode step, so a
# burst of long prompts cannot stall everyone else's tokens for long.
PREFILL_TOKENS_PER_STEP = 4096
# A prompt longer than this is prefilled this many tokens per step (ABL_PREFILL_CHUNK_TOKENS),
# the running batch decoding between chunks: a 20k-token prompt does not stop everyone's tokens
# for the whole of its prefill. On 2 CPU cores a 512-token chunk late in a 16k prompt takes
# ~1.3 s (2048: ~5 s); a GPU does 2048 in milliseconds (docs/benchmarks.md).
DEFAULT_PREFILL_CHUNK_TOKENS = {"cpu": 512, "cuda": 2048}

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
    matcher: Matcher | None = None  # its output grammar, if constrained (constrained.py)
    background: bool = False  # a Message Batch request: after every other, never the reserve
    # Prompt cache: the blocks it reads (pinned until it ends) and will store.
    cache: Plan | None = None

    @property
    def cached(self) -> int:
        """Prompt tokens whose KV comes from the prompt cache (not prefilled)."""
        return self.cache.read_tokens if self.cache is not None else 0


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
        prefill_chunk_tokens: int | None = None,
        background_reserve: int = 0,
        prefix_cache_bytes: int = 0,
        prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS,
    ) -> None:
        self.model_path = Path(model_path)
        self.max_batch = max_batch
        # Rows a full batch may still take for owners with nothing running.
        self.hard_max_batch = max_batch + max(1, max_batch // 4)
        # Rows background requests leave free for interactive ones.
        self.background_rows = max(1, max_batch - background_reserve)
        self._interactive_at = -BACKGROUND_LINGER_S  # when an interactive request last ran
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        default_chunk = DEFAULT_PREFILL_CHUNK_TOKENS.get(self.device.type, 2048)
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens or default_chunk)
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
        self.prefix_cache = PrefixCache(
            prefix_cache_bytes, self.kv_bytes_per_token, prefix_block_tokens
        )
        params = inspect.signature(self.model.forward).parameters
        # transformers 5 renamed past_key_values to cache; accept either spelling.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params
        # Grammar masks of constrained rows (forced tool calls, structured output).
        self.grammars = RowGrammars(
            self.model_path, self.eos_token_ids, self.vocab_size, self.hard_max_batch
        )

        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._cancel: set[str] = set()
        self._live: dict[str, _Sequence] = {}  # waiting or active, by request id
        # Called on the stepping thread when new events are out (workers.pump.DeltaPump).
        self.on_events: Callable[[], None] | None = None
        self._batch = _Batch()
        # Long prompts being prefilled a chunk per step, in order; they join the batch after.
        self._prefilling: deque[PartialPrefill] = deque()
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
        self._prefilling.clear()
        self._publish_finals()
        self.grammars.close()

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
            # Constrained output is never cut by a stop sequence (docs/request-fields.md).
            stopper=StopMatcher([] if submission.constraint else sampling.stop_sequences),
            reserve=min(len(submission.input_ids) + sampling.max_tokens, self.max_context),
            owner=submission.owner or request_id,
            background=submission.background,
        )
        problem = self._check_prompt(seq.prompt)
        if problem is None and submission.constraint is not None:
            try:
                budget = min(sampling.max_tokens, self.max_context - len(seq.prompt))
                seq.matcher = self.grammars.matcher(submission.constraint, budget)
            except GrammarError as exc:
                why = f"max_tokens {sampling.max_tokens} is too small for the required output"
                if not isinstance(exc, BudgetTooSmall):
                    why = "the output constraint cannot be enforced"
                generation._put(Failed(f"{why}: {exc}", INVALID_REQUEST))
                return generation
        if problem is not None:
            generation._put(Failed(problem))
            return generation
        with self._cond:
            if request_id in self._live:
                raise ValueError(f"request {request_id} is already running")
            # Looked up now, so the worker can say what it found before anything is decoded.
            seq.cache = self.prefix_cache.plan(seq.prompt, submission.cache_prefix_tokens)
            generation._put(CacheUse(seq.cache.read_tokens, seq.cache.write_tokens))
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
                    "active": len(self._batch.seqs) + len(self._prefilling),
                    "waiting": len(self._waiting),
                    "kv_tokens": sum(self._batch.kv.lengths),
                    "kv_allocated_tokens": len(self._batch.kv) * self._batch.kv.width,
                    "kv_capacity_tokens": min(
                        self.kv_budget_tokens, self.max_batch * self.max_context
                    ),
                    "kv_reserved_tokens": _reserved(
                        [*self._batch.seqs, *(p.seq for p in self._prefilling)]
                    ),
                    "kv_budget_tokens": self.kv_budget_tokens,
                    "kv_bytes_per_token": self.kv_bytes_per_token,
                    **_prefix_stats(self.prefix_cache),
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
                    while self._running and not (
                        self._waiting or self._batch.seqs or self._cancel or self._prefilling
                    ):
                        self._cond.wait()
                    if not self._running:
                        return
                    cancels, self._cancel = self._cancel, set()
                    admitted = self._admit(cancels)
                    if not (admitted or self._batch.seqs or self._prefilling or cancels):
                        # Only background requests wait, for idle capacity: not a busy loop.
                        self._cond.wait(BACKGROUND_LINGER_S)
                        continue
                try:
                    self._step(cancels, admitted)
                except Exception as exc:  # a bug here must not leave every caller waiting forever
                    log.exception("engine step failed")
                    ended = {id(seq) for seq, _ in self._finals}
                    partial = [p.seq for p in self._prefilling]
                    for seq in {
                        id(s): s for s in [*self._batch.seqs, *admitted, *partial]
                    }.values():
                        if id(seq) not in ended:
                            self._fail(seq, f"engine error: {exc}")
                    self._batch = _Batch()
                    self._prefilling.clear()
                # After the batch is updated, so whoever sees a terminal event also sees the
                # sequence gone from `stats` and its KV memory released.
                self._publish_finals()

    def _step(self, cancels: set[str], admitted: list[_Sequence]) -> None:
        self._drop_cancelled(cancels)
        if self._finals:
            # Cancelled sequences are out of the batch already: say so before the forward passes.
            self._publish_finals()
        self._prefill(admitted)
        if self._prefilling:
            admitted += self._prefill_chunk()
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
        active = [*self._batch.seqs, *(p.seq for p in self._prefilling)]
        rows = len(active)
        width = max((s.reserve for s in active), default=0)
        running = Counter(s.owner for s in active)
        now = time.monotonic()
        interactive = any(not s.background for s in active)
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
            cost = min(len(seq.prompt) - seq.cached, self.prefill_chunk_tokens)  # its share now
            if admitted and cost > budget:
                break
            if rows and (rows + 1) * max(width, seq.reserve) > self.kv_budget_tokens:
                break
            self._waiting.remove(seq)
            budget -= cost
            admitted.append(seq)
            running[seq.owner] += 1
            rows, width = rows + 1, max(width, seq.reserve)
        return admitted

    def _drop_cancelled(self, cancels: set[str]) -> None:
        for partial in [p for p in self._prefilling if p.seq.generation.request_id in cancels]:
            self._prefilling.remove(partial)
            self._finish(partial.seq, None, None, cancelled=True)
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
        Prompts longer than a chunk are left to `_prefill_chunk`, one chunk per step.
        """
        chunked = [s for s in admitted if len(s.prompt) - s.cached > self.prefill_chunk_tokens]
        if chunked:
            self._prefilling += [self._partial(s) for s in chunked]
            long_ones = {id(s) for s in chunked}
            admitted = [s for s in admitted if id(s) not in long_ones]
        hits = [seq for seq in admitted if seq.cached]
        if hits:  # each starts from its own cached prefix: prefilled alone
            self._prefill_each(hits)
            admitted = [seq for seq in admitted if not seq.cached]
        if len(admitted) <= 1:
            self._prefill_each(admitted)
            return
        try:
            logits, cache, mask = self._prefill_batch([seq.prompt for seq in admitted])
            self.grammars.mask(logits, [s.matcher for s in admitted])
            tokens = sample_next(
                logits, [s.params for s in admitted], [s.generator for s in admitted]
            )
        except Exception:
            log.exception("batched prefill of %d requests failed; one at a time", len(admitted))
            self._prefill_each(admitted)
            return
        layers = layers_of(cache)
        for row, seq in enumerate(admitted):
            self._remember(seq, [(k[row : row + 1], v[row : row + 1]) for k, v in layers], mask)
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
            try:
                logits, cache = self._prefill_one(seq)
                self.grammars.mask(logits, [seq.matcher])
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

    def _partial(self, seq: _Sequence) -> "PartialPrefill":
        """A long prompt's chunked prefill, starting after its cached prefix (if any)."""
        if seq.cached and seq.cache is not None:
            layers = self.prefix_cache.kv(seq.cache)
            cache = make_cache([(k.to(self.device), v.to(self.device)) for k, v in layers])
            return PartialPrefill(seq, cache, seq.cached)
        return PartialPrefill(seq)

    def _prefill_chunk(self) -> list[_Sequence]:
        """Prefills the next chunk of the first long prompt; after its last chunk it samples
        the first token and joins the batch. Returns it then (its first token is out)."""
        partial = self._prefilling[0]
        seq = partial.seq
        start, end = partial.done, min(partial.done + self.prefill_chunk_tokens, len(seq.prompt))
        try:
            ids = torch.tensor([seq.prompt[start:end]], device=self.device)
            positions = torch.arange(start, end, device=self.device)[None, :]
            logits = self._forward(ids, None, positions, partial.cache)
            partial.done = end
            if end < len(seq.prompt):
                return []
            self._prefilling.popleft()
            self._remember(seq, layers_of(partial.cache), None)
            self.grammars.mask(logits, [seq.matcher])
            token = sample_next(logits, [seq.params], [seq.generator])[0]
        except Exception as exc:  # one bad request (or OOM) must not stop the engine
            log.exception("chunked prefill failed for %s", seq.generation.request_id)
            if self._prefilling and self._prefilling[0] is partial:
                self._prefilling.popleft()
            self._fail(seq, f"prefill failed: {exc}")
            return []
        if not self._accept(seq, token):
            self._batch.join([seq], [partial.cache])
        return [seq]

    def _prefill_one(self, seq: _Sequence) -> tuple[torch.Tensor, DynamicCache]:
        """Prefills one prompt after its cached prefix (if any); stores what it should."""
        start = seq.cached
        cache = DynamicCache()
        positions = None
        if start and seq.cache is not None:
            cache = make_cache(
                [(k.to(self.device), v.to(self.device)) for k, v in self.prefix_cache.kv(seq.cache)]
            )
            positions = torch.arange(start, len(seq.prompt), device=self.device)[None, :]
        ids = torch.tensor([seq.prompt[start:]], device=self.device)
        logits = self._forward(ids, None, positions, cache)
        self._remember(seq, layers_of(cache), None)
        return logits, cache

    def _remember(self, seq: _Sequence, layers: list[KV], mask: torch.Tensor | None) -> None:
        """Stores the blocks of the prompt's KV that the sequence's cache plan writes. `layers`
        hold one row; with `mask`, of a left-padded batch (the prompt ends at its end)."""
        if seq.cache is None or not seq.cache.write:
            return
        start = layers[0][0].shape[-2] - len(seq.prompt) if mask is not None else 0
        self.prefix_cache.store(seq.cache, layers, start)

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch.kv.cache is not None
        # Each row feeds its last sampled token, which is not in the cache yet.
        ids = torch.tensor([[s.output[-1]] for s in batch.seqs], device=self.device)
        mask, positions = batch.kv.step_inputs()
        self.grammars.start([s.matcher for s in batch.seqs])  # beside the forward
        try:
            logits = self._forward(ids, mask, positions, batch.kv.cache)
            self.grammars.apply(logits)
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
        refused = accept(seq.matcher, token) if seq.matcher is not None else None
        if refused is not None:
            self._fail(seq, refused)
            return True
        safe, matched = seq.stopper.feed(seq.decoder.push(token))
        if safe:
            seq.generation._put(TextChunk(safe, count))
        if matched is not None:
            self._finish(seq, "stop_sequence", matched)
            return True
        if seq.matcher is not None and seq.matcher.must_stop():
            return self._end(seq, "end_turn")  # the grammar is complete: nothing may follow
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
        for seq, _ in finals:
            if seq.cache is not None:  # its blocks may be evicted again
                self.prefix_cache.release(seq.cache)
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


@dataclass
class PartialPrefill:
    """A long prompt part way through its prefill: its own cache, and how far it has got."""

    seq: _Sequence
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0  # prompt tokens in `cache`


def _prefix_stats(cache: PrefixCache) -> dict[str, int]:
    stats = cache.stats()
    return {
        "prefix_lookups": stats.lookups,
        "prefix_hits": stats.hits,
        "prefix_read_tokens": stats.read_tokens,
        "prefix_stored_tokens": stats.stored_tokens,
        "prefix_evictions": stats.evictions,
        "prefix_bytes": stats.bytes,
        "prefix_budget_bytes": stats.budget_bytes,
    }


def _reserved(seqs: list[_Sequence]) -> int:
    """KV positions the batch may come to hold: rows x its longest reserve."""
    return len(seqs) * max((s.reserve for s in seqs), default=0)


def _ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, int)]
    return []
