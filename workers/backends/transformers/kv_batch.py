"""The running batch's KV cache: one left-padded cache whose rows join and leave between steps.

New sequences are prefilled (alone, or together in one left-padded forward), then merged in:
every row is left-padded to a common length and the padding is masked out, so a row attends to
exactly its own tokens, at its own positions, as if it ran alone.
"""

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [batch, kv_heads, length, head_dim]


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer with spare room, so a decode step writes one column.

    DynamicLayer concatenates on every update, copying the whole batch's cache per token.
    `keys`/`values` stay views of the filled part, which is all the model reads.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self._length = 0
        self._key_buf = keys.new_empty(0)
        self._value_buf = values.new_empty(0)
        self.update(keys, values)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        if self._key_buf.ndim != key_states.ndim or end > self._key_buf.shape[-2]:
            self._key_buf = _grown(self._key_buf, key_states, self._length, end)
            self._value_buf = _grown(self._value_buf, value_states, self._length, end)
        self._key_buf[..., self._length : end, :] = key_states
        self._value_buf[..., self._length : end, :] = value_states
        self._length = end
        self.keys = self._key_buf[..., :end, :]
        self.values = self._value_buf[..., :end, :]
        return self.keys, self.values


def _grown(buf: torch.Tensor, like: torch.Tensor, used: int, needed: int) -> torch.Tensor:
    # Doubling keeps copies rare; the floor of 64 spares the first steps after a rebuild.
    shape = list(like.shape)
    shape[-2] = max(needed + 64, 2 * needed)
    grown = like.new_empty(shape)
    if used:
        grown[..., :used, :] = buf[..., :used, :]
    return grown


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes in the cache, over all layers."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * dtype.itemsize


def layers_of(cache: DynamicCache) -> list[KV]:
    # Every layer of these caches is full attention (DynamicLayer or GrowingLayer), filled.
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]


def make_cache(layers: list[KV]) -> DynamicCache:
    """A cache of plain full-attention layers holding `layers`."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer(keys, values) for keys, values in layers]
    return cache


def _left_pad(layers: list[KV], mask: torch.Tensor, length: int) -> tuple[list[KV], torch.Tensor]:
    extra = length - mask.shape[1]
    if extra == 0:
        return layers, mask
    pad = torch.nn.functional.pad
    # The pad pairs run from the last dim: (head_dim: 0, 0), then (length: extra before, 0 after).
    padded = [(pad(k, (0, 0, extra, 0)), pad(v, (0, 0, extra, 0))) for k, v in layers]
    return padded, pad(mask, (extra, 0))


class BatchCache:
    """KV cache, padding mask and real length of every row of the running batch."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, length]: 1 = real token, 0 = padding
        self.lengths: list[int] = []  # real tokens cached per row (= its next position id)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, caches: list[DynamicCache]) -> None:
        """Appends one row per single-sequence, unpadded prefill cache."""
        parts = []
        for cache in caches:
            layers = layers_of(cache)
            length = layers[0][0].shape[-2]
            ones = torch.ones(1, length, dtype=torch.long, device=layers[0][0].device)
            parts.append((layers, ones))
        self._append(parts)

    def join_padded(self, layers: list[KV], mask: torch.Tensor, rows: list[int]) -> None:
        """Appends `rows` of a batched, left-padded prefill cache whose padding `mask` marks."""
        index = torch.tensor(rows, device=mask.device)
        mask = mask.index_select(0, index)
        trim = mask.shape[1] - int(mask.sum(-1).max())  # columns that are padding in every row
        mask = mask[:, trim:]
        keep = mask.bool()[:, None, :, None]
        # Padding positions hold whatever the model computed there: zero them, as padding
        # added by `_left_pad` is, so nothing but the mask stands between a row and them.
        picked = [
            (
                torch.where(keep, k.index_select(0, index)[:, :, trim:], 0.0),
                torch.where(keep, v.index_select(0, index)[:, :, trim:], 0.0),
            )
            for k, v in layers
        ]
        self._append([(picked, mask)])

    def _append(self, parts: list[tuple[list[KV], torch.Tensor]]) -> None:
        lengths = [int(n) for _, mask in parts for n in mask.sum(-1).tolist()]
        width = max([self.width, *(mask.shape[1] for _, mask in parts)])
        if self.cache is not None and self.mask is not None:
            parts = [(layers_of(self.cache), self.mask), *parts]
        padded = [_left_pad(layers, mask, width) for layers, mask in parts]
        merged = [
            (torch.cat([p[0][i][0] for p in padded]), torch.cat([p[0][i][1] for p in padded]))
            for i in range(len(padded[0][0]))
        ]
        self.cache = make_cache(merged)
        self.mask = torch.cat([p[1] for p in padded])
        self.lengths += lengths

    def keep(self, rows: list[int]) -> None:
        """Keeps only `rows` (freeing the others), then drops all-padding leading columns."""
        if not rows or self.cache is None or self.mask is None:
            self.cache, self.mask, self.lengths = None, None, []
            return
        self.lengths = [self.lengths[r] for r in rows]
        trim = self.width - max(self.lengths)
        index = torch.tensor(rows, device=self.mask.device)
        self.cache = make_cache(
            [
                (k.index_select(0, index)[:, :, trim:], v.index_select(0, index)[:, :, trim:])
                for k, v in layers_of(self.cache)
            ]
        )
        self.mask = self.mask.index_select(0, index)[:, trim:]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask and position ids for feeding one more token to every row."""
        assert self.mask is not None
        mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        positions = torch.tensor([[n] for n in self.lengths], device=self.mask.device)
        return mask, positions

    def advance(self, mask: torch.Tensor) -> None:
        """Records that the forward with `mask` (from step_inputs) cached one token per row."""
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]
