"""The batch dispatcher: moves Message Batch requests from Postgres to the workers' batch lanes.

Every API replica runs one (ABL_BATCH_DISPATCH); each pass, in short transactions:
1. requests whose worker died (or that never left the queue: still queued
   ABL_BATCH_LOST_AFTER_S after dispatch while no job waits in their lane, they are settled
   as failed first) go back to pending, up to
   ABL_BATCH_MAX_ATTEMPTS runs (`db.batch_steps.retry_orphans`): batch requests are retried,
   interactive ones are not;
2. batches past their expiry: pending requests end `expired`, running ones are stopped;
3. under an advisory lock (one dispatcher of all replicas at a time), up to
   ABL_BATCH_IN_FLIGHT_PER_MODEL requests per model in flight: pending ones are admitted like a
   Messages request (model, prompt, max_tokens, reservation at the batch price in force now, in
   the transaction that marks them dispatched; an account out of credit ends the request
   `errored` with a billing_error), then pushed onto the model's batch lane after the commit;
4. batches whose every request has ended end; ended batches past retention are archived.
Rows are locked with SKIP LOCKED, so replicas never dispatch a request twice; everything is in
Postgres, so a restart of any process loses nothing (a request committed as dispatched whose
push was lost never leaves the queue, and step 1 runs it again once the sweeper settles it).
"""

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool
from prometheus_client import Counter, Gauge
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.anthropic.admission import decide_max_tokens, open_admitted, resolve_model, tokenize
from api.anthropic.convert import conversation_of, sampling_params, thinking_budget, tool_use
from api.anthropic.protocol import MessagesRequest
from api.errors import (
    ApiError,
    InvalidRequestError,
    format_validation_errors,
)
from api.ids import new_message_id, new_request_id
from api.platform import Platform
from contract.catalog import ModelSpec
from contract.jobs import TASK_GENERATE, GenerateJob
from contract.queueing import batch_lane
from db import batch_steps as db
from db.ledger import NewRequest
from db.pricing import Prices
from db.session import transaction

log = logging.getLogger("abl.batches")

BATCH_REQUESTS = Gauge(
    "abl_batch_requests",
    "Message Batch requests not ended: pending (queued in Postgres) or dispatched (running)",
    ["status"],
)
BATCH_DISPATCHED = Counter(
    "abl_batch_dispatched_total", "Message Batch requests given to the workers", ["model"]
)
BATCH_ENDED_AT_DISPATCH = Counter(
    "abl_batch_errored_at_dispatch_total",
    "Message Batch requests that ended errored when their turn came (no credit, bad prompt)",
    ["error_type"],
)
BATCH_RETRIED = Counter(
    "abl_batch_retried_total", "Message Batch requests run again after their worker died"
)
BATCHES_ENDED = Counter("abl_batches_ended_total", "Message Batches that ended")


@dataclass
class Pass:
    """What one pass did, and the jobs it has still to push."""

    jobs: dict[str, list[GenerateJob]] = field(default_factory=lambda: defaultdict(list))
    stop: list[str] = field(default_factory=list)
    # Dispatched requests still queued after ABL_BATCH_LOST_AFTER_S, by their model's lane.
    stale: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    retried: int = 0
    ended: int = 0


class BatchDispatcher:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.settings = platform.settings

    async def run(self) -> None:
        """Passes until the process shuts down; a failing pass is logged and tried again."""
        while not self.platform.shutting_down.is_set():
            try:
                await self.run_once()
            except Exception:  # the database or Redis is away: the next pass retries
                log.exception("batch dispatch pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.platform.shutting_down.wait(), self.settings.batch_dispatch_interval_s
                )

    async def run_once(self) -> Pass:
        done = await run_in_threadpool(self._pass)
        for request_id in done.stop:
            await self.platform.cancel(request_id)
        for lane, request_ids in done.stale.items():
            if await self.platform.redis.llen(lane) == 0:  # their jobs are not waiting: lost
                for request_id in request_ids:
                    await self.platform.abandon(request_id, "its job was lost before a claim")
        for queue, jobs in done.jobs.items():
            await self.platform.tasks.push_many(
                TASK_GENERATE, [[j.model_dump(mode="json")] for j in jobs], queue=queue
            )
        return done

    def _pass(self) -> Pass:
        done = Pass()
        url = self.platform.database_url
        with transaction(url) as session:
            orphans = db.retry_orphans(session, self.settings.batch_max_attempts)
            done.retried = sum(1 for o in orphans if o.request_status == "failed")
        with transaction(url) as session:
            done.stop = db.expire_batches(session)
            lost_after = timedelta(seconds=self.settings.batch_lost_after_s)
            for request_id, model in db.queued_since(session, lost_after):
                spec = self.platform.catalog.get(model)
                if spec is not None:
                    done.stale[batch_lane(spec.queue)].append(request_id)
        with transaction(url) as session:
            if db.lock_dispatch(session):
                self._dispatch(session, done)
        with transaction(url) as session:
            done.ended = len(db.end_finished(session))
            db.archive_old(session, timedelta(seconds=self.settings.batch_retention_s))
            counts = db.open_items(session)
        BATCH_RETRIED.inc(done.retried)
        BATCHES_ENDED.inc(done.ended)
        for status in ("pending", "dispatched"):
            BATCH_REQUESTS.labels(status).set(counts.get(status, 0))
        return done

    def _dispatch(self, session: Session, done: Pass) -> None:
        cap = self.settings.batch_in_flight_per_model
        flying = db.in_flight(session)
        for item in db.take_pending(session, cap * 4):
            if flying.get(item.model, 0) >= cap:
                continue
            try:
                spec, job = self._admit(session, item)
            except ApiError as exc:
                db.mark_errored(session, item, exc.error_type, exc.message)
                BATCH_ENDED_AT_DISPATCH.labels(exc.error_type).inc()
                continue
            db.mark_dispatched(session, item, job.request_id)
            flying[item.model] = flying.get(item.model, 0) + 1
            done.jobs[batch_lane(spec.queue)].append(job)
            BATCH_DISPATCHED.labels(spec.id).inc()

    def _admit(self, session: Session, item: db.PendingItem) -> tuple[ModelSpec, GenerateJob]:
        """Like `admission.admit` for one batch request, at the batch price, without rate
        limits (batches have their own bound: the requests in flight per model)."""
        platform = self.platform
        try:
            body = MessagesRequest.model_validate(item.params)
        except ValidationError as exc:
            raise InvalidRequestError(format_validation_errors(exc.errors())) from None
        spec = resolve_model(platform, body.model)
        input_ids = tokenize(platform, spec, conversation_of(body))
        max_tokens = decide_max_tokens(platform, spec, body, len(input_ids))
        prices = Prices(
            spec.input_price_per_mtok,
            spec.output_price_per_mtok,
            platform.credit_price,
            batch_multiplier=spec.batch_price_multiplier,
            cache_read_multiplier=spec.cache_read_multiplier,
            cache_write_multiplier=spec.cache_write_multiplier,
        )
        reserve = prices.credits(len(input_ids), max_tokens)
        request_id = new_request_id()
        new = NewRequest(
            id=request_id,
            message_id=new_message_id(),
            account_id=item.account_id,
            api_key_id=item.api_key_id,
            model=spec.id,
            stream=False,
            max_tokens=max_tokens,
            input_tokens=len(input_ids),
            credits_reserved=reserve,
            prices=prices,
            batch_id=item.batch_id,
        )
        open_admitted(session, new)
        job = GenerateJob(
            request_id=request_id,
            model=spec.id,
            input_ids=input_ids,
            sampling=sampling_params(body, max_tokens),
            tool_use=tool_use(body),
            output_schema=body.output_format_schema(),
            thinking_budget=thinking_budget(body, max_tokens),
            account_id=item.account_id,
            batch_id=item.batch_id,
        )
        return spec, job
