"""What prompt safety costs: rendering and encoding a prompt with client text marked and kept out
of special tokens, against the template rendered and encoded as plain text (docs/request-fields.md).

    python -m infra.bench.prompt_safety MODEL_DIR [--chars 2000] [--rounds 20]

Both ways run interleaved in one process; prints the best time per prompt of each and the ratio.
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from contract.conversation import Conversation
from contract.rendering import PromptRenderer, compile_template

LINE = "def main(argv):\n    return sum(int(a) for a in argv)  # a line of code\n"


def best_of(run: Callable[[], object], rounds: int, repeat: int = 50) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeat):
            run()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--chars", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    renderer = PromptRenderer.from_folder(args.model_dir)
    text = (LINE * (args.chars // len(LINE) + 1))[: args.chars]
    conversation = Conversation.of_text("Be brief.", [("user", text)])
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    template = compile_template(renderer.chat_template)

    def plain() -> list[int]:
        rendered = template.render(
            messages=chat, add_generation_prompt=True, **renderer.special_tokens
        )
        return renderer.encode(rendered)

    def safe() -> list[int]:
        return renderer.prompt(conversation).ids

    assert plain() == safe(), "ordinary text must encode the same both ways"
    times = {"plain_ms": float("inf"), "safe_ms": float("inf")}
    for _ in range(args.rounds):  # interleaved, so both see the same load
        times["plain_ms"] = min(times["plain_ms"], best_of(plain, 1))
        times["safe_ms"] = min(times["safe_ms"], best_of(safe, 1))
    report = {k: round(v * 1000, 3) for k, v in times.items()}
    report["ratio"] = round(times["safe_ms"] / times["plain_ms"], 2)
    report["chars"] = args.chars
    print(json.dumps(report))


if __name__ == "__main__":
    main()
