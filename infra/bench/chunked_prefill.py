"""Benchmark: what a long prompt's prefill does to a request decoding beside it.

`python -m infra.bench.chunked_prefill [--prompt-tokens 16000] [--chunks 512,2048,0]` builds the
tiny model, and for each chunk size (0: no chunking) starts a short request decoding, submits
one long prompt, and prints JSON: when the long prompt's first token came, the longest gap
between the short request's tokens, and how many tokens it got during the long prefill.
"""

import argparse
import itertools
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from contract.jobs import SamplingParams
from workers.backends.seam import Submission, TextChunk
from workers.backends.transformers.engine import TransformersEngine
from workers.models.tiny import build_tiny_model


def measure(model_dir: Path, prompt_tokens: int, chunk: int) -> dict[str, Any]:
    engine = TransformersEngine.load(
        model_dir,
        max_batch=4,
        max_context=prompt_tokens + 512,
        prefill_chunk_tokens=chunk or 1 << 30,
    )
    try:
        short_ids = engine.renderer.encode(engine.renderer.render(None, [("user", "Hi")]))
        greedy = SamplingParams(max_tokens=400, temperature=0)
        short = engine.submit(Submission("short", short_ids, greedy))
        times: list[float] = []

        def read() -> None:
            for _ in short.events(timeout=600):
                times.append(time.perf_counter())

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.3)  # the short request is decoding
        long_ids = (short_ids * (prompt_tokens // len(short_ids) + 1))[:prompt_tokens]
        started = time.perf_counter()
        long = engine.submit(Submission("long", long_ids, SamplingParams(max_tokens=4)))
        first = None
        for event in long.events(timeout=600):
            if first is None and isinstance(event, TextChunk):
                first = time.perf_counter()
        reader.join()
    finally:
        engine.stop()
    assert first is not None
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {
        "chunk_tokens": chunk or None,
        "prompt_tokens": prompt_tokens,
        "long_first_token_s": round(first - started, 2),
        "short_max_gap_ms": round(max(gaps) * 1000),
        "short_tokens_during_long_prefill": sum(1 for t in times if started <= t <= first),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=16000)
    parser.add_argument("--chunks", default="512,2048,0", help="chunk sizes; 0: no chunking")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "model")
        for chunk in (int(c) for c in args.chunks.split(",")):
            print(json.dumps(measure(folder, args.prompt_tokens, chunk)))


if __name__ == "__main__":
    main()
