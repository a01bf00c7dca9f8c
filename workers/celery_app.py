"""The Celery application of a worker process: threads pool feeding one engine per model."""

from celery import Celery

from workers.settings import WorkerSettings


def make_celery(settings: WorkerSettings) -> Celery:
    app = Celery("abl", broker=settings.require_redis_url(), include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Ack after the task ran, one job prefetched per free thread: a job is never
        # lost with a dying worker, and a redelivered one is refused by the claim.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_concurrency=settings.max_batch,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    return app


app = make_celery(WorkerSettings())
