"""Grammar matchers for a continuous batch: one per constrained row, masks between forward and
sampling.

llguidance (Rust) holds each row's parser state and computes token masks with the GIL released,
on its own threads; `BatchMasks.start` runs that on a helper thread so it overlaps the model's
forward pass, and `apply` folds the masks into the logits (rows without a grammar untouched).
"""

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import llguidance
import numpy as np
import torch

from workers.constraints.grammars import GrammarSpec
from workers.constraints.schema_grammar import GrammarError


class TokenizerInfo:
    """llguidance's view of a model's tokenizer (built once per model; ~0.05-0.3 s)."""

    def __init__(self, tokenizer_json: str, eos_token_ids: Sequence[int], logits_width: int):
        probe = llguidance.LLTokenizer(tokenizer_json)
        # Masks are as wide as the wider of the vocabulary and the logits; ids past the
        # tokenizer's are never allowed, and bits past the logits are cut off when applied.
        self.mask_width = max(probe.vocab_size, logits_width)
        self.logits_width = logits_width
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer_json, n_vocab=self.mask_width, eos_token=list(eos_token_ids)
        )

    @classmethod
    def from_folder(
        cls, folder: Path, eos_token_ids: Sequence[int], logits_width: int
    ) -> "TokenizerInfo":
        """From a model folder's tokenizer.json (`logits_width`: the model's output size)."""
        text = (Path(folder) / "tokenizer.json").read_text(encoding="utf-8")
        return cls(text, eos_token_ids, logits_width)


class Matcher:
    """One sequence's grammar state: what it may emit next, what it has emitted."""

    def __init__(self, inner: llguidance.LLMatcher) -> None:
        self.inner = inner

    def accept(self, token: int) -> bool:
        """Advances by a sampled token; False if the grammar refuses it (a bug upstream)."""
        return bool(self.inner.consume_token(token))

    def allows_stop(self) -> bool:
        """The output so far is complete: end-of-sequence may come now."""
        return bool(self.inner.is_accepting())

    def must_stop(self) -> bool:
        """Nothing but end-of-sequence can follow: the engine ends the sequence here."""
        return bool(self.inner.is_stopped())

    @property
    def error(self) -> str | None:
        return self.inner.get_error() or None


class GrammarCache:
    """Compiled grammars by key (schema, budget), so a resent tool set compiles once.

    Each entry is a matcher in its initial state; a request gets a copy (microseconds).
    """

    def __init__(self, tokenizer: TokenizerInfo, capacity: int = 256) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def matcher(self, spec: GrammarSpec) -> Matcher:
        """A fresh matcher for `spec`; raises GrammarError if llguidance refuses the grammar."""
        with self._lock:
            template = self._templates.get(spec.key)
            if template is not None:
                self._templates.move_to_end(spec.key)
                self.hits += 1
                return Matcher(template.deep_copy())
        template = llguidance.LLMatcher(self.tokenizer.tokenizer, spec.lark, log_level=0)
        if template.is_error():
            raise GrammarError(f"the grammar did not compile: {template.get_error()}")
        with self._lock:
            self.misses += 1
            self._templates[spec.key] = template
            while len(self._templates) > self.capacity:
                self._templates.popitem(last=False)
        return Matcher(template.deep_copy())


class BatchMasks:
    """Token masks for the rows of a batch, computed in parallel, applied to logits in place."""

    def __init__(self, tokenizer: TokenizerInfo, max_batch: int, threads: int | None = None):
        self.tokenizer = tokenizer
        self._words = (tokenizer.mask_width + 31) // 32
        self._bits = np.full((max_batch, self._words), -1, dtype=np.int32)
        self._executor = llguidance.LLExecutor(threads)
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._rows: list[int] = []
        self._pending: Future[None] | None = None

    def compute(self, matchers: Sequence[Matcher | None]) -> None:
        """Fills the masks of the constrained rows (row i of the batch: matchers[i])."""
        if len(matchers) > len(self._bits):
            self._bits = np.full((len(matchers), self._words), -1, dtype=np.int32)
        work = [(m.inner, row) for row, m in enumerate(matchers) if m is not None]
        self._rows = [row for _, row in work]
        if work:
            self._executor.unsafe_compute_mask_ptr(
                work, self._bits.ctypes.data, self._words * 4, len(self._bits)
            )

    def start(self, matchers: Sequence[Matcher | None]) -> None:
        """Starts `compute` on a helper thread (call before the forward pass it overlaps)."""
        self._pending = self._helper.submit(self.compute, list(matchers))

    def apply(self, logits: torch.Tensor) -> None:
        """Sets disallowed tokens of the constrained rows to -inf (waits for `start` first)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        if not self._rows:
            return
        width = logits.shape[-1]
        bits = np.unpackbits(self._bits[self._rows].view(np.uint8), axis=1, bitorder="little")
        allowed = torch.from_numpy(bits[:, :width].astype(np.bool_)).to(logits.device)
        if width > bits.shape[1]:  # logits wider than the mask: the extra ids are never allowed
            pad = torch.zeros((len(self._rows), width - bits.shape[1]), dtype=torch.bool)
            allowed = torch.cat([allowed, pad.to(logits.device)], dim=1)
        rows = torch.tensor(self._rows, device=logits.device)
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))

    def close(self) -> None:
        self._helper.shutdown(wait=True)


def apply_masks(
    logits: torch.Tensor, matchers: Sequence[Matcher | None], masks: BatchMasks
) -> None:
    """Masks each row of `logits` ([batch, vocab]) by its matcher; rows with None are left."""
    masks.compute(matchers)
    masks.apply(logits)
