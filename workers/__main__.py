"""`python -m workers`: load the engines, then run the Celery worker on their queues."""

import logging
import sys

from celery.signals import worker_shutting_down

from workers.celery_app import app
from workers.runtime import init_runtime
from workers.settings import WorkerSettings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = WorkerSettings()
    runtime = init_runtime(settings)

    @worker_shutting_down.connect(weak=False)
    def _on_shutdown(**_: object) -> None:
        # Celery stops taking jobs and waits for running ones; bound that wait.
        runtime.begin_shutdown(settings.shutdown_grace_s)

    queues = ",".join(runtime.catalog.get(m).queue for m in settings.models)  # type: ignore[union-attr]
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={settings.max_batch}",
                f"--queues={queues}",
                f"--hostname={settings.worker_name}@%h",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                *sys.argv[1:],
            ]
        )
    finally:
        runtime.stop()


if __name__ == "__main__":
    main()
