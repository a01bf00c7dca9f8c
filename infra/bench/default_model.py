"""Figures of the default model (docs/default-model.md): start times, speed, memory, answers.

    python -m infra.bench.default_model [MODEL_DIR] [--requests 4] [--max-tokens 64]
        [--concurrency 1,4,16] [--answers]

Without MODEL_DIR the model is fetched and converted into the model cache first (the time that
takes is the first-start figure when the cache is empty). Prints JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from workers.engine_bench import bench_prompts, engine_run, rss_mb, sequential_generate

from contract.jobs import SamplingParams
from contract.rendering import PromptRenderer
from workers.backends.seam import Finished, Submission, TextChunk
from workers.backends.transformers.engine import TransformersEngine
from workers.backends.transformers.kv_batch import layers_of
from workers.engine_process import EngineProcess

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "What is the capital of Japan? Answer in one sentence.",
    "What color is a clear sky? Answer in one sentence.",
    "Write a Python function that returns the square of a number.",
]
# (temperature, top_p) pairs whose answers are printed with --answers.
SAMPLING = [(0.0, None), (0.3, 0.9), (0.7, 0.9), (1.0, None)]


def fetch_default(cache_dir: Path | None) -> tuple[Path, float]:
    """The converted default model (into the cache unless given one) and the seconds it took."""
    from workers.models.fetch import MACHINE_CACHE_DIR
    from workers.settings import WorkerSettings

    cache = cache_dir or WorkerSettings().model_cache_dir or MACHINE_CACHE_DIR
    data_dir = Path(tempfile.mkdtemp(prefix="abl-bench-"))  # its downloads folder too
    started = time.perf_counter()
    # A child process, as a first start runs it: its imports count, its memory goes away.
    argv = [sys.executable, "-m", "workers.models.fetch", "--cache-dir", str(cache)]
    dest = data_dir / "models" / "abliterated-model"
    env = {**os.environ, "ABL_DATA_DIR": str(data_dir)}
    out = subprocess.run([*argv, str(dest)], check=True, capture_output=True, text=True, env=env)
    return Path(out.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def child_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def warm_start(folder: Path) -> dict[str, Any]:
    """The worker's engine process from spawn to ready (imports, load), and its memory when
    ready and after 4 concurrent requests."""
    started = time.perf_counter()
    engine = EngineProcess.load(folder)
    ready = time.perf_counter() - started
    try:
        assert engine.pid is not None
        rss_ready = child_rss_mb(engine.pid)
        renderer = PromptRenderer.from_folder(folder)
        ids = renderer.encode(renderer.render(None, [("user", QUESTIONS[0])]))
        params = SamplingParams(max_tokens=32, temperature=0.0)
        for generation in [engine.submit(Submission(f"w{i}", ids, params)) for i in range(4)]:
            list(generation.events(120))
        rss_busy = child_rss_mb(engine.pid)
    finally:
        engine.stop()
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {
        "engine_process_ready_s": round(ready, 2),
        "engine_process_rss_mb_ready": round(rss_ready, 1),
        "engine_process_rss_mb_after_4_requests": round(rss_busy, 1),
        "from_pretrained_s": round(time.perf_counter() - started, 2),
    }


def measured_kv_bytes_per_token(engine: TransformersEngine) -> int:
    """Bytes a real prefill caches per token (checks TransformersEngine.kv_bytes_per_token)."""
    ids = bench_prompts(engine, 1)[0]
    cache = DynamicCache()
    with torch.inference_mode():
        engine.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    layers = layers_of(cache)
    return sum(keys.nbytes + values.nbytes for keys, values in layers) // len(ids)


def answers(engine: TransformersEngine, max_tokens: int) -> list[dict[str, Any]]:
    """Every question at every SAMPLING setting, all in one batch (sampling is not seeded)."""
    asked = []
    for temperature, top_p in SAMPLING:
        for i, question in enumerate(QUESTIONS):
            ids = engine.renderer.encode(engine.renderer.render(None, [("user", question)]))
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
            generation = engine.submit(Submission(f"a{temperature}-{top_p}-{i}", ids, params))
            asked.append((temperature, top_p, question, generation))
    out = []
    for temperature, top_p, question, generation in asked:
        events = list(generation.events(300))
        final = events[-1]
        out.append(
            {
                "temperature": temperature,
                "top_p": top_p,
                "question": question,
                "answer": "".join(e.text for e in events if isinstance(e, TextChunk)),
                "stop_reason": final.stop_reason if isinstance(final, Finished) else None,
            }
        )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {}
    folder = args.model
    if folder is None:
        folder, took = fetch_default(args.cache_dir)
        report["fetch_and_convert_s"] = round(took, 1)
    report["warm_start"] = warm_start(folder)
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = TransformersEngine.load(folder, max_batch=max(levels))
    try:
        report["threads"] = torch.get_num_threads()
        report["kv_bytes_per_token"] = engine.kv_bytes_per_token
        report["kv_bytes_per_token_measured"] = measured_kv_bytes_per_token(engine)
        report["kv_budget_tokens"] = engine.kv_budget_tokens
        prompts = bench_prompts(engine, max(args.requests, *levels, 2))
        engine_run(engine, prompts[:2], 8, 2)  # warm-up: first calls allocate
        if args.requests:
            report["sequential_generate"] = sequential_generate(
                engine, prompts[: args.requests], args.max_tokens
            )
        for level in levels:
            count = max(level, args.requests)
            result = engine_run(engine, prompts[:count], args.max_tokens, level)
            report[f"engine_c{level}"] = {"requests": count, **result}
        report["max_batch_seen"] = engine.stats.max_batch_seen
        # This process also loaded the model once more for from_pretrained_s above.
        report["bench_process_rss_mb"] = round(rss_mb(), 1)
        if args.answers:
            report["answers"] = answers(engine, args.answer_tokens)
    finally:
        engine.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument(
        "--requests",
        type=int,
        default=4,
        help="sequential requests (0: none), and the least per level",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--answers", action="store_true", help="print sampled answers too")
    parser.add_argument("--answer-tokens", type=int, default=96)
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
