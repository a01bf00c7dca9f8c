"""Everything one worker process owns: its engines, Redis, and the life of each request.

No thread waits on a request. Celery's consumer hands each job to `dispatch` (workers/dispatch.py)
and goes on; a few request threads claim it in Postgres and submit it to its engine; the delta
pump publishes its text step by step and hands over its terminal event; a request thread settles
the money, publishes the terminal event and acknowledges the message. So a worker can hold as
many requests in flight as its engines can batch, hundreds on a large GPU, with a fixed number
of threads.
"""

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal

import redis
from prometheus_client import REGISTRY

from contract.catalog import Catalog, ModelSpec, load_catalog
from contract.errors import API_ERROR, OVERLOADED, ErrorType
from contract.events import (
    BlockStartEvent,
    BlockStopEvent,
    ClaimedEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    WorkerEvent,
)
from contract.jobs import GenerateJob
from contract.keys import (
    CANCEL_CHANNEL,
    WORKER_REGISTRY,
    cancel_key,
    events_channel,
    heartbeat_key,
    lease_key,
)
from contract.prefix_routing import affinity_lane
from contract.queueing import (
    TAKE,
    batch_lane,
    interactive_lanes,
    queued_accounts_key,
    queued_jobs_key,
)
from contract.worker_registry import HEARTBEAT_SCRIPT, heartbeat_call
from db.batch_steps import settle_item
from db.ledger import Outcome, Settlement, claim_request, settle_request
from db.pricing import Prices
from db.session import in_autocommit, transaction
from workers.backends.seam import (
    Backend,
    BackendOptions,
    CacheUse,
    Constraint,
    Failed,
    Finished,
    Generation,
    Submission,
)
from workers.engine_process import EngineProcess
from workers.prefix_announce import PrefixAnnouncer
from workers.pump import DeltaPump
from workers.settings import WorkerSettings
from workers.shaping import AddToBlock, BlockOp, OpenBlock, shaper_for
from workers.sweeper import Sweeper
from workers.telemetry import EngineCollector, RequestTelemetry, serve_metrics

log = logging.getLogger("abl.worker")


@dataclass(frozen=True)
class Delivery:
    """How to tell the broker a job is done with: acknowledge it, or put it back for another
    worker. Either may be called from any thread (Celery runs it on its own loop)."""

    ack: Callable[[], None]
    requeue: Callable[[], None]


class Publisher:
    """Numbered events for one request, on its pub/sub channel."""

    def __init__(self, client: redis.Redis, request_id: str) -> None:
        self._client = client
        self._channel = events_channel(request_id)
        self.next_index = 0

    def claimed(
        self, worker: str, input_tokens: int, cache: CacheUse, via: "redis.client.Pipeline"
    ) -> None:
        event = ClaimedEvent(
            index=self.next_index,
            worker=worker,
            input_tokens=input_tokens,
            cache_read_input_tokens=cache.read_tokens,
            cache_creation_input_tokens=cache.write_tokens,
        )
        self._send(event, via)

    def block_op(self, op: BlockOp, output_tokens: int, via: "redis.client.Pipeline") -> None:
        """Queues one content-block operation on `via` (a pipeline the caller executes)."""
        index = self.next_index
        event: WorkerEvent
        if isinstance(op, OpenBlock):
            event = BlockStartEvent(
                index=index,
                block=op.block,
                block_type=op.block_type,
                tool_use_id=op.tool_use_id,
                tool_name=op.tool_name,
            )
        elif isinstance(op, AddToBlock):
            event = DeltaEvent(
                index=index, block=op.block, kind=op.kind, text=op.text, output_tokens=output_tokens
            )
        else:
            event = BlockStopEvent(index=index, block=op.block)
        self._send(event, via)

    def done(self, event_fields: dict[str, object]) -> None:
        self._send(DoneEvent(index=self.next_index, **event_fields))  # type: ignore[arg-type]

    def error(self, error_type: ErrorType, message: str) -> None:
        self._send(ErrorEvent(index=self.next_index, error_type=error_type, message=message))

    def _send(self, event: WorkerEvent, via: "redis.client.Pipeline | None" = None) -> None:
        (via if via is not None else self._client).publish(self._channel, event.model_dump_json())
        self.next_index += 1


class Recorder(Publisher):
    """A Message Batch request's events, kept for its stored result instead of published
    (nobody streams it): consecutive text of one block is joined."""

    def __init__(self, client: redis.Redis, request_id: str) -> None:
        super().__init__(client, request_id)
        self.events: list[WorkerEvent] = []

    def claimed(
        self, worker: str, input_tokens: int, cache: CacheUse, via: "redis.client.Pipeline"
    ) -> None:
        pass

    def _send(self, event: WorkerEvent, via: "redis.client.Pipeline | None" = None) -> None:
        last = self.events[-1] if self.events else None
        if (
            isinstance(event, DeltaEvent)
            and isinstance(last, DeltaEvent)
            and (last.block, last.kind) == (event.block, event.kind)
        ):
            self.events[-1] = last.model_copy(
                update={"text": last.text + event.text, "output_tokens": event.output_tokens}
            )
        else:
            self.events.append(event)
        self.next_index += 1

    def result(self, done: dict[str, object]) -> str:
        """The stored result of a succeeded request: its block events, then `done`."""
        final = DoneEvent(index=self.next_index, **done)  # type: ignore[arg-type]
        return json.dumps({"events": [e.model_dump(mode="json") for e in [*self.events, final]]})


class WorkerRuntime:
    def __init__(self, settings: WorkerSettings, engines: dict[str, Backend] | None = None) -> None:
        self.settings = settings
        self.catalog: Catalog = load_catalog(settings.models_file)
        self.redis = redis.Redis.from_url(settings.require_redis_url())
        self.database_url = settings.require_database_url()
        self.credit_price = Decimal(settings.credit_price_usd)
        # Given: tests run backends in this process. Otherwise start() loads one engine
        # process per model.
        self.engines: dict[str, Backend] = dict(engines or {})
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Claims and settlements block on Postgres; a few threads do them for every request.
        self._work = ThreadPoolExecutor(settings.request_threads, thread_name_prefix="request")
        # Jobs taken from the broker and not yet acknowledged; the condition wakes `drain`.
        self._in_flight = 0
        self._idle = threading.Condition()
        self._draining = False
        # Requests this process is running, and those it is aborting (shutdown, lost Redis).
        self._active: dict[str, str] = {}
        # What the prompt cache did for each running request (told in `claimed`, charged).
        self._cache_use: dict[str, CacheUse] = {}
        self._aborting: set[str] = set()
        # Cancellations, timed for `abl bench` (wall clock): when the cancel reached this
        # process, then when the engine's sequence had left the batch; the last 64 go out
        # with the heartbeat as `recent_cancels`.
        self._cancel_seen: dict[str, float] = {}
        self.recent_cancels: deque[dict[str, object]] = deque(maxlen=64)
        self._lease_ttl = max(1, round(settings.worker_lease_s))
        self.sweeper: Sweeper | None = None
        # One thread publishes every request's text, once per engine step (workers/pump.py).
        self.pump = DeltaPump(
            self.redis,
            muted=self._aborting.__contains__,
            on_publish_error=self._unpublishable,
            min_interval_s=settings.delta_interval_ms / 1000,
        )
        self.telemetry = RequestTelemetry(settings.worker_name)
        self.metrics_port: int | None = None
        self._take = self.redis.register_script(TAKE)
        self.announcer = PrefixAnnouncer(
            self.redis, settings.worker_name, settings.prefix_announce_ttl_s
        )
        self._collector = EngineCollector(self.engines)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        options = BackendOptions(
            max_batch=self.settings.max_batch,
            num_threads=self.settings.torch_threads,
            prefill_chunk_tokens=self.settings.prefill_chunk_tokens,
            prefix_cache_bytes=self.settings.prefix_cache_bytes,
        )
        for model_id in self.settings.models:
            if model_id in self.engines:
                continue
            spec = self._spec(model_id)
            path = spec.path(self.settings.models_dir)
            # In a child process: its stepping thread shares no GIL with this process's
            # per-request work (workers/engine_process.py, docs/benchmarks.md).
            engine = EngineProcess(
                path,
                backend=spec.backend,
                options=options,
                prepare=spec.id,
                on_exit=self._engine_exited,
            )
            if self.settings.prefix_cache_bytes:
                engine.on_prefix_change = self.announcer.watch(model_id, spec.queue)
            engine.start()
            self.engines[model_id] = engine
            log.info("model %s loaded from %s (%s)", model_id, path, spec.backend)
        for backend in self.engines.values():
            backend.on_events = self.pump.notify
            backend.start()
        self.pump.start()
        self.metrics_port = serve_metrics(self.settings, self._collector)
        for target in (self._heartbeat_loop, self._cancel_loop):
            thread = threading.Thread(target=target, daemon=True, name=target.__name__)
            thread.start()
            self._threads.append(thread)
        # After the heartbeat thread: the sweeper first frees this name's orphaned requests.
        self.sweeper = Sweeper(self.settings, self.redis)
        self.sweeper.start()

    def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
        self._stop.set()
        with contextlib.suppress(redis.RedisError), self.redis.pipeline() as pipe:
            pipe.zrem(WORKER_REGISTRY, self.settings.worker_name)
            pipe.delete(heartbeat_key(self.settings.worker_name))
            pipe.execute()
        for engine in self.engines.values():
            engine.stop()
        self.pump.stop()
        self._work.shutdown(wait=True)
        with contextlib.suppress(KeyError):  # never registered: start() was not reached
            REGISTRY.unregister(self._collector)

    def _engine_exited(self, code: int | None) -> None:
        """An engine process died (its requests have failed): stop taking jobs, and exit."""
        log.critical("an engine process exited (status %s); shutting this worker down", code)
        os.kill(os.getpid(), signal.SIGTERM)

    def _spec(self, model_id: str) -> ModelSpec:
        spec = self.catalog.get(model_id)
        if spec is None:
            raise RuntimeError(f"model {model_id!r} is not in the catalogue")
        return spec

    @property
    def queues(self) -> list[str]:
        """The broker queues this worker consumes: every lane of the models it serves."""
        lanes = self.settings.queue_lanes
        models = dict.fromkeys(self._spec(m).queue for m in self.settings.models)
        shared = [lane for queue in models for lane in interactive_lanes(queue, lanes)]
        shared += [batch_lane(queue) for queue in models]
        if not self.settings.prefix_cache_bytes:
            return shared
        # Its own lane first: jobs routed here for its prompt cache (contract/prefix_routing.py).
        return [affinity_lane(q, self.settings.worker_name) for q in models] + shared

    def prefetch(self, lane: str) -> int:
        """Jobs this worker takes from `lane` at once: the batch lane's leave the engine's
        reserve free for interactive requests."""
        if lane.endswith(".batch"):
            return self.settings.batch_prefetch
        return self.settings.in_flight_limit

    def _heartbeat_loop(self) -> None:
        beat = self.redis.register_script(HEARTBEAT_SCRIPT)
        # Three beats: one late or lost beat does not make a live worker look dead.
        lifetime_s = self.settings.heartbeat_s * 3
        next_refresh = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_refresh:
                self.announcer.refresh()
                next_refresh = time.monotonic() + self.announcer.ttl_s / 3
            payload = {
                "name": self.settings.worker_name,
                "models": list(self.engines),
                "active": sum(e.stats.active for e in self.engines.values()),
                "engines": {m: dataclasses.asdict(e.stats) for m, e in self.engines.items()},
                "recent_cancels": list(self.recent_cancels),
                "at": time.time(),
            }
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    call = heartbeat_call(self.settings.worker_name, payload, lifetime_s)
                    beat(client=pipe, **call)
                    for request_id in list(self._active):
                        pipe.set(
                            lease_key(request_id), self.settings.worker_name, ex=self._lease_ttl
                        )
                    pipe.execute()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(self.settings.heartbeat_s)

    def _cancel_loop(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        request_id = message["data"].decode()
                        if request_id in self._active:
                            self._cancel_seen[request_id] = time.time()
                        for engine in self.engines.values():
                            engine.cancel(request_id)
            except redis.RedisError as exc:
                log.warning("cancel listener reconnecting: %s", exc)
                self._stop.wait(1.0)

    # -- one request -----------------------------------------------------------------------
    def dispatch(self, job: GenerateJob, delivery: Delivery) -> None:
        """Takes a job from the broker; returns at once (called on Celery's consumer loop)."""
        with self._idle:
            if self._draining:
                delivery.requeue()  # another worker runs it
                return
            self._in_flight += 1
        self._work.submit(self._guarded, self._begin, job, delivery)

    def _guarded(self, step: Callable[..., None], job: GenerateJob, *args: object) -> None:
        """Runs one step of a request on a request thread; a bug in it must not strand the
        request's broker message (it is acknowledged: the sweeper settles the request)."""
        try:
            step(job, *args)
        except Exception:
            log.exception("request %s: %s failed", job.request_id, step.__name__)
            delivery = next(a for a in args if isinstance(a, Delivery))
            self._forget(job.request_id)
            self._done_with(delivery)

    def _begin(self, job: GenerateJob, delivery: Delivery) -> None:
        # The prefill runs while the claim commits; nothing is published unless it succeeds.
        early = self._submit_early(job)
        self._taken(job)
        try:
            claimed = in_autocommit(
                self.database_url,
                lambda conn: claim_request(conn, job.request_id, self.settings.worker_name),
            )
        except BaseException:
            self._drop_early(job, early)
            raise
        if not claimed:
            self._drop_early(job, early)
            log.info("request %s already claimed or settled; skipping", job.request_id)
            self._done_with(delivery)
            return
        self._active[job.request_id] = job.model
        cache = self._cache_use[job.request_id] = _cache_use(job, early)
        self.telemetry.claimed(job.request_id)
        publisher = (Recorder if job.batch_id else Publisher)(self.redis, job.request_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(lease_key(job.request_id), self.settings.worker_name, ex=self._lease_ttl)
            pipe.exists(cancel_key(job.request_id))
            publisher.claimed(self.settings.worker_name, len(job.input_ids), cache, pipe)
            cancelled = bool(pipe.execute()[1])
        if cancelled:
            self._drop_early(job, early)
            self._end(job, publisher, delivery, Finished(None, None, 0, cancelled=True))
            return
        try:
            generation = early or self.engines[job.model].submit(_submission(job))
        except ValueError as exc:  # a duplicate delivery of this request still runs here
            self._end(job, publisher, delivery, Failed(f"generation failed: {exc}"))
            return

        def ended(final: Finished | Failed) -> None:  # on the pump's thread
            self._work.submit(self._guarded, self._end, job, publisher, delivery, final)

        self.pump.watch(generation, publisher, ended, shaper_for(job))

    def _taken(self, job: GenerateJob) -> None:
        """Counts the job out of its account's share of the queue (api/taskqueue.py)."""
        if job.account_id is None or job.batch_id is not None:
            return
        queue = self._spec(job.model).queue
        keys = [queued_accounts_key(queue), queued_jobs_key(queue, job.account_id)]
        try:
            self._take(keys=keys, args=[job.request_id, job.account_id])
        except redis.RedisError as exc:  # the entry ages out of the share by itself
            log.warning("could not count %s out of its queue share: %s", job.request_id, exc)

    def _submit_early(self, job: GenerateJob) -> Generation | None:
        """Starts generating before the claim; None where the engine refuses the request
        (a redelivered task whose request still runs here) or serves no such model."""
        engine = self.engines.get(job.model)
        if engine is None:
            return None
        try:
            return engine.submit(_submission(job))
        except ValueError:
            return None

    def _drop_early(self, job: GenerateJob, early: Generation | None) -> None:
        if early is not None:
            self.engines[job.model].cancel(job.request_id)

    def _end(
        self,
        job: GenerateJob,
        publisher: Publisher,
        delivery: Delivery,
        final: Finished | Failed,
    ) -> None:
        if isinstance(final, Finished) and final.cancelled:
            self._note_cancelled(job.request_id)
        try:
            self._settle(job, self._spec(job.model), publisher, final)
        finally:
            self._forget(job.request_id)
            self._done_with(delivery)

    def _forget(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        self._cache_use.pop(request_id, None)
        self._aborting.discard(request_id)
        self._cancel_seen.pop(request_id, None)
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(lease_key(request_id))

    def _done_with(self, delivery: Delivery) -> None:
        delivery.ack()
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    def _note_cancelled(self, request_id: str) -> None:
        """The engine's terminal event says the sequence left the batch (its KV is freed)."""
        left = time.time()
        seen = self._cancel_seen.get(request_id)
        self.recent_cancels.append(
            {"request_id": request_id, "cancel_seen_at": seen, "left_batch_at": left}
        )
        if seen is not None:
            log.info("%s left the batch %.1f ms after its cancel", request_id, (left - seen) * 1e3)

    def abort(self, request_id: str) -> None:
        """Stop a request for the platform's own reasons: it fails and nothing is charged."""
        model = self._active.get(request_id)
        if model is not None:
            self._aborting.add(request_id)
            self.engines[model].cancel(request_id)

    def begin_shutdown(self, grace_s: float) -> None:
        """Take no more jobs; let running requests finish for `grace_s`, then abort the rest."""
        with self._idle:
            if self._draining:
                return
            self._draining = True

        def abort_rest() -> None:
            for request_id in list(self._active):
                log.warning("shutdown grace over: aborting %s", request_id)
                self.abort(request_id)

        timer = threading.Timer(grace_s, abort_rest)
        timer.daemon = True
        timer.start()

    def drain(self, timeout_s: float) -> bool:
        """Waits until every job taken has been acknowledged; False if `timeout_s` passed."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout_s)

    def _unpublishable(self, request_id: str) -> None:
        log.warning("cannot publish %s: Redis unreachable; aborting", request_id)
        self.abort(request_id)

    def _settle(
        self, job: GenerateJob, spec: ModelSpec, publisher: Publisher, final: Finished | Failed
    ) -> None:
        input_tokens = len(job.input_ids)
        cache = self._cache_use.get(job.request_id, CacheUse(0, 0))
        error_type: ErrorType = final.error_type if isinstance(final, Failed) else API_ERROR
        if isinstance(final, Finished) and final.cancelled and job.request_id in self._aborting:
            final = Failed(message="the worker stopped the request (shutdown or lost Redis)")
            error_type = OVERLOADED
        if isinstance(final, Failed):
            outcome = Outcome.unbilled("failed", final.message)
        else:
            outcome = Outcome(
                "cancelled" if final.cancelled else "succeeded",
                final.output_tokens,
                billable=True,
                stop_reason=None if final.cancelled else final.stop_reason,
                stop_sequence=final.stop_sequence,
                cache_read_tokens=cache.read_tokens,
                cache_write_tokens=cache.write_tokens,
            )
        # The charge comes from the prices stored on the request at admission; this worker's
        # catalogue prices only a request admitted before they were stored.
        legacy = Prices(
            spec.input_price_per_mtok,
            spec.output_price_per_mtok,
            self.credit_price,
            cache_read_multiplier=spec.cache_read_multiplier,
            cache_write_multiplier=spec.cache_write_multiplier,
        )
        if isinstance(publisher, Recorder):
            settlement = self._settle_item(job, publisher, outcome, legacy)
        else:
            settlement = in_autocommit(
                self.database_url,
                lambda conn: settle_request(conn, job.request_id, outcome, legacy_prices=legacy),
            )
        try:
            self._publish_end(publisher, settlement, outcome, input_tokens, error_type)
        except redis.RedisError:
            log.warning("cannot publish the end of %s: Redis unreachable", job.request_id)
        orphaned = self._orphaned(job.request_id, final, settlement)
        self.telemetry.settled(job, outcome, settlement, orphaned=orphaned)

    def _settle_item(
        self, job: GenerateJob, recorder: Recorder, outcome: Outcome, legacy: Prices
    ) -> Settlement:
        """A Message Batch request: settled, and its item ended with its stored answer, in
        one transaction (a failed one is left to the API's dispatcher to run again)."""

        def result(settlement: Settlement) -> str:
            return recorder.result(_done_fields(settlement, outcome, len(job.input_ids)))

        with transaction(self.database_url) as session:
            return settle_item(session, job.request_id, outcome, result, legacy_prices=legacy)

    def _orphaned(self, request_id: str, final: Finished | Failed, settlement: Settlement) -> bool:
        """Ran to its end for nobody: the client had cancelled, or the API had given up on it."""
        if not isinstance(final, Finished) or final.cancelled:
            return False
        if settlement.already_settled:
            return True
        try:
            return bool(self.redis.exists(cancel_key(request_id)))
        except redis.RedisError:
            return False

    @staticmethod
    def _publish_end(
        publisher: Publisher,
        settlement: Settlement,
        outcome: Outcome,
        input_tokens: int,
        error_type: ErrorType,
    ) -> None:
        if settlement.status == "failed":
            publisher.error(error_type, outcome.error or "generation failed")
            return
        publisher.done(_done_fields(settlement, outcome, input_tokens))


def _done_fields(settlement: Settlement, outcome: Outcome, input_tokens: int) -> dict[str, object]:
    return {
        "status": settlement.status,
        "stop_reason": outcome.stop_reason,
        "stop_sequence": outcome.stop_sequence,
        # Anthropic's input_tokens: the prompt tokens neither read from nor written to the
        # prompt cache.
        "input_tokens": input_tokens - outcome.cache_read_tokens - outcome.cache_write_tokens,
        "cache_read_input_tokens": outcome.cache_read_tokens,
        "cache_creation_input_tokens": outcome.cache_write_tokens,
        "output_tokens": outcome.output_tokens,
        "credits_charged": settlement.credits_charged,
        "remaining_credits": settlement.remaining_credits,
        "cost_usd": str(settlement.cost_usd),
    }


def _submission(job: GenerateJob) -> Submission:
    return Submission(
        job.request_id,
        job.input_ids,
        job.sampling,
        owner=job.account_id,
        constraint=constraint_of(job),
        background=job.batch_id is not None,
        cache_prefix_tokens=job.cache_prefix_tokens,
    )


def constraint_of(job: GenerateJob) -> Constraint | None:
    """The grammar the job's answer must follow: a forced tool call (tool_choice any/tool)
    comes first, then structured output; None for free text."""
    tools = job.tool_use
    if tools is not None and tools.choice in ("any", "tool") and tools.tools:
        schemas = {t.name: t.input_schema for t in tools.tools}
        return Constraint("tool_call", tools=schemas, name=tools.name)
    if job.output_schema is not None:
        return Constraint("json", schema=job.output_schema)
    return None


# How long a claim waits for the engine's prompt-cache answer (one message from the engine
# process, sent when it takes the submission; normally here before the claim's commit is).
CACHE_ANSWER_TIMEOUT_S = 5.0


def _cache_use(job: GenerateJob, early: Generation | None) -> CacheUse:
    """What the engine's prompt cache reads and writes for this request (nothing without a
    cacheable prefix, or where the engine has not said)."""
    if early is None or not job.cache_prefix_tokens:
        return CacheUse(0, 0)
    return early.wait_cache_use(CACHE_ANSWER_TIMEOUT_S) or CacheUse(0, 0)


_runtime: WorkerRuntime | None = None


def init_runtime(settings: WorkerSettings) -> WorkerRuntime:
    global _runtime
    _runtime = WorkerRuntime(settings)
    _runtime.start()
    return _runtime


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("worker runtime not started (run the worker with python -m workers)")
    return _runtime
