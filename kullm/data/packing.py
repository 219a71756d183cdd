"""Padding-free training: pack examples into rows of up to ``cutoff_len`` tokens without cross-contamination.

A packed row is several examples back to back. Three things keep them independent:

- ``position_ids`` restart at 0 for each example (rotary embeddings see the same positions as unpacked);
- attention is block-diagonal causal, built at forward time from those positions (:mod:`kullm.training.attention`);
- the first token of every example after the first is labelled -100, so the last token of one example never learns
  to predict the first token of the next (it matters with ``train_on_inputs=true``, where that label is not masked).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kullm.data.sft import IGNORE_INDEX

log = logging.getLogger(__name__)

PACKED_COLUMNS = ["input_ids", "labels", "position_ids", "seq_lens", "length"]


@dataclass(frozen=True)
class PackStats:
    """What packing did: ``fill_rate`` is tokens ÷ (rows × cutoff_len)."""

    examples: int
    rows: int
    tokens: int
    cutoff_len: int
    fill_rate: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pack_bins(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example lengths into bins of ``capacity`` tokens.

    Examples are ordered longest first (ties in a seed-shuffled order, so the result is deterministic given the
    seed); each goes into the open bin with the least room that still fits it, else a new bin. Returns the
    example indices of each bin, in bin-creation order. O(n log capacity).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i = too_long[0]
        raise ValueError(f"example {i} has {lengths[i]} tokens, more than cutoff_len={capacity}: truncate it first")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> bins with exactly that room
    rooms: list[int] = []  # sorted room values that have at least one bin
    for i in order:
        n = lengths[i]
        if n == 0:
            continue
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(b)
    return bins


def pack_examples(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    cutoff_len: int,
    seed: int = 0,
) -> tuple[dict[str, list], PackStats]:
    """Pack examples into rows (columns of :data:`PACKED_COLUMNS`) and report the fill rate."""
    lengths = [len(x) for x in input_ids]
    bins = pack_bins(lengths, cutoff_len, seed=seed)
    out: dict[str, list] = {k: [] for k in PACKED_COLUMNS}
    for members in bins:
        ids: list[int] = []
        labs: list[int] = []
        pos: list[int] = []
        for j, i in enumerate(members):
            ex_labels = list(labels[i])
            if len(ex_labels) != lengths[i]:
                raise ValueError(f"example {i}: {lengths[i]} input ids but {len(ex_labels)} labels")
            if j > 0:
                ex_labels[0] = IGNORE_INDEX  # the previous example must not learn to predict this one's start
            ids.extend(input_ids[i])
            labs.extend(ex_labels)
            pos.extend(range(lengths[i]))
        out["input_ids"].append(ids)
        out["labels"].append(labs)
        out["position_ids"].append(pos)
        out["seq_lens"].append([lengths[i] for i in members])
        out["length"].append(len(ids))
    tokens = sum(out["length"])
    rows = len(bins)
    stats = PackStats(
        examples=sum(1 for n in lengths if n > 0),
        rows=rows,
        tokens=tokens,
        cutoff_len=cutoff_len,
        fill_rate=tokens / (rows * cutoff_len) if rows else 1.0,
    )
    return out, stats


def pack_dataset(dataset, cutoff_len: int, seed: int = 0):
    """Pack a processed split (a ``datasets.Dataset`` with ``input_ids`` and ``labels``) into a new ``Dataset``.

    Returns ``(packed_dataset, PackStats)``; the packed rows have the columns of :data:`PACKED_COLUMNS`.
    """
    import datasets

    cols = dataset.select_columns(["input_ids", "labels"]).to_dict()
    packed, stats = pack_examples(cols["input_ids"], cols["labels"], cutoff_len, seed=seed)
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "position_ids": datasets.Sequence(datasets.Value("int32")),
            "seq_lens": datasets.Sequence(datasets.Value("int32")),
            "length": datasets.Value("int32"),
        }
    )
    log.info(
        "packed %d examples into %d rows of <= %d tokens (fill rate %.1f%%)",
        stats.examples,
        stats.rows,
        cutoff_len,
        100 * stats.fill_rate,
    )
    return datasets.Dataset.from_dict(packed, features=features), stats
