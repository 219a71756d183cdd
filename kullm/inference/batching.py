"""Batching prompts for ``generate``: left padding with an attention mask (no model, no tokenizer)."""

from __future__ import annotations


def left_pad(batch: list[list[int]], pad_id: int):
    """``(input_ids, attention_mask)`` with every row right-aligned, so that generated tokens follow each prompt."""
    import torch

    width = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, x in enumerate(batch):
        if x:
            input_ids[r, width - len(x) :] = torch.tensor(x)
            mask[r, width - len(x) :] = 1
    return input_ids, mask
