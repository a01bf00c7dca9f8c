"""Engine backends behind one seam (`workers.backends.seam.Backend`), chosen per model by the
catalogue's `backend` field. Each is imported only when a model asks for it: torch loads in the
engine's child process only, and only for a backend that needs it."""

from pathlib import Path

from contract.catalog import BackendName
from workers.backends.seam import Backend, BackendOptions


def create_backend(name: BackendName, model_path: Path, options: BackendOptions) -> Backend:
    """Loads the model at `model_path` into a new, not yet started, backend."""
    if name == "transformers":
        from workers.backends.transformers.engine import (
            DEFAULT_KV_BUDGET_BYTES,
            TransformersEngine,
        )

        return TransformersEngine(
            model_path,
            max_batch=options.max_batch,
            num_threads=options.num_threads,
            kv_budget_bytes=options.kv_budget_bytes or DEFAULT_KV_BUDGET_BYTES,
            prefill_chunk_tokens=options.prefill_chunk_tokens,
            background_reserve=options.reserve_rows(),
            prefix_cache_bytes=options.prefix_cache_bytes,
        )
    if name == "echo":
        from workers.backends.echo import EchoBackend

        return EchoBackend(options)
    raise ValueError(f"unknown backend {name!r}")
