"""The contract between the API and the workers: torch-free, imported by both, importing neither.

- `jobs`: the Celery task name and the job a worker runs (`GenerateJob`, `SamplingParams`).
- `events`: what a worker publishes for a request on Redis pub/sub (`WorkerEvent`).
- `keys`: every Redis key and channel name the two sides share.
- `catalog`: the models (`ModelSpec`), their folders, limits and prices.
- `rendering`: chat template + tokenizer from a model folder; the API counts exactly the ids a
  worker will decode.
- `errors`: the Anthropic error types a worker may report.
- `settings`: the `ABL_*` settings every process reads (`CoreSettings`).
- `logs`: the one-JSON-line-per-request log format both sides write.

`tests/unit/test_layout.py` enforces the boundary: `api` never imports `workers`, `workers` never
imports `api`, this package imports neither (nor `db`), and no import cycle exists anywhere.
"""
