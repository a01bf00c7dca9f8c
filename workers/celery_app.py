"""The Celery application of a worker process: Celery's consumer, with one consumer per lane.

Jobs never run on Celery's pool: `LaneConsumers` (workers/dispatch.py) hands each message to the
runtime, which acknowledges it once the request is settled. Celery's own task consumer needs a
queue; it is given `IDLE_QUEUE`, which nothing is sent to, and the `solo` pool idles.
"""

from celery import Celery

from workers.dispatch import Drain, LaneConsumers
from workers.settings import WorkerSettings

IDLE_QUEUE = "abl.idle"


def make_celery(settings: WorkerSettings) -> Celery:
    app = Celery("abl", broker=settings.require_redis_url())
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_pool="solo",
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    app.steps["consumer"].add(LaneConsumers)
    app.steps["worker"].add(Drain)
    return app


app = make_celery(WorkerSettings())
