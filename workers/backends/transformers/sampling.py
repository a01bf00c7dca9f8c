"""Choosing the next token of each sequence in a batch, each with its own sampling parameters."""

import secrets

import torch

from contract.jobs import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private, randomly seeded generator for a sampling request (None for greedy)."""
    if is_greedy(params):
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


# Below this, logits / temperature overflows float32 (and inf - inf is nan): treat it as greedy,
# which is what such a temperature means anyway.
MIN_SAMPLING_TEMPERATURE = 1e-4


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < MIN_SAMPLING_TEMPERATURE


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row of logits scaled by temperature and cut by top_k, then top_p (HF's order)."""
    scores = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < scores.numel():
        kth_best = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop the least likely tokens whose total mass stays within 1 - top_p; the best survives.
        drop_sorted = cumulative <= (1.0 - params.top_p)
        drop_sorted[-1] = False
        drop = drop_sorted.scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample_next(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Next token per row of `logits` ([batch, vocab]); greedy rows take the argmax."""
    # One argmax for the whole batch: most traffic is greedy and this avoids per-row work.
    greedy = logits.argmax(dim=-1).tolist()
    tokens: list[int] = []
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if generator is None:
            tokens.append(int(greedy[row]))
            continue
        probs = filter_logits(logits[row], p).softmax(dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator).item()))
    return tokens
