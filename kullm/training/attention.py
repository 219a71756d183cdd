"""Attention over packed rows, built at forward time: the examples of a row must not see each other.

A packed row (:mod:`kullm.data.packing`) is several examples back to back, with ``position_ids`` restarting at 0 for
each. Attention must be block-diagonal causal: a 4-D float additive mask for eager/SDPA (:func:`block_causal_mask`),
or no mask at all for a variable-length kernel (flash-attn), which transformers drives from the reset
``position_ids``.

The model must run with ``use_cache=False``: in transformers 5 a GPT-NeoX forward with the cache on builds a
``DynamicCache`` even in train mode and then ignores the reset positions, so examples silently attend to each other.
:func:`packed_model_inputs` returns the kwargs with ``use_cache=False`` in them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import torch

VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


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
