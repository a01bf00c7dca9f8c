"""Sampling parameters the API accepts must never produce NaN probabilities."""

import pytest
import torch

from contract.jobs import SamplingParams
from workers.backends.transformers.sampling import (
    filter_logits,
    is_greedy,
    make_generator,
    sample_next,
)


@pytest.mark.parametrize("temperature", [0.0, 5e-324, 1e-300, 1e-30, 1e-5])
def test_vanishing_temperatures_are_greedy(temperature: float) -> None:
    params = SamplingParams(max_tokens=1, temperature=temperature)
    assert is_greedy(params)
    logits = torch.tensor([[1.0, 30.0, -5.0, 29.0]])
    assert sample_next(logits, [params], [make_generator(params, logits.device)]) == [1]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=1, temperature=1e-4),
        SamplingParams(max_tokens=1, temperature=2.0, top_p=1e-300),
        SamplingParams(max_tokens=1, temperature=0.5, top_k=10**12),
        SamplingParams(max_tokens=1, temperature=1.0, top_k=1, top_p=0.5),
    ],
)
def test_sampled_probabilities_stay_finite(params: SamplingParams) -> None:
    logits = torch.tensor([1e4, -1e4, 0.0, 3.0, 3.0])
    probs = filter_logits(logits, params).softmax(dim=-1)
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
    generator = make_generator(params, logits.device)
    assert sample_next(logits[None, :], [params], [generator])[0] in range(5)
