"""``bernoulli_positions``: Bernoulli draws on CPU as geometric gaps (DropBlock seeds, AttentionDrop gates)."""

from __future__ import annotations

import math

import pytest
import torch

from timm_drop.regularizers.base import bernoulli_positions


@pytest.mark.parametrize("positions, prob", [(10_000, 0.1), (200_000, 0.003), (50, 0.25), (7, 0.9)])
def test_positions_are_sorted_distinct_and_in_range(positions, prob):
    torch.manual_seed(0)
    for _ in range(20):
        idx = bernoulli_positions(positions, prob)
        assert idx.dtype == torch.long
        if idx.numel():
            assert idx.min().item() >= 0 and idx.max().item() < positions
            assert bool((idx.diff() > 0).all())


@pytest.mark.parametrize("prob", [0.003, 0.1, 0.25])
def test_count_is_binomial_and_every_position_is_equally_likely(prob):
    torch.manual_seed(1)
    positions, draws = 2_000, 600
    hits = torch.zeros(positions)
    counts = []
    for _ in range(draws):
        idx = bernoulli_positions(positions, prob)
        hits[idx] += 1
        counts.append(idx.numel())
    counts = torch.tensor(counts, dtype=torch.float64)
    mean, var = positions * prob, positions * prob * (1 - prob)
    assert counts.mean().item() == pytest.approx(mean, abs=5 * math.sqrt(var / draws))
    assert counts.var().item() == pytest.approx(var, rel=0.25)
    # per-position hit rate: the first and last positions are not special (the gaps start before position 0)
    per_block = hits.view(20, 100).sum(1) / (100 * draws)
    assert (per_block - prob).abs().max().item() < 6 * math.sqrt(prob * (1 - prob) / (100 * draws))
    assert hits[0].item() / draws == pytest.approx(prob, abs=6 * math.sqrt(prob / draws) + 0.01)


def test_neighbouring_positions_are_independent():
    # P(i and i + 1 both hit) = p^2: a gap distribution that is not geometric shows up here first
    torch.manual_seed(2)
    prob, positions, both, total = 0.2, 1_000, 0, 0
    for _ in range(400):
        mask = torch.zeros(positions, dtype=torch.bool)
        mask[bernoulli_positions(positions, prob)] = True
        both += (mask[1:] & mask[:-1]).sum().item()
        total += positions - 1
    assert both / total == pytest.approx(prob**2, rel=0.06)


def test_edge_probabilities_and_sizes():
    assert bernoulli_positions(100, 0.0).numel() == 0
    assert bernoulli_positions(0, 0.5).numel() == 0
    assert torch.equal(bernoulli_positions(5, 1.0), torch.arange(5))
