"""The computed permutation behind every epoch's order (data/permutation.py)."""
import numpy as np
import pytest
import torch

from bitnet_train.data.permutation import Permutation


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 100, 1000, 4097])
def test_it_is_a_permutation_of_range_n(n):
    order = Permutation(n, seed=11).take(0, n)
    assert order.dtype == torch.int64
    assert sorted(order.tolist()) == list(range(n))


def test_any_slice_is_the_same_part_of_the_whole_order():
    whole = Permutation(1000, seed=3).take(0, 1000)
    assert torch.equal(Permutation(1000, seed=3).take(417, 64), whole[417:481])


def test_the_order_depends_on_the_seed_and_on_nothing_else():
    a, b = Permutation(1000, seed=0).take(0, 1000), Permutation(1000, seed=1).take(0, 1000)
    assert torch.equal(a, Permutation(1000, seed=0).take(0, 1000))
    assert (a != b).float().mean() > 0.9


def test_a_corpus_of_any_size_costs_no_memory():
    """10^15 blocks: a stored order would be 8 PB."""
    n = 10**15
    batch = Permutation(n, seed=5).take(n // 2, 4096)
    assert len(set(batch.tolist())) == 4096 and int(batch.min()) >= 0 and int(batch.max()) < n
    assert int(batch.max()) > n // 100  # spread over the whole range, not clustered near the start


def test_the_order_looks_random():
    """Over 200 seeds of a 1,000-element order: position and value are uncorrelated, each element
    lands in the first tenth about a tenth of the time, and fixed points are as rare as for a
    uniform permutation (one per order on average)."""
    n, seeds = 1000, 200
    orders = np.stack([Permutation(n, seed=s).take(0, n).numpy() for s in range(seeds)])
    positions = np.arange(n)
    correlations = [np.corrcoef(positions, o)[0, 1] for o in orders]
    assert abs(np.mean(correlations)) < 0.01 and np.max(np.abs(correlations)) < 0.15
    in_first_tenth = np.bincount(orders[:, : n // 10].ravel(), minlength=n) / seeds
    assert abs(in_first_tenth.mean() - 0.1) < 1e-9 and in_first_tenth.std() < 0.04  # binomial: 0.021
    assert 0.7 < (orders == positions).sum(axis=1).mean() < 1.3


def test_positions_outside_the_order_are_refused():
    with pytest.raises(IndexError, match="positions 990..1010 of a permutation of 1000"):
        Permutation(1000, seed=0).take(990, 20)
