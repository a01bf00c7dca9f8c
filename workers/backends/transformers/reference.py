"""Benchmark: sequential `model.generate` against the engine at concurrency N and 1 (greedy).

`python -m workers.backends.transformers.reference [MODEL_DIR] [--concurrency 16]
[--max-tokens 64]` prints JSON.
Without MODEL_DIR it builds the default model into a temporary folder first.
"""

import argparse
import itertools
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from contract.jobs import SamplingParams
from workers.backends.seam import Failed, Finished, Submission, TextChunk
from workers.backends.transformers.engine import TransformersEngine

TOPICS = ["the weather", "a file system", "sorting lists", "HTTP servers", "unicode", "time zones"]


def bench_prompts(engine: TransformersEngine, count: int) -> list[list[int]]:
    """`count` different chat prompts of different lengths."""
    prompts = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        text = f"Question {i}: tell me about {topic}. " * (1 + i % 4)
        prompts.append(engine.renderer.encode(engine.renderer.render(None, [("user", text)])))
    return prompts


def rss_mb() -> float:
    """Current resident memory of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sequential_generate(
    engine: TransformersEngine, prompts: list[list[int]], max_tokens: int
) -> dict[str, Any]:
    """Plain `generate`, one request after another: the baseline."""
    model = engine.model
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            inputs = torch.tensor([ids], device=engine.device)
            out = model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=engine.renderer.pad_token_id,
            )
            tokens += out.shape[1] - inputs.shape[1]
    elapsed = time.perf_counter() - start
    return {
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1),
    }


def _consume(
    engine: TransformersEngine, rid: str, ids: list[int], max_tokens: int, out: dict[str, Any]
) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    submitted = time.perf_counter()
    generation = engine.submit(Submission(rid, ids, params))
    stamps: list[float] = []
    for event in generation.events(timeout=120):
        stamps.append(time.perf_counter())
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        if isinstance(event, Finished):
            out[rid] = {
                "tokens": event.output_tokens,
                "ttft": stamps[0] - submitted,
                "gaps": [b - a for a, b in itertools.pairwise(stamps)],
            }
        assert isinstance(event, TextChunk | Finished)


def engine_run(
    engine: TransformersEngine, prompts: list[list[int]], max_tokens: int, concurrency: int
) -> dict[str, Any]:
    """All prompts through the engine, `concurrency` requests in flight at a time."""
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for offset in range(0, len(prompts), concurrency):
        threads = [
            threading.Thread(
                target=_consume, args=(engine, f"r{offset + i}", ids, max_tokens, results)
            )
            for i, ids in enumerate(prompts[offset : offset + concurrency])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elapsed = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results.values())
    ttfts = sorted(r["ttft"] * 1000 for r in results.values())
    gaps = sorted(g * 1000 for r in results.values() for g in r["gaps"])
    return {
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1),
        "ttft_ms_p50": round(statistics.median(ttfts), 1),
        "ttft_ms_max": round(ttfts[-1], 1),
        "itl_ms_p50": round(statistics.median(gaps), 2) if gaps else None,
    }


def run(model_path: Path, concurrency: int = 16, max_tokens: int = 64) -> dict[str, Any]:
    """Measures sequential generate, the engine at `concurrency`, and the engine at 1."""
    engine = TransformersEngine.load(Path(model_path), max_batch=max(concurrency, 1))
    try:
        prompts = bench_prompts(engine, concurrency)
        engine_run(engine, prompts[:2], 8, concurrency)  # warm-up: first calls allocate
        baseline = sequential_generate(engine, prompts, max_tokens)
        batched = engine_run(engine, prompts, max_tokens, concurrency)
        single = engine_run(engine, prompts, max_tokens, 1)
        return {
            "device": str(engine.device),
            "threads": torch.get_num_threads(),
            "requests": len(prompts),
            "max_tokens": max_tokens,
            "sequential_generate": baseline,
            f"engine_concurrency_{concurrency}": batched,
            "engine_concurrency_1": single,
            "speedup_vs_sequential": round(batched["tokens_per_s"] / baseline["tokens_per_s"], 2),
            "max_batch_seen": engine.stats.max_batch_seen,
            "rss_mb": round(rss_mb(), 1),
        }
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from workers.models.tiny import build_tiny_model

            model = build_tiny_model(Path(tmp) / "abl-tiny")
        print(json.dumps(run(model, args.concurrency, args.max_tokens), indent=2))


if __name__ == "__main__":
    main()
