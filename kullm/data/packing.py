"""Padding-free training: pack examples into rows of up to ``cutoff_len`` tokens without cross-contamination.

A packed row is several examples back to back. Three things keep them independent:

- ``position_ids`` restart at 0 for each example (rotary embeddings see the same positions as unpacked);
- attention is block-diagonal causal: a 4-D float additive mask for eager/SDPA (:func:`block_causal_mask`), or no
  mask at all for a variable-length kernel (flash-attn), which transformers drives from the reset ``position_ids``;
- the first token of every example after the first is labelled -100, so the last token of one example never learns
  to predict the first token of the next (it matters with ``train_on_inputs=true``, where that label is not masked).

The model must run with ``use_cache=False``: in transformers 5 a GPT-NeoX forward with the cache on builds a
``DynamicCache`` even in train mode and then ignores the reset positions, so examples silently attend to each other.
:func:`packed_model_inputs` returns the kwargs with ``use_cache=False`` in them.
"""

from __future__ import annotations

import bisect
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kullm.data.sft import IGNORE_INDEX

log = logging.getLogger(__name__)

PACKED_COLUMNS = ["input_ids", "labels", "position_ids", "seq_lens", "length"]
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


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


def segment_ids(
    seq_lens_or_position_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    length: int | None = None,
) -> torch.Tensor:
    """Per-token example index within its row, ``(batch, L)``; -1 marks padding.

    From ``position_ids`` (a tensor), an example starts wherever the position is 0; from ``seq_lens`` (lists of
    example lengths per row), rows are laid out left to right and padded to ``length`` (default: the longest row).
    """
    if isinstance(seq_lens_or_position_ids, torch.Tensor):
        pos = seq_lens_or_position_ids
        if pos.dim() == 1:
            pos = pos.unsqueeze(0)
        seg = torch.cumsum((pos == 0).long(), dim=-1) - 1
    else:
        rows = [list(r) for r in seq_lens_or_position_ids]
        width = length if length is not None else max((sum(r) for r in rows), default=0)
        seg = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, lens in enumerate(rows):
            if sum(lens) > width:
                raise ValueError(f"row {b} holds {sum(lens)} tokens, more than length={width}")
            seg[b, : sum(lens)] = torch.repeat_interleave(
                torch.arange(len(lens)), torch.as_tensor(lens, dtype=torch.long)
            )
    if attention_mask is not None:
        seg = seg.masked_fill(attention_mask.to(seg.device) == 0, -1)
    return seg


def block_causal_mask(
    seq_lens_or_position_ids: torch.Tensor | Sequence[Sequence[int]],
    dtype: torch.dtype = torch.float32,
    *,
    attention_mask: torch.Tensor | None = None,
    length: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A 4-D additive mask ``(batch, 1, L, L)``: 0 where query i may attend key j, ``finfo(dtype).min`` elsewhere.

    Query i attends key j iff both are in the same example and j <= i. Padding keys are never attended; a padding
    query attends only itself, so no softmax row is empty (an all-masked row gives NaN in SDPA's backward).
    Float, not bool: transformers' eager attention adds the mask, and a bool mask there is silently wrong.
    """
    seg = segment_ids(seq_lens_or_position_ids, attention_mask=attention_mask, length=length)
    if device is not None:
        seg = seg.to(device)
    n = seg.shape[-1]
    idx = torch.arange(n, device=seg.device)
    causal = idx[None, :] <= idx[:, None]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
    allowed = (same & causal) | torch.eye(n, dtype=torch.bool, device=seg.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def varlen_kernel_available() -> bool:
    """Whether a variable-length attention kernel (flash-attn) is installed and usable (CUDA)."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def varlen_attn_implementation() -> str | None:
    """The ``attn_implementation`` to load the model with for packed training, or None to keep eager/SDPA + mask."""
    return "flash_attention_2" if varlen_kernel_available() else None


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype attention scores are computed in: the autocast dtype when autocast is on, else the weights'."""
    param = next(model.parameters())
    kind = param.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return param.dtype if param.dtype.is_floating_point else torch.float32


def packed_model_inputs(batch: Mapping[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Model kwargs for a collated packed batch: ``input_ids``, ``position_ids``, the mask, and ``use_cache=False``.

    With a variable-length kernel (the model loaded with ``attn_implementation="flash_attention_2"``) no mask is
    passed: transformers finds the example boundaries from the reset ``position_ids``. Otherwise the mask is the
    4-D block-causal float mask of :func:`block_causal_mask` in the attention compute dtype. ``labels`` are not
    included (pass them to a loss function).
    """
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)  # None (no config): the mask
    out: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    if impl in VARLEN_IMPLEMENTATIONS:
        return out
    if impl == "flex_attention":
        raise ValueError("packed training with flex_attention is not supported here: use sdpa, eager or flash-attn")
    out["attention_mask"] = block_causal_mask(
        position_ids,
        compute_dtype(model),
        attention_mask=batch.get("attention_mask"),
        device=input_ids.device,
    )
    return out
