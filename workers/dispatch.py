"""How Celery hands jobs to the runtime without a thread per job.

Celery runs each task message through its task's *strategy* on the consumer's event loop; the
default one queues a request for the pool, whose thread would then block for the whole
generation. `abl.generate` names this module's strategy instead: it decodes the job and gives
it to `WorkerRuntime.dispatch`, with the message's acknowledgement, and returns at once. The
runtime acknowledges the message when the request is settled (late acknowledgement, as
`task_acks_late` would), from whichever thread settles it: Celery's `ack` promise runs the
acknowledgement on the consumer's loop. How many messages a worker takes at once is the
consumer's prefetch count (`ABL_MAX_IN_FLIGHT`), because unacknowledged messages count against
it. A worker that dies with messages unacknowledged has them redelivered by the broker after the
visibility timeout; the claim in Postgres makes the redelivery of a request that already ran
(or was settled) a no-op.

`Drain` makes a warm shutdown wait for the jobs in flight (bounded by the shutdown grace) before
the event loop closes, so their acknowledgements still go out.
"""

import logging
from typing import Any

from celery import bootsteps
from kombu.message import Message

from contract.jobs import GenerateJob
from workers.runtime import Delivery, get_runtime

log = logging.getLogger("abl.worker")


def strategy(task: Any, app: Any, consumer: Any, **_: Any) -> Any:
    """Celery's hook: returns the handler of every `abl.generate` message."""
    runtime = get_runtime()
    errors = consumer.connection_errors

    def on_message(message: Message, payload: Any, ack: Any, reject: Any, *_: Any) -> None:
        args, _kwargs, _embed = message.decode()
        job = GenerateJob.model_validate(args[0])
        runtime.dispatch(
            job,
            Delivery(
                ack=lambda: ack(log, errors),
                requeue=lambda: reject(log, errors, requeue=True),
            ),
        )

    return on_message


class Drain(bootsteps.StartStopStep):
    """On a warm shutdown, after the consumer stopped and before the event loop closes, wait
    for the jobs in flight to be settled (the runtime aborts what outlives the grace)."""

    requires = ("celery.worker.components:Hub",)

    def stop(self, parent: Any) -> None:
        runtime = get_runtime()
        grace_s = runtime.settings.shutdown_grace_s
        runtime.begin_shutdown(grace_s)  # a no-op when the shutdown signal already began it
        # After the grace, aborted requests still settle: allow them a little more.
        if not runtime.drain(grace_s + 30):
            log.warning("requests still in flight after the shutdown grace; leaving them")
