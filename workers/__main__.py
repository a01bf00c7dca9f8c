"""`python -m workers`: load the engines, then run the Celery worker on their queues."""

import logging
import sys

from workers.celery_app import app
from workers.runtime import init_runtime
from workers.settings import WorkerSettings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = WorkerSettings()
    runtime = init_runtime(settings)
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
