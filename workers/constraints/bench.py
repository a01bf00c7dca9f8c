"""Benchmark: the cost of grammar masks for a batch, next to a forward step of the model.

`python -m workers.constraints.bench [MODEL_DIR] [--rows 16] [--steps 60]` prints JSON: per
decode step, the model's forward (batch `rows`, one new token each), computing the masks of
`rows` forced tool calls, applying them to the logits, and the masks computed on the helper
thread while the forward runs (what the engine would do). Without MODEL_DIR it builds the
default model into a temporary folder.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from contract.rendering import PromptRenderer
from workers.constraints.grammars import tool_call_grammar
from workers.constraints.matcher import BatchMasks, GrammarCache, TokenizerInfo

TOOL = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "content": {"type": "string"},
        "mode": {"enum": ["write", "append"]},
        "lines": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    },
    "required": ["path", "content"],
    "additionalProperties": False,
}


def measure(model_dir: Path, rows: int, steps: int, max_tokens: int) -> dict[str, Any]:
    renderer = PromptRenderer.from_folder(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = int(model.config.get_text_config().vocab_size)
    tokenizer = TokenizerInfo.from_folder(model_dir, renderer.eos_token_ids, width)
    spec = tool_call_grammar({"write_file": TOOL}, max_tokens)
    cache = GrammarCache(tokenizer)
    started = time.perf_counter()
    cache.matcher(spec)
    compile_ms = (time.perf_counter() - started) * 1000
    matchers = [cache.matcher(spec) for _ in range(rows)]
    masks = BatchMasks(tokenizer, rows)
    prompt = renderer.encode(renderer.render(None, [("user", "Write the file.")]))
    ids = torch.tensor([prompt] * rows)
    kv = DynamicCache()
    timings: dict[str, list[float]] = {"forward": [], "masks": [], "apply": [], "overlapped": []}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        logits = model(input_ids=ids, past_key_values=kv).logits[:, -1, :]
        for _ in range(steps):
            t0 = time.perf_counter()
            masks.compute(matchers)
            t1 = time.perf_counter()
            masks.apply(logits)
            t2 = time.perf_counter()
            tokens = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            for matcher, token in zip(matchers, tokens.tolist(), strict=True):
                if not matcher.must_stop():
                    matcher.accept(token)
            t3 = time.perf_counter()
            masks.start(matchers)  # the next step's masks, beside the forward
            logits = model(input_ids=tokens[:, None], past_key_values=kv).logits[:, -1, :]
            t4 = time.perf_counter()
            masks.apply(logits.clone())  # waits for the masks if the forward was quicker
            t5 = time.perf_counter()
            timings["masks"].append(t1 - t0)
            timings["apply"].append(t2 - t1)
            timings["forward"].append(t4 - t3)
            timings["overlapped"].append(t5 - t4)
    masks.close()
    result = {k: round(statistics.median(v) * 1000, 3) for k, v in timings.items()}
    return {
        "model": str(model_dir),
        "vocab": width,
        "rows": rows,
        "steps": steps,
        "grammar_compile_ms": round(compile_ms, 2),
        "median_ms_per_step": result,
        "mask_share_of_step": round(
            (result["masks"] + result["apply"]) / (result["forward"] or 1), 4
        ),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (engine: cores-1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model_dir is None:
        from workers.models.tiny import build_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            folder = build_tiny_model(Path(tmp) / "model")
            print(json.dumps(measure(folder, args.rows, args.steps, args.max_tokens), indent=2))
        return
    print(json.dumps(measure(args.model_dir, args.rows, args.steps, args.max_tokens), indent=2))


if __name__ == "__main__":
    main()
