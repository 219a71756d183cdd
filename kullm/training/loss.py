"""Causal-LM loss computed only where it is learned.

:func:`head_only_loss` runs the transformer body, keeps the hidden states of positions whose next-token label is
not -100, and applies the LM head to those rows only (in chunks, each recomputed in backward, so at most
``chunk_size × vocab`` logits are alive at once). On instruction data most positions are prompt or padding, so this
skips most of the ``tokens × vocab`` logits that :func:`full_loss` (the reference path) materialises.

Both return ``(loss_sum, n_trained_tokens)``: cross-entropy summed over trained tokens, and how many there were,
so the caller can normalise per trained token across micro-batches and gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kullm.data.packing import VARLEN_IMPLEMENTATIONS, packed_model_inputs
from kullm.data.sft import IGNORE_INDEX

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the LM head of a plain or PEFT-wrapped HF causal LM.

    PEFT's ``PeftModel.base_model`` is its LoRA wrapper, not the body: unwrap with ``get_base_model()`` first,
    then take the HF model's body (``base_model_prefix``) and ``get_output_embeddings()``.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(lm, "base_model_prefix", "")
    body = getattr(lm, prefix, None) if prefix else None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if body is None or head is None:
        raise TypeError(f"{type(lm).__name__} is not an HF causal LM with a body and an output embedding")
    return body, head


def model_inputs(model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Forward kwargs for a collated batch, always with ``use_cache=False``.

    A packed batch (``position_ids`` with a 2-D padding mask, as the collator makes it) gets its block-causal
    4-D mask here (or none, for a variable-length kernel): a 2-D mask would let packed examples see each other.
    """
    mask = batch.get("attention_mask")
    if batch.get("position_ids") is not None and (mask is None or mask.dim() == 2):
        return packed_model_inputs(batch, model)
    kwargs = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
    kwargs["use_cache"] = False  # a cache makes GPT-NeoX ignore reset position_ids (packed rows leak)
    return kwargs


def _chunk_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def head_only_loss(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    chunk_size: int | None = 1024,
    recompute: bool = True,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained positions, with the LM head applied only to those rows.

    ``batch`` holds ``input_ids`` and ``labels`` (unshifted, -100 = not trained) and optionally
    ``attention_mask`` (2-D, or a 4-D packed mask) and ``position_ids`` (packed rows: see :func:`model_inputs`).
    ``chunk_size`` rows go through the head at a time (None: all at once); with ``recompute`` each chunk's logits
    are recomputed in backward instead of kept, so logit memory stays at one chunk.
    """
    body, head = causal_lm_parts(model)
    hidden = body(**model_inputs(model, batch)).last_hidden_state
    labels = batch["labels"].to(hidden.device)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]  # (n_trained, d)
    t = targets[keep]
    n = int(t.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected (DDP expects every trainable grad)
    size = n if not chunk_size or chunk_size <= 0 else chunk_size
    use_ckpt = recompute and torch.is_grad_enabled() and n > size
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, size):
        hc, tc = h[start : start + size], t[start : start + size]
        if use_ckpt:
            total = total + checkpoint(_chunk_ce, head, hc, tc, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, hc, tc)
    return total, n


def full_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
    """The reference: logits at every position, then summed cross-entropy over trained ones."""
    logits = model(**model_inputs(model, batch)).logits
    labels = batch["labels"].to(logits.device)
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, n


def flatten_packed(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A packed micro-batch as one row of its real tokens (padding dropped).

    transformers finds the example boundaries of a variable-length kernel from reset ``position_ids`` only when the
    batch has a single row; with several rows and no mask it would attend causally across the examples of a row.
    Each row's first label is no target of the row before it, so it is masked: the loss is unchanged.
    """
    valid = batch["attention_mask"].bool()
    labels = batch["labels"].clone()
    labels[1:, 0] = IGNORE_INDEX
    return {
        "input_ids": batch["input_ids"][valid][None],
        "position_ids": batch["position_ids"][valid][None],
        "attention_mask": None,
        "labels": labels[valid][None],
    }


def lm_loss(
    model: torch.nn.Module, batch: Mapping[str, Any], head_only: bool = True, chunk_size: int | None = 1024
) -> tuple[torch.Tensor, int]:
    """Dispatch on ``loss.head_only``: :func:`head_only_loss` or :func:`full_loss`."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if batch.get("position_ids") is not None and impl in VARLEN_IMPLEMENTATIONS and batch["input_ids"].shape[0] > 1:
        batch = flatten_packed(batch)
    if head_only:
        return head_only_loss(model, batch, chunk_size=chunk_size)
    return full_loss(model, batch)
