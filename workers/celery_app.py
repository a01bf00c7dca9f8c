"""The Celery application of a worker process: one consumer, no pool work, one task.

The task `abl.generate` never runs on Celery's pool: its strategy (workers/dispatch.py) hands
each message to the runtime, which acknowledges it once the request is settled. The pool is
`solo` and idle; the consumer's prefetch count bounds the jobs in flight.
"""

from celery import Celery, Task

from contract.jobs import TASK_GENERATE
from workers.dispatch import Drain
from workers.settings import WorkerSettings


class GenerateTask(Task):
    name = TASK_GENERATE
    Strategy = "workers.dispatch:strategy"
    ignore_result = True
    acks_late = True

    def run(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{TASK_GENERATE} runs through its strategy, never on the pool")


def make_celery(settings: WorkerSettings) -> Celery:
    app = Celery("abl", broker=settings.require_redis_url())
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Unacknowledged messages are the jobs in flight: the solo pool counts as one process.
        worker_prefetch_multiplier=settings.in_flight_limit,
        worker_pool="solo",
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    app.register_task(GenerateTask())
    app.steps["worker"].add(Drain)
    return app


app = make_celery(WorkerSettings())
