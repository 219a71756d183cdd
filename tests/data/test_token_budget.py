"""Token-budget batching: budget respected, every index once, deterministic, sharded evenly, resumable."""

import random

import pytest
from torch.utils.data import DataLoader

from kullm.data.sampling import TokenBudgetBatchSampler
from kullm.data.sft import Collator, padded_tokens

LENGTHS = [random.Random(0).randint(5, 300) for _ in range(500)]


def test_budget_respected_and_every_index_once():
    s = TokenBudgetBatchSampler(LENGTHS, 1024, seed=0)
    batches = list(s)
    assert len(batches) == len(s)
    assert all(padded_tokens([LENGTHS[i] for i in b], 8) <= 1024 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    # grouping by length fills the budget well: few more slots than tokens
    slots = sum(padded_tokens([LENGTHS[i] for i in b], 8) for b in batches)
    assert sum(LENGTHS) / slots > 0.85
    assert sum(len(b) for b in batches) / len(batches) > 3  # short rows share a batch


def test_collated_batches_fit_the_budget():
    rows = [{"input_ids": [7] * n, "labels": [7] * n} for n in LENGTHS]
    loader = DataLoader(
        rows, batch_sampler=TokenBudgetBatchSampler(LENGTHS, 512, seed=3), collate_fn=Collator(pad_id=2)
    )
    sizes = [batch["input_ids"].numel() for batch in loader]
    assert max(sizes) <= 512 and len(sizes) == len(loader.batch_sampler)


def test_deterministic_per_seed_and_epoch():
    a, b = TokenBudgetBatchSampler(LENGTHS, 1024, seed=5), TokenBudgetBatchSampler(LENGTHS, 1024, seed=5)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(TokenBudgetBatchSampler(LENGTHS, 1024, seed=6)) != first


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_get_equal_counts_and_cover_the_epoch(replicas):
    shards = [
        list(TokenBudgetBatchSampler(LENGTHS, 1024, seed=2, num_replicas=replicas, rank=r)) for r in range(replicas)
    ]
    assert len({len(s) for s in shards}) == 1  # DDP needs the same number of steps on every rank
    assert len(shards[0]) == len(TokenBudgetBatchSampler(LENGTHS, 1024, seed=2, num_replicas=replicas))
    seen = [i for s in shards for b in s for i in b]
    assert set(seen) == set(range(len(LENGTHS)))
    single = list(TokenBudgetBatchSampler(LENGTHS, 1024, seed=2))
    assert len(seen) - len(LENGTHS) <= sum(len(b) for b in single[: replicas - 1])  # only the filler repeats


def test_resume_mid_epoch():
    s = TokenBudgetBatchSampler(LENGTHS, 1024, seed=4, num_replicas=2, rank=1)
    s.set_epoch(3)
    full = list(s)
    it = iter(s)
    head = [next(it) for _ in range(5)]
    state = s.state_dict()
    assert state == {"epoch": 3, "served": 5, "seed": 4}
    resumed = TokenBudgetBatchSampler(LENGTHS, 1024, seed=0, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    assert list(resumed) == full  # the skip applies to the resumed epoch's first pass only


def test_budget_smaller_than_longest_example():
    with pytest.raises(ValueError, match="token_budget=300"):
        TokenBudgetBatchSampler([10, 299], 300)  # 299 pads to 304


def test_sequential_when_not_shuffled():
    s = TokenBudgetBatchSampler([8] * 10, 32, shuffle=False)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(TokenBudgetBatchSampler([8] * 10, 32, shuffle=False, max_rows=3))[0] == [0, 1, 2]


def test_shuffled_budget_batches_are_length_sorted_inside_a_group_and_exact_budgets_fit():
    lengths = [8, 64, 16, 40, 24, 56, 8, 32]
    s = TokenBudgetBatchSampler(lengths, 128, seed=5, group_size=8, pad_to_multiple_of=8)
    batches = s.global_batches()
    flat = [i for b in sorted(batches, key=lambda b: -lengths[b[0]]) for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # one group: longest first, greedy fill
    assert s.global_batches() is batches  # cached per (seed, epoch)
    s.set_epoch(1)
    assert s.global_batches() is not batches
    assert TokenBudgetBatchSampler([128], 128).global_batches() == [[0]]  # exactly the budget fits
    assert list(TokenBudgetBatchSampler([8] * 4, 16, shuffle=False, pad_to_multiple_of=0)) == [[0, 1], [2, 3]]


def test_padded_tokens_counts_the_slots_of_a_padded_batch():
    assert padded_tokens([3, 5, 1], 4) == 8 * 3
    assert padded_tokens([3, 5], 0) == 5 * 2 and padded_tokens([3, 5], 1) == 10
    assert padded_tokens([], 8) == 0


def test_budget_batches_report_a_nominal_batch_size():
    """DeepSpeed reads ``batch_sampler.batch_size`` at setup (for its throughput logs): it must exist."""
    s = TokenBudgetBatchSampler([8] * 10, 32, shuffle=False)
    loader = DataLoader(list(range(10)), batch_sampler=s)
    assert loader.batch_sampler.batch_size == 3  # 10 rows in 3 batches of 4, 4, 2
