"""How the worker takes jobs from the broker: one consumer per lane, no thread per job.

Celery's consumer runs this step (`LaneConsumers`) beside its own: for every lane of the models
this worker serves (contract/queueing.py) a kombu consumer on a channel of its own, so each lane
has its own prefetch count. A flooding account fills its own lane's count; another account's
lane still has room, so its job reaches this worker at once, and the engine's admission, fair
between accounts, takes it into the batch at the next step (docs/architecture.md, "Queueing").

Each message is decoded on the consumer's event loop and given to `WorkerRuntime.dispatch`,
which returns at once; the runtime acknowledges the message when the request is settled (late
acknowledgement, as `task_acks_late` does), from whichever thread settles it: the
acknowledgement itself runs on the event loop (`call_soon_ack`). Unacknowledged messages count
against their lane's prefetch; a worker that dies with messages unacknowledged has them
redelivered by the broker after the visibility timeout, and the claim in Postgres makes the
redelivery of a request that already ran (or was settled) a no-op.

`Drain` makes a warm shutdown wait for the jobs in flight (bounded by the shutdown grace) before
the event loop closes, so their acknowledgements still go out.
"""

import contextlib
import logging
from functools import partial
from typing import Any

from celery import bootsteps
from kombu import Consumer, Queue
from kombu.message import Message

from contract.jobs import TASK_GENERATE, GenerateJob
from workers.runtime import Delivery, WorkerRuntime, get_runtime

log = logging.getLogger("abl.worker")


class LaneConsumers(bootsteps.StartStopStep):
    """A consumer per lane, each with its own channel and prefetch count."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.consumers: list[Consumer] = []

    def start(self, parent: Any) -> None:
        runtime = get_runtime()
        for lane in runtime.queues:
            consumer = Consumer(
                parent.connection.channel(),
                queues=[Queue(lane, routing_key=lane)],
                callbacks=[partial(_on_message, parent, runtime)],
                accept=["json"],
                prefetch_count=runtime.prefetch(lane),
            )
            consumer.consume()
            self.consumers.append(consumer)

    def stop(self, parent: Any) -> None:
        for consumer in self.consumers:
            with contextlib.suppress(Exception):  # the connection may be gone already
                consumer.cancel()

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
        for consumer in self.consumers:
            with contextlib.suppress(Exception):
                consumer.channel.close()  # type: ignore[attr-defined]
        self.consumers = []


def _on_message(parent: Any, runtime: WorkerRuntime, body: Any, message: Message) -> None:
    ack = partial(parent.call_soon_ack, message.ack)
    if message.headers.get("task") != TASK_GENERATE:
        log.error("dropping a message for task %r", message.headers.get("task"))
        ack()
        return
    args, _kwargs, _embed = body
    runtime.dispatch(
        GenerateJob.model_validate(args[0]),
        Delivery(ack=ack, requeue=partial(parent.call_soon_ack, message.reject, requeue=True)),
    )


class Drain(bootsteps.StartStopStep):
    """On a warm shutdown, after the consumers stopped and before the event loop closes, wait
    for the jobs in flight to be settled (the runtime aborts what outlives the grace)."""

    requires = ("celery.worker.components:Hub",)

    def stop(self, parent: Any) -> None:
        runtime = get_runtime()
        grace_s = runtime.settings.shutdown_grace_s
        runtime.begin_shutdown(grace_s)  # a no-op when the shutdown signal already began it
        # After the grace, aborted requests still settle: allow them a little more.
        if not runtime.drain(grace_s + 30):
            log.warning("requests still in flight after the shutdown grace; leaving them")
