"""The baselines, in the bench process: sequential `model.generate` and the engine alone.

Imports torch: only `abl bench` loads this module, never the launcher or the API.
"""

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.jobs import SamplingParams
from infra.bench.stats import RequestRecord
from workers.backends.seam import Failed, Finished, Submission, TextChunk
from workers.backends.transformers.engine import TransformersEngine
from workers.backends.transformers.reference import sequential_generate


class Baselines:
    """One in-process engine on the model the platform serves, fed the platform's prompt."""

    def __init__(
        self, model_path: Path, prompt: str, max_batch: int, num_threads: int | None
    ) -> None:
        # The worker's torch threads: the same engine policy, or the same explicit number.
        self.engine = TransformersEngine.load(
            Path(model_path), max_batch=max_batch, num_threads=num_threads
        )
        renderer = self.engine.renderer
        # Rendered and tokenized exactly as the API does for one user message, no system.
        self.prompt_ids: list[int] = renderer.encode(renderer.render(None, [("user", prompt)]))
        # next() on a count is atomic under the GIL: unique ids across client threads.
        self._ids = itertools.count(1)

    def close(self) -> None:
        self.engine.stop()

    def sequential(self, requests: int, max_tokens: int) -> dict[str, Any]:
        """`requests` greedy `model.generate` calls, one after another (baseline a)."""
        out = sequential_generate(self.engine, [self.prompt_ids] * requests, max_tokens)
        return {
            "requests": requests,
            "output_tokens": out["tokens"],
            "wall_s": out["seconds"],
            "output_tokens_per_s": out["tokens_per_s"],
            "requests_per_s": round(requests / out["seconds"], 2),
        }

    def generate_once(self, max_tokens: int) -> RequestRecord:
        """One greedy request through the engine; its text is the reference output."""
        return self._one(SamplingParams(max_tokens=max_tokens, temperature=0.0))

    def clients(
        self,
        concurrency: int,
        requests_per_client: int,
        max_tokens: int,
        on_done: Callable[[], None] | None = None,
    ) -> tuple[list[RequestRecord], float]:
        """The platform's load pattern against the engine alone (baseline b): `concurrency`
        threads, each submitting `requests_per_client` greedy requests back to back."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        records: list[RequestRecord] = []
        lock = threading.Lock()

        def one_client() -> None:
            for _ in range(requests_per_client):
                record = self._one(params)
                with lock:
                    records.append(record)
                if on_done is not None:
                    on_done()

        threads = [threading.Thread(target=one_client) for _ in range(concurrency)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return records, time.perf_counter() - start

    def _one(self, params: SamplingParams) -> RequestRecord:
        request_id = f"bench-{next(self._ids)}"
        record = RequestRecord(request_id=request_id)
        start = time.perf_counter()
        last = start
        generation = self.engine.submit(Submission(request_id, self.prompt_ids, params))
        for event in generation.events(timeout=300):
            now = time.perf_counter()
            if isinstance(event, TextChunk) and event.text:
                if record.ttft is None:
                    record.ttft = now - start
                else:
                    record.gaps.append(now - last)
                last = now
                record.text += event.text
            elif isinstance(event, Finished):
                record.tokens = event.output_tokens
                record.e2e = now - start
                record.ok = not event.cancelled
            elif isinstance(event, Failed):
                record.error = event.message
        return record
