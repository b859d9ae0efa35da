import random

import pytest

from polyreward.models.runtime.batching import plan_batches


@pytest.mark.parametrize("seed", range(5))
def test_every_item_once_within_budget_and_cap(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 600) for _ in range(rng.randint(1, 300))]
    batches = plan_batches(lengths, token_budget=4096, max_items=32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 32
        widest = max(lengths[i] for i in b)
        assert len(b) * widest <= 4096 or len(b) == 1
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)


def test_oversize_item_gets_its_own_batch_and_sorting_reduces_padding():
    lengths = [10, 5000, 12, 11, 300]
    batches = plan_batches(lengths, token_budget=1000, max_items=8)
    assert [1] in batches
    assert [0, 3, 2] in batches  # the three short ones together, not padded to 300
    with pytest.raises(ValueError):
        plan_batches(lengths, token_budget=0, max_items=8)
