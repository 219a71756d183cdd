"""Training-order samplers: shuffled or length-grouped, deterministic per (seed, epoch), sharded over ranks, resumable.

Every rank computes the same global order for an epoch and takes every ``num_replicas``-th index from
``rank``. ``state_dict`` records the epoch and how many indices this rank has handed out, so a resumed run
continues mid-epoch exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
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
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._start = 0  # indices of this epoch already handed out (set by load_state_dict)
        self._served = 0

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

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
        mine = order[self.rank :: self.num_replicas]
        start, self._start = self._start, 0
        self._served = start
        for i in mine[start:]:
            self._served += 1
            yield i

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self._served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._start, self.seed = state["epoch"], state["served"], state["seed"]


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
