"""Grammar-constrained decoding: every output is complete, valid JSON within max_tokens.

The proof runs the tiny random-weight model at temperature 1.0 in batches whose rows have
different grammars, as the engine will: 100 forced tool calls and 100 structured outputs.
"""

import inspect
import json
import random
from datetime import datetime, time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from contract.rendering import PromptRenderer
from contract.toolcalls import ToolCallEnd, ToolCallParser
from tests.unit.grammar_schemas import OUTPUTS, TOOLS
from workers.constraints.grammars import (
    GrammarSpec,
    structured_output_grammar,
    tool_call_grammar,
)
from workers.constraints.matcher import BatchMasks, GrammarCache, Matcher, TokenizerInfo
from workers.constraints.schema_grammar import BudgetTooSmall

MAX_TOKENS = 200
BATCH = 25
FORMATS = jsonschema.FormatChecker(formats=["date", "uuid", "ipv4"])
# jsonschema checks these two only with an optional package; Python's parser is strict enough.
FORMATS.checks("date-time", ValueError)(lambda v: bool(datetime.fromisoformat(v).tzinfo))
FORMATS.checks("time", ValueError)(lambda v: bool(time.fromisoformat(v).tzinfo))


def valid(value: object, schema: dict) -> bool:
    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=FORMATS)
    return validator.is_valid(value)


@pytest.fixture(scope="module")
def renderer(tiny_model_dir: Path) -> PromptRenderer:
    return PromptRenderer.from_folder(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path, renderer: PromptRenderer) -> TokenizerInfo:
    return TokenizerInfo.from_folder(tiny_model_dir, renderer.eos_token_ids, 8000)


@pytest.fixture(scope="module")
def cache(tokenizer: TokenizerInfo) -> GrammarCache:
    return GrammarCache(tokenizer)


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    matchers: list[Matcher],
    masks: BatchMasks,
    eos: set[int],
    seed: int,
) -> list[tuple[list[int], bool]]:
    """Samples each row at temperature 1.0 under its grammar, as the engine's batch does."""
    rows = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.zeros((rows, width), dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    kv = DynamicCache()
    generator = torch.Generator().manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for _ in range(MAX_TOKENS):
        logits = model(
            input_ids=ids, attention_mask=attention, position_ids=positions, **{cache_arg: kv}
        ).logits[:, -1, :]
        masks.start([None if done[r] else matchers[r] for r in range(rows)])
        masks.apply(logits)
        tokens = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0].tolist()
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            outputs[row].append(token)
            assert token in eos or matchers[row].accept(token), matchers[row].error
            done[row] = token in eos or matchers[row].must_stop()
        if all(done):
            break
        ids = torch.tensor(tokens)[:, None]
        attention = torch.cat([attention, torch.ones((rows, 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
    return [(out, finished) for out, finished in zip(outputs, done, strict=True)]


def request_specs() -> list[tuple[str, GrammarSpec, object]]:
    """100 forced tool calls (each tool by name, and `any`) and 100 structured outputs."""
    names = [*TOOLS, None]
    specs: list[tuple[str, GrammarSpec, object]] = []
    for i in range(100):
        name = names[i % len(names)]
        specs.append(("tool", tool_call_grammar(TOOLS, MAX_TOKENS, name=name), name))
        schema = OUTPUTS[i % len(OUTPUTS)]
        specs.append(("json", structured_output_grammar(schema, MAX_TOKENS), schema))
    return specs


def test_100_tool_calls_and_100_structured_outputs_are_valid_and_complete(
    tiny_model_dir: Path, renderer: PromptRenderer, tokenizer: TokenizerInfo, cache: GrammarCache
) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # Short prompts: what the random model reads does not matter to validity, and a long one
    # only slows the test (the tools prompt is tested in test_toolcalls).
    prompts = {
        "tool": renderer.encode(renderer.render("Call a tool.", [("user", "Plan my week.")])),
        "json": renderer.encode(renderer.render("Answer in JSON.", [("user", "Describe it.")])),
    }
    specs = request_specs()
    masks = BatchMasks(tokenizer, BATCH)
    eos = set(renderer.eos_token_ids)
    failures: list[str] = []
    counts = {"tool": 0, "json": 0}
    with torch.inference_mode():
        for start in range(0, len(specs), BATCH):
            batch = specs[start : start + BATCH]
            matchers = [cache.matcher(spec) for _, spec, _ in batch]
            results = generate(
                model, [prompts[k] for k, _, _ in batch], matchers, masks, eos, start
            )
            for (kind, spec, target), (ids, finished) in zip(batch, results, strict=True):
                text = renderer.decode([t for t in ids if t not in eos])
                counts[kind] += 1
                if not finished or len(ids) > MAX_TOKENS or len(text.encode()) > spec.max_bytes:
                    failures.append(f"unfinished or too long ({len(ids)} tokens): {text!r}")
                elif kind == "json" and not _valid_json(text, target):
                    failures.append(f"invalid structured output: {text!r}")
                elif kind == "tool" and not _valid_call(text, target):
                    failures.append(f"invalid tool call: {text!r}")
    masks.close()
    assert counts == {"tool": 100, "json": 100}
    assert not failures, f"{len(failures)} of 200 failed, e.g. {failures[:3]}"
    assert cache.misses == len(TOOLS) + 1 + len(OUTPUTS)  # each grammar compiled once


def _valid_json(text: str, schema: object) -> bool:
    try:
        return valid(json.loads(text), schema)  # type: ignore[arg-type]
    except ValueError:
        return False


def _valid_call(text: str, name: str | None) -> bool:
    parser = ToolCallParser(TOOLS)
    events = parser.feed(text) + parser.finish()
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    if len(ends) != 1 or len(events) != 3 or not ends[0].complete:
        return False
    call = ends[0]
    return (name is None or call.name == name) and valid(call.input, TOOLS[call.name])


@pytest.mark.parametrize("budget", [60, 200, 1000])
def test_random_walks_over_the_mask_always_end_valid(
    tokenizer: TokenizerInfo, cache: GrammarCache, budget: int
) -> None:
    """Uniform choice among allowed tokens (EOS included when allowed): 40 walks per grammar."""
    rng = random.Random(budget)
    eos = set(tokenizer.tokenizer.eos_tokens)
    cases: list[tuple[GrammarSpec, object]] = []
    for schema in OUTPUTS:
        try:
            cases.append((structured_output_grammar(schema, budget), schema))
        except BudgetTooSmall:
            assert budget == 60
    assert cases
    for spec, schema in cases:
        for _ in range(40):
            matcher = cache.matcher(spec)
            out: list[int] = []
            while True:
                bits = np.frombuffer(matcher.inner.compute_bitmask(), dtype=np.uint8)
                allowed = np.flatnonzero(np.unpackbits(bits, bitorder="little"))
                token = int(rng.choice(list(allowed)))
                if token in eos:
                    break
                assert matcher.accept(token), matcher.error
                out.append(token)
                if matcher.must_stop():
                    break
            assert len(out) < budget
            text = tokenizer.tokenizer.decode_bytes(out).decode()
            assert len(text.encode()) <= spec.max_bytes <= budget - 1
            assert valid(json.loads(text), schema), text


def test_rows_without_a_grammar_keep_their_logits(
    tokenizer: TokenizerInfo, cache: GrammarCache
) -> None:
    spec = structured_output_grammar({"type": "boolean"}, 50)
    matchers: list[Matcher | None] = [None, cache.matcher(spec), None]
    logits = torch.randn(3, 8000)
    before = logits.clone()
    masks = BatchMasks(tokenizer, 4)
    masks.compute(matchers)
    masks.apply(logits)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero()[:, 0].tolist()
    texts = {tokenizer.tokenizer.decode_str([t]) for t in allowed}
    assert texts and all("true".startswith(t) or "false".startswith(t) for t in texts)


def test_logits_wider_than_the_vocabulary_never_allow_the_extra_ids(
    tiny_model_dir: Path, renderer: PromptRenderer
) -> None:
    wide = TokenizerInfo.from_folder(tiny_model_dir, renderer.eos_token_ids, 8064)
    spec = structured_output_grammar({"type": "string", "maxLength": 3}, 50)
    masks = BatchMasks(wide, 1)
    logits = torch.zeros(1, 8064)
    masks.compute([GrammarCache(wide).matcher(spec)])
    masks.apply(logits)
    assert torch.isinf(logits[0, 8000:]).all()
    assert torch.isfinite(logits[0, :8000]).any()


def test_a_budget_smaller_than_the_smallest_output_is_refused() -> None:
    with pytest.raises(BudgetTooSmall) as refused:
        tool_call_grammar(TOOLS, 40, name="create_event")
    assert refused.value.needed > refused.value.budget
    with pytest.raises(BudgetTooSmall):
        structured_output_grammar({"type": "string", "minLength": 100}, 200)
