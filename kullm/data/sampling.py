"""Training-order samplers: shuffled or length-grouped, deterministic per (seed, epoch), sharded over ranks, resumable.

Every rank computes the same global order for an epoch and takes every ``num_replicas``-th index from
``rank``. ``state_dict`` records the epoch and how many indices this rank has handed out, so a resumed run
continues mid-epoch exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class _ShardedEpochs:
    """What every kullm sampler shares: per-epoch orders, a rank's share of them, and mid-epoch resume.

    ``state_dict`` records the epoch and how many items (indices or batches) this rank has handed out.
    """

    def __init__(self, *, seed: int, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0
        self._start = 0  # items of this epoch already handed out (set by load_state_dict)
        self._served = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def _serve(self, mine: list) -> Iterator:
        """Yield this rank's items, skipping those a resumed epoch already trained."""
        start, self._start = self._start, 0
        self._served = start
        for item in mine[start:]:
            self._served += 1
            yield item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self._served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._start, self.seed = state["epoch"], state["served"], state["seed"]


class EpochSampler(_ShardedEpochs, Sampler[int]):
    """Indices ``0..n-1`` in a per-epoch order; ``shuffle=False`` keeps file order (validation)."""

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(seed=seed, num_replicas=num_replicas, rank=rank)
        self.n, self.shuffle = n, shuffle

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)

    def global_order(self) -> list[int]:
        """The order of all indices this epoch, before sharding."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        if self.n and len(order) % self.num_replicas:  # pad so every rank gets the same count (DDP needs it)
            order += order[: self.num_replicas - len(order) % self.num_replicas]
        yield from self._serve(order[self.rank :: self.num_replicas])


class LengthGroupedSampler(EpochSampler):
    """Shuffled, then sorted by length inside mega-batches, so micro-batches hold similar lengths (less padding).

    A mega-batch holds ``group_size`` indices (``micro_batch_size × world size × mega_batches``); mega-batches
    come in random order, and the longest one goes first so an out-of-memory error shows at step one.
    """

    def __init__(self, lengths: Sequence[int], *, group_size: int, **kwargs) -> None:
        super().__init__(len(lengths), **kwargs)
        if group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.lengths = list(lengths)
        self.group_size = group_size

    def global_order(self) -> list[int]:
        order = super().global_order()
        groups = [order[i : i + self.group_size] for i in range(0, len(order), self.group_size)]
        groups = [sorted(g, key=lambda i: -self.lengths[i]) for g in groups]
        if groups:
            longest = max(range(len(groups)), key=lambda k: self.lengths[groups[k][0]])
            groups[0], groups[longest] = groups[longest], groups[0]
        return [i for g in groups for i in g]


def make_sampler(
    kind: str,
    lengths: Sequence[int],
    *,
    micro_batch_size: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    mega_batches: int = 50,
) -> EpochSampler:
    """``kind`` is ``random``, ``length_grouped`` or ``sequential``."""
    common = {"seed": seed, "num_replicas": num_replicas, "rank": rank}
    if kind == "random":
        return EpochSampler(len(lengths), shuffle=True, **common)
    if kind == "sequential":
        return EpochSampler(len(lengths), shuffle=False, **common)
    if kind == "length_grouped":
        size = micro_batch_size * num_replicas * mega_batches
        return LengthGroupedSampler(lengths, group_size=size, **common)
    raise ValueError(f"unknown sampler {kind!r}: use 'random', 'length_grouped' or 'sequential'")


class TokenBudgetBatchSampler(_ShardedEpochs, Sampler[list[int]]):
    """Micro-batches filled up to a token budget: ``rows × padded max length <= token_budget`` in every batch.

    Per epoch (deterministic in ``seed + epoch``): shuffle, cut into mega-batches of ``group_size`` indices, sort
    each by length (longest first) and fill batches greedily, so similar lengths share a batch; then shuffle the
    batches in groups of ``num_replicas`` consecutive ones, so the ranks of one step get batches of similar size.
    Every rank gets the same number of batches (the last group is completed by repeating the epoch's first
    batches, as DistributedSampler repeats indices). ``state_dict`` records how many batches this rank served.
    Use as ``DataLoader(ds, batch_sampler=...)``; the loss must be normalised per trained token, since batches
    hold different numbers of rows.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        token_budget: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        group_size: int = 1024,
        pad_to_multiple_of: int = 8,
        max_rows: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(seed=seed, num_replicas=num_replicas, rank=rank)
        self.lengths = [int(n) for n in lengths]
        self.multiple = max(1, pad_to_multiple_of or 1)
        longest = self._padded(max(self.lengths, default=0))
        if longest > token_budget:
            raise ValueError(
                f"token_budget={token_budget} is smaller than the longest example padded to a multiple of "
                f"{self.multiple} ({longest} tokens): raise the budget or lower cutoff_len"
            )
        if group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.token_budget, self.shuffle = token_budget, shuffle
        self.group_size, self.max_rows = group_size, max_rows
        self._cache: tuple[int, int, list[list[int]]] | None = None

    @property
    def batch_size(self) -> int:
        """Rows per batch on average (what DeepSpeed reads for its throughput logging; batches really vary)."""
        batches = self.global_batches()
        return max(1, round(len(self.lengths) / max(1, len(batches))))

    def _padded(self, n: int) -> int:
        return -(-n // self.multiple) * self.multiple

    def global_batches(self) -> list[list[int]]:
        """All batches of this epoch, before sharding over ranks."""
        if self._cache is not None and self._cache[:2] == (self.seed, self.epoch):
            return self._cache[2]
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        batches: list[list[int]] = []
        for s in range(0, n, self.group_size):
            group = order[s : s + self.group_size]
            if self.shuffle:
                group.sort(key=lambda i: -self.lengths[i])
            cur: list[int] = []
            width = 0
            for i in group:
                w = max(width, self._padded(self.lengths[i]))
                full = self.max_rows is not None and len(cur) >= self.max_rows
                if cur and (w * (len(cur) + 1) > self.token_budget or full):
                    batches.append(cur)
                    cur, w = [], self._padded(self.lengths[i])
                cur.append(i)
                width = w
            if cur:
                batches.append(cur)
        r = self.num_replicas
        if batches and len(batches) % r:
            batches += batches[: r - len(batches) % r]
        if self.shuffle:
            steps = [batches[k : k + r] for k in range(0, len(batches), r)]
            perm = torch.randperm(len(steps), generator=g).tolist()
            batches = [b for k in perm for b in steps[k]]
        self._cache = (self.seed, self.epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self.global_batches()) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._serve(self.global_batches()[self.rank :: self.num_replicas])
