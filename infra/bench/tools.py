"""The forced-tool-call phase of `abl bench`: grammar-constrained requests against plain ones.

At the highest concurrency of the run, the same clients send requests that must call a tool
(`tool_choice` `tool`), then the same requests without the grammar (`tool_phase`). Every forced
call is generated under its grammar: each decode step masks those rows' logits,
so this shows what the masks cost a full batch. Issue 14's target: forced calls run at >= 0.7x
the plain requests' output tokens per second (the masks must not serialize the batch). Each
call's streamed `partial_json` is checked against the tool's schema.
"""

import json
from collections.abc import Callable
from typing import Any

import jsonschema

from infra.bench.load import Target, message_body, run_async, run_clients
from infra.bench.stats import summarize

# What a forced call needs at least: its wrapper and arguments fit 128 tokens (grammars bound
# bytes, one token or more each).
MIN_TOOL_MAX_TOKENS = 128
TOOL: dict[str, Any] = {
    "name": "lookup_order",
    "description": "Looks up an order and what to do with it",
    "input_schema": {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "maxLength": 12},
            "action": {"enum": ["status", "cancel", "refund"]},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
            "note": {"type": "string", "maxLength": 40},
        },
        "required": ["order_id", "action"],
        "additionalProperties": False,
    },
}


def tool_phase(
    target: Target,
    model: str,
    prompt: str,
    concurrency: int,
    requests_per_client: int,
    max_tokens: int,
    on_done: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Forced tool calls, then the same requests without the grammar, at `concurrency`.

    The two differ only in the grammar: the plain requests carry the same tools in their prompt
    (`tool_choice` `none`) and ask for as many tokens as the forced calls produced on average,
    so prefill and output length weigh the same on both sides and the ratio is the grammar's
    cost. Plain requests without tools at `max_tokens` are measured too, for reference.
    """
    tokens = max(max_tokens, MIN_TOOL_MAX_TOKENS)
    forced_body = message_body(
        model, prompt, tokens, tools=[TOOL], tool_choice={"type": "tool", "name": TOOL["name"]}
    )
    forced, forced_wall = run_async(
        run_clients(target, forced_body, concurrency, requests_per_client, on_done)
    )
    forced_summary = summarize(forced, forced_wall)
    # A forced call's stream carries only input_json deltas: the record's text is the call's
    # arguments, which must be valid against the tool's schema.
    forced_summary["valid_calls"] = sum(1 for r in forced if r.ok and _valid(r.text))
    done = [r.tokens for r in forced if r.ok and r.tokens]
    matched_tokens = max(1, round(sum(done) / len(done))) if done else tokens
    matched_body = message_body(
        model, prompt, matched_tokens, tools=[TOOL], tool_choice={"type": "none"}
    )
    matched, matched_wall = run_async(
        run_clients(target, matched_body, concurrency, requests_per_client, on_done)
    )
    plain, plain_wall = run_async(
        run_clients(
            target, message_body(model, prompt, tokens), concurrency, requests_per_client, on_done
        )
    )
    matched_summary = summarize(matched, matched_wall)
    matched_rate = matched_summary["output_tokens_per_s"]
    forced_rate = forced_summary["output_tokens_per_s"]
    return {
        "concurrency": concurrency,
        "max_tokens": tokens,
        "matched_max_tokens": matched_tokens,
        "forced_tool": forced_summary,
        "plain_same_prompt": matched_summary,
        "plain_no_tools": summarize(plain, plain_wall),
        "forced_vs_plain": (
            round(forced_rate / matched_rate, 2)
            if matched_rate and forced_rate is not None
            else None
        ),
    }


def _valid(arguments: str) -> bool:
    try:
        jsonschema.validate(json.loads(arguments), TOOL["input_schema"])
    except (ValueError, jsonschema.ValidationError):
        return False
    return True
