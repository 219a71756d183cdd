import pytest

from kullm.data.sampling import EpochSampler, make_sampler


def test_same_seed_and_epoch_same_order_new_epoch_new_order():
    a, b = (
        make_sampler("random", [1] * 50, micro_batch_size=4, seed=3),
        make_sampler("random", [1] * 50, micro_batch_size=4, seed=3),
    )
    assert list(a) == list(b) and sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(make_sampler("random", [1] * 50, micro_batch_size=4, seed=4)) != first


def test_length_grouped_batches_similar_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    s = make_sampler("length_grouped", lengths, micro_batch_size=4, seed=0, mega_batches=10)
    order = list(s)
    assert sorted(order) == list(range(400))
    assert lengths[order[0]] == max(lengths)  # the longest batch first: out-of-memory shows at step one

    def mean_spread(order):
        batches = [[lengths[i] for i in order[k : k + 4]] for k in range(0, len(order), 4)]
        return sum(max(b) - min(b) for b in batches) / len(batches)

    random_order = list(make_sampler("random", lengths, micro_batch_size=4, seed=0))
    assert mean_spread(order) < mean_spread(random_order) / 5
    s2 = make_sampler("length_grouped", lengths, micro_batch_size=4, seed=0, mega_batches=10)
    assert list(s2) == order


def test_ranks_partition_the_epoch():
    n = 23
    shards = [list(EpochSampler(n, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # equal counts (DDP needs them)
    assert set().union(*shards) == set(range(n))


def test_resume_mid_epoch_continues_the_same_order():
    s = EpochSampler(20, seed=5)
    full = list(s)
    it = iter(s)
    _ = [next(it) for _ in range(7)]
    state = s.state_dict()
    resumed = EpochSampler(20, seed=0)
    resumed.load_state_dict(state)
    assert list(resumed) == full[7:]
    assert list(resumed) == full  # the next pass is a whole epoch again


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'shuffled'"):
        make_sampler("shuffled", [1], micro_batch_size=1, seed=0)


def test_rank_bounds_and_group_size_are_checked():
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        EpochSampler(10, num_replicas=2, rank=2)
    EpochSampler(10, num_replicas=2, rank=1)  # the last rank is fine
    with pytest.raises(ValueError, match="group_size must be positive, got 0"):
        make_sampler("length_grouped", [3, 4], micro_batch_size=0, seed=0)
    assert len(EpochSampler(7, num_replicas=2)) == 4 and len(EpochSampler(7, num_replicas=2, rank=1)) == 4


def test_kinds_are_what_they_say():
    lengths = [5, 50, 7, 40, 3, 60, 8, 30]
    assert list(make_sampler("sequential", lengths, micro_batch_size=2, seed=3)) == list(range(8))
    shuffled = make_sampler("random", lengths, micro_batch_size=2, seed=3)
    assert sorted(shuffled) == list(range(8)) and list(shuffled) != list(range(8))
    grouped = list(make_sampler("length_grouped", lengths, micro_batch_size=2, seed=3, mega_batches=2))
    assert grouped[0] == 5  # the longest example leads (out-of-memory shows at step one)
    assert all(lengths[a] >= lengths[b] for a, b in zip(grouped[:3], grouped[1:4], strict=True))  # sorted in a group
    two = [list(make_sampler("random", lengths, micro_batch_size=2, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(two[0] + two[1]) == list(range(8))  # the ranks shard one order


def test_set_epoch_keeps_a_resumed_skip_in_that_epoch_and_drops_it_in_the_next():
    s = EpochSampler(10, seed=1)
    s.set_epoch(2)
    full = list(s)
    resumed = EpochSampler(10, seed=1)
    resumed.load_state_dict({"epoch": 2, "served": 4, "seed": 1})
    resumed.set_epoch(2)  # Lightning calls set_epoch with the resumed epoch: the skip stays
    assert list(resumed) == full[4:]
    again = EpochSampler(10, seed=1)
    again.load_state_dict({"epoch": 2, "served": 4, "seed": 1})
    again.set_epoch(3)  # a new epoch starts from its beginning
    s.set_epoch(3)
    assert list(again) == list(s) != full
