"""Prompt prefixes' keys and values, kept between requests (prompt caching).

The KV of a prompt is cut into blocks of `block_tokens` tokens. Each block is keyed by a hash
chain: the hash of the previous block's key and this block's token ids, so a key names the
whole prefix up to the block's end, and two prompts share a block exactly when they share every
token up to it. A new sequence whose prompt starts with cached blocks takes their KV and is
prefilled only for the rest.

Blocks live within a byte budget and are evicted least recently used first, never while a
sequence that took them (or is about to store them) is waiting or running: `lookup` pins what
it returns, `release` unpins it when the sequence ends.

Thread-safe: lookups happen on the submitting thread, stores and releases on the engine's
stepping thread.
"""

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from contract.prefix_routing import PREFIX_BLOCK_TOKENS, block_keys
from workers.backends.transformers.kv_batch import KV

# The API computes the same keys to route a request to the worker holding its prefix.
DEFAULT_BLOCK_TOKENS = PREFIX_BLOCK_TOKENS


@dataclass
class _Block:
    layers: list[KV]  # per layer: keys, values of shape [1, kv_heads, block_tokens, head_dim]
    pins: int = 0


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one block
    read_tokens: int = 0  # prompt tokens whose KV was reused
    stored_tokens: int = 0  # tokens written to the cache
    evictions: int = 0  # blocks evicted
    blocks: int = 0  # blocks held now
    bytes: int = 0  # bytes held now
    budget_bytes: int = 0


@dataclass
class Plan:
    """What a lookup found for one prompt, and what the sequence will store after its prefill.

    `read` are pinned until `release`; `write` are the keys of the blocks the sequence will
    store (room for them is counted when the lookup is made, so what the worker reports as
    written is written)."""

    read: list[bytes] = field(default_factory=list)
    write: list[bytes] = field(default_factory=list)
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    @property
    def read_tokens(self) -> int:
        return len(self.read) * self.block_tokens

    @property
    def write_tokens(self) -> int:
        return len(self.write) * self.block_tokens


class PrefixCache:
    """Blocks of prompt KV by hash-chain key, least recently used first, within a byte budget."""

    def __init__(
        self, budget_bytes: int, bytes_per_token: int, block_tokens: int = DEFAULT_BLOCK_TOKENS
    ) -> None:
        self.block_tokens = block_tokens
        self.block_bytes = bytes_per_token * block_tokens
        self.budget_bytes = budget_bytes
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # oldest use first
        # Blocks planned for writing, not stored yet: room kept for them, by key.
        self._planned: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._stats = CacheStats(budget_bytes=budget_bytes)
        # Called with (hashes of blocks that left, hashes that arrived): the worker's routing
        # announcements follow them.
        self.on_change: Callable[[list[bytes], list[bytes]], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.budget_bytes >= self.block_bytes

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**self._stats.__dict__)

    def held(self) -> list[bytes]:
        with self._lock:
            return list(self._blocks)

    def plan(self, ids: list[int], cacheable: int) -> Plan:
        """The cached blocks `ids` starts with (pinned) and the blocks up to `cacheable` it will
        store. At least one prompt token is always left to prefill (its logits start the
        answer), so a prompt is never read whole."""
        plan = Plan(block_tokens=self.block_tokens)
        if not self.enabled or cacheable < self.block_tokens:
            return plan
        keys = block_keys(ids, min(cacheable, len(ids) - 1), self.block_tokens)
        with self._lock:
            self._stats.lookups += 1
            for key in keys:
                block = self._blocks.get(key)
                if block is None:
                    break
                block.pins += 1
                self._blocks.move_to_end(key)
                plan.read.append(key)
            # Writes: as many of the rest as the budget holds beside what is pinned or planned.
            room = self.budget_bytes - self._pinned_bytes() - self._planned_bytes()
            for key in keys[len(plan.read) :]:
                if key in self._blocks or key in self._planned:
                    continue  # another sequence holds or is writing it
                if room < self.block_bytes:
                    break
                room -= self.block_bytes
                self._planned[key] = self._planned.get(key, 0) + 1
                plan.write.append(key)
            if plan.read:
                self._stats.hits += 1
                self._stats.read_tokens += plan.read_tokens
        return plan

    def kv(self, plan: Plan) -> list[KV]:
        """The keys and values of the blocks the plan reads, one tensor pair per layer."""
        with self._lock:
            blocks = [self._blocks[key] for key in plan.read]
        layers = len(blocks[0].layers)
        return [
            (
                torch.cat([b.layers[i][0] for b in blocks], dim=-2),
                torch.cat([b.layers[i][1] for b in blocks], dim=-2),
            )
            for i in range(layers)
        ]

    def store(self, plan: Plan, layers: list[KV], start: int) -> None:
        """Stores the plan's write blocks from `layers`, the KV of one row whose first prompt
        position is column `start` ([1, kv_heads, length, head_dim] per layer). Blocks are
        copied out, so the row's cache can be freed."""
        arrived: list[bytes] = []
        left: list[bytes] = []
        first = len(plan.read)  # block index of the first write
        with self._lock:
            for n, key in enumerate(plan.write):
                self._unplan(key)
                if key in self._blocks:
                    continue
                begin = start + (first + n) * self.block_tokens
                end = begin + self.block_tokens
                left += self._make_room_locked(self.block_bytes)
                if self._bytes_locked() + self.block_bytes > self.budget_bytes:
                    break
                self._blocks[key] = _Block(
                    [(k[:, :, begin:end].clone(), v[:, :, begin:end].clone()) for k, v in layers]
                )
                self._stats.stored_tokens += self.block_tokens
                arrived.append(key)
            plan.write = []
            self._refresh_locked()
        self._announce(left, arrived)

    def release(self, plan: Plan) -> None:
        """The sequence ended: its read blocks may be evicted again; unwritten plans dropped."""
        with self._lock:
            for key in plan.read:
                block = self._blocks.get(key)
                if block is not None:
                    block.pins -= 1
            for key in plan.write:
                self._unplan(key)
            plan.read, plan.write = [], []

    def clear(self) -> None:
        with self._lock:
            left = list(self._blocks)
            self._blocks.clear()
            self._planned.clear()
            self._refresh_locked()
        self._announce(left, [])

    # Under the lock.

    def _unplan(self, key: bytes) -> None:
        count = self._planned.get(key, 0) - 1
        if count > 0:
            self._planned[key] = count
        else:
            self._planned.pop(key, None)

    def _pinned_bytes(self) -> int:
        return sum(self.block_bytes for b in self._blocks.values() if b.pins)

    def _planned_bytes(self) -> int:
        return len(self._planned) * self.block_bytes

    def _bytes_locked(self) -> int:
        return len(self._blocks) * self.block_bytes

    def _make_room_locked(self, needed: int) -> list[bytes]:
        evicted: list[bytes] = []
        if self._bytes_locked() + needed <= self.budget_bytes:
            return evicted
        for key in [k for k, b in self._blocks.items() if not b.pins]:
            del self._blocks[key]
            evicted.append(key)
            self._stats.evictions += 1
            if self._bytes_locked() + needed <= self.budget_bytes:
                break
        return evicted

    def _refresh_locked(self) -> None:
        self._stats.blocks = len(self._blocks)
        self._stats.bytes = self._bytes_locked()

    def _announce(self, left: list[bytes], arrived: list[bytes]) -> None:
        if self.on_change is not None and (left or arrived):
            self.on_change(left, arrived)
