"""`python -m workers`: load the engines, then run the Celery worker on their queues."""

import logging
import sys

from celery.signals import worker_shutting_down

from workers.celery_app import IDLE_QUEUE, app
from workers.runtime import init_runtime
from workers.settings import WorkerSettings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = WorkerSettings()
    runtime = init_runtime(settings)

    @worker_shutting_down.connect(weak=False)
    def _on_shutdown(**_: object) -> None:
        # Take no more jobs; the running ones get the shutdown grace (workers/dispatch.Drain).
        runtime.begin_shutdown(settings.shutdown_grace_s)

    try:
        app.worker_main(
            [
                "worker",
                "--pool=solo",
                # The jobs come through LaneConsumers (workers/dispatch.py), not this queue.
                f"--queues={IDLE_QUEUE}",
                f"--hostname={settings.worker_name}@%h",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                *sys.argv[1:],
            ]
        )
    finally:
        runtime.stop()


if __name__ == "__main__":
    main()
