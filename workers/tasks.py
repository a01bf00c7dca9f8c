"""Celery tasks: thin, they hand the job to this process's runtime."""

from celery import shared_task

from contract.jobs import TASK_GENERATE, GenerateJob
from workers.runtime import get_runtime


@shared_task(name=TASK_GENERATE, ignore_result=True)
def generate(job: dict[str, object]) -> None:
    get_runtime().run(GenerateJob.model_validate(job))
