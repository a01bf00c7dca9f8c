"""The grammars a request needs: structured output, and forced tool calls.

Budgets are in tokens (`max_tokens`, or what the context window leaves if less): the grammar's
longest output is kept within `budget - 1` bytes, which leaves the last token for the
end-of-sequence token (see `schema_grammar` for why bytes bound tokens).
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from contract.toolcalls import CALL_SUFFIX, call_prefix
from workers.constraints.schema_grammar import (
    BudgetTooSmall,
    GrammarError,
    LarkRules,
    SchemaCompiler,
    lark_string,
    quantize,
)


@dataclass(frozen=True)
class GrammarSpec:
    """A compiled-to-Lark grammar, the most bytes it generates, and its cache key."""

    lark: str
    max_bytes: int
    key: str


def byte_budget(max_tokens: int) -> int:
    """The grammar's byte budget for `max_tokens`: one token is kept for end-of-sequence."""
    return quantize(max(0, max_tokens - 1))


def structured_output_grammar(schema: Mapping[str, Any] | bool, max_tokens: int) -> GrammarSpec:
    """The grammar of a JSON value valid under `schema` (`output_config.format`)."""
    budget = byte_budget(max_tokens)
    rules = LarkRules()
    piece = SchemaCompiler(schema, rules).compile(budget)
    return GrammarSpec(rules.text(piece.lark), piece.max_bytes, _key("json", schema, budget))


def tool_call_grammar(
    tools: Mapping[str, Mapping[str, Any]], max_tokens: int, *, name: str | None = None
) -> GrammarSpec:
    """Exactly one call: to tool `name` (`tool_choice` tool), or to any of `tools` (`any`).

    `tools` maps each tool's name to its input_schema. A forced call is always a single call,
    whatever `disable_parallel_tool_use` says: the budget goes to that call's arguments.
    Tools whose smallest call does not fit the budget are left out; none fitting is an error.
    """
    budget = byte_budget(max_tokens)
    chosen: Sequence[str] = [name] if name is not None else list(tools)
    if name is not None and name not in tools:
        raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")
    rules = LarkRules()
    calls: list[str] = []
    longest = 0
    smallest_need = None
    for tool in chosen:
        wrapper = len(call_prefix(tool).encode()) + len(CALL_SUFFIX.encode())
        compiler = SchemaCompiler(tools[tool], rules)
        needed = wrapper + compiler.min_bytes()
        if needed > budget:
            smallest_need = needed if smallest_need is None else min(smallest_need, needed)
            continue
        args = compiler.compile(budget - wrapper)
        body = f"{lark_string(call_prefix(tool))} {args.lark} {lark_string(CALL_SUFFIX)}"
        calls.append(rules.add(body))
        longest = max(longest, wrapper + args.max_bytes)
    if not calls:
        raise BudgetTooSmall(smallest_need or 0, budget)
    key = _key("tools", {"tools": {t: tools[t] for t in chosen}}, budget)
    return GrammarSpec(rules.text(" | ".join(calls)), longest, key)


def _key(kind: str, schema: object, budget: int) -> str:
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{kind}:{budget}:{canonical}"
