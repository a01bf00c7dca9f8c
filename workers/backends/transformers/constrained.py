"""Grammar-constrained rows in the continuous batch: a matcher per constrained sequence, and
its token mask applied to that row's logits before sampling, every step.

A submission with a `Constraint` (a forced tool call, or structured output) gets a matcher for
a grammar compiled from its schema with its token budget (`max_tokens`, or what the context
window leaves if less): every output the grammar allows fits the budget, so the matcher closes
the JSON as the budget runs out (`workers.constraints.schema_grammar`). Grammars are cached by
schema and budget (agents resend the same tools every turn): the Lark text in `_specs`, the
compiled matcher in `GrammarCache`.

In a decode step the masks of the constrained rows are computed on a helper thread while the
model's forward runs (llguidance releases the GIL), then folded into the logits; rows without a
grammar are never touched, and a batch without any constrained row does no grammar work at all.
The tokenizer's grammar view is built on the first constrained request, so an engine that never
sees one never pays for it.
"""

import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from pathlib import Path

import torch

from workers.backends.seam import Constraint
from workers.constraints.grammars import (
    GrammarSpec,
    byte_budget,
    structured_output_grammar,
    tool_call_grammar,
)
from workers.constraints.matcher import BatchMasks, GrammarCache, Matcher, TokenizerInfo
from workers.constraints.schema_grammar import BudgetTooSmall, GrammarError

__all__ = ["BudgetTooSmall", "GrammarError", "Matcher", "RowGrammars", "grammar_spec"]

# Lark grammars kept by (constraint, byte budget); the compiled matchers have their own cache.
SPEC_CACHE_SIZE = 256


def grammar_spec(constraint: Constraint, budget_tokens: int) -> GrammarSpec:
    """The grammar of `constraint` for an output of at most `budget_tokens` tokens."""
    if constraint.kind == "json":
        if constraint.schema is None:
            raise GrammarError("a json constraint needs a schema")
        return structured_output_grammar(constraint.schema, budget_tokens)
    if not constraint.tools:
        raise GrammarError("a tool_call constraint needs tools")
    return tool_call_grammar(constraint.tools, budget_tokens, name=constraint.name)


class RowGrammars:
    """The grammar side of one engine: matchers for new sequences, masks for each step."""

    def __init__(
        self,
        model_path: Path,
        eos_token_ids: Collection[int],
        logits_width: int,
        max_batch: int,
    ) -> None:
        self._folder = Path(model_path)
        self._eos = sorted(eos_token_ids)
        self._width = logits_width
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._cache: GrammarCache | None = None
        self._masks: BatchMasks | None = None
        self._specs: OrderedDict[str, GrammarSpec] = OrderedDict()
        self._started = False  # a step's masks are being computed (`start`)
        self.spec_hits = 0

    def matcher(self, constraint: Constraint, budget_tokens: int) -> Matcher:
        """A fresh matcher for a new sequence; GrammarError if the constraint has no grammar
        within the budget. Called on the submitting thread, not the stepping one."""
        spec = self._spec(constraint, budget_tokens)
        return self._grammar_cache().matcher(spec)

    @property
    def compiled(self) -> GrammarCache | None:
        """The compiled grammars (None until the first constrained request)."""
        return self._cache

    def _spec(self, constraint: Constraint, budget_tokens: int) -> GrammarSpec:
        key = json.dumps(
            [
                constraint.kind,
                constraint.schema,
                constraint.tools,
                constraint.name,
                byte_budget(budget_tokens),  # budgets with the same byte budget share it
            ],
            sort_keys=True,
            separators=(",", ":"),
        )
        with self._lock:
            spec = self._specs.get(key)
            if spec is not None:
                self._specs.move_to_end(key)
                self.spec_hits += 1
                return spec
        spec = grammar_spec(constraint, budget_tokens)
        with self._lock:
            self._specs[key] = spec
            while len(self._specs) > SPEC_CACHE_SIZE:
                self._specs.popitem(last=False)
        return spec

    def _grammar_cache(self) -> GrammarCache:
        with self._lock:
            if self._cache is None:
                tokenizer = TokenizerInfo.from_folder(self._folder, self._eos, self._width)
                self._cache = GrammarCache(tokenizer)
                self._masks = BatchMasks(tokenizer, self._max_batch)
            return self._cache

    # On the stepping thread.

    def start(self, matchers: Sequence[Matcher | None]) -> None:
        """Starts computing the masks of the constrained rows (before the forward they overlap);
        nothing if no row is constrained."""
        self._started = self._masks is not None and any(m is not None for m in matchers)
        if self._started:
            assert self._masks is not None
            self._masks.start(matchers)

    def apply(self, logits: torch.Tensor) -> None:
        """Masks the constrained rows of `logits` with what `start` computed."""
        if not self._started:
            return
        self._started = False
        assert self._masks is not None
        self._masks.apply(logits)

    def mask(self, logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> None:
        """Computes and applies the masks now (a prefill's first token)."""
        self.start(matchers)
        self.apply(logits)

    def close(self) -> None:
        if self._masks is not None:
            self._masks.close()


def accept(matcher: Matcher, token: int) -> str | None:
    """Advances `matcher` by a sampled token; the reason to fail the sequence, if any."""
    if matcher.accept(token):
        return None
    return f"the output grammar refused token {token}: {matcher.error or 'no reason given'}"
