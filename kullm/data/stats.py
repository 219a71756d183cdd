"""Numbers about a processed dataset: token lengths, the share of tokens trained, padding per sampler."""

from __future__ import annotations

from typing import Any

import numpy as np

from kullm.data.sampling import make_sampler
from kullm.data.sft import IGNORE_INDEX, padded_tokens


def length_summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"median": 0, "p90": 0, "max": 0, "mean": 0}
    return {
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 1),
    }


def token_stats(ds, micro_batch_size: int, pad_to_multiple_of: int = 8, seed: int = 0) -> dict[str, Any]:
    """Token-length summaries, trained-token fraction and padding fraction (random vs length-grouped batches)."""
    if len(ds) == 0:
        return {"examples": 0}
    lengths = np.asarray(ds["length"])
    prompt = np.asarray(ds["prompt_len"])
    response = np.asarray(ds["response_len"])
    trained = int(sum(sum(1 for x in lab if x != IGNORE_INDEX) for lab in ds["labels"]))
    total = int(lengths.sum())
    padding = {
        kind: padding_fraction(lengths, kind, micro_batch_size, pad_to_multiple_of, seed)
        for kind in ("random", "length_grouped")
    }
    return {
        "examples": len(ds),
        "tokens": total,
        "trained_tokens": trained,
        "trained_fraction": round(trained / total, 4) if total else 0.0,
        "prompt_len": length_summary(prompt),
        "response_len": length_summary(response),
        "length": length_summary(lengths),
        "padding_fraction": padding,
        "micro_batch_size": micro_batch_size,
    }


def padding_fraction(lengths: np.ndarray, kind: str, micro_batch_size: int, multiple: int = 8, seed: int = 0) -> float:
    """Share of padded slots in one epoch of micro-batches drawn by sampler ``kind``."""
    order = list(make_sampler(kind, lengths.tolist(), micro_batch_size=micro_batch_size, seed=seed))
    slots = 0
    for i in range(0, len(order), micro_batch_size):
        slots += padded_tokens([int(lengths[j]) for j in order[i : i + micro_batch_size]], multiple)
    return round(1 - float(lengths[order].sum()) / slots, 4) if slots else 0.0


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as a plain-text table for the terminal."""
    read = stats["read"]
    lines = [f"data: {stats['source']}  (cache {'hit' if stats['cache']['hit'] else 'miss'}: {stats['cache']['dir']})"]
    rows: list[tuple[str, Any]] = [("rows read", read["rows"]), ("records", read["records"])]
    if read.get("conversations"):
        rows.append(("  of which conversations", read["conversations"]))
    rows += [(f"rejected: {k}", v) for k, v in sorted(read["rejected"].items())]
    rows += [(f"repaired: {k}", v) for k, v in sorted(read["repaired"].items())]
    rows += [("exact duplicates dropped", read.get("duplicates_dropped", 0))]
    rows += [("colliding ids renamed (rows kept)", read.get("ids_renamed", 0))]
    rows += [("hidden files skipped", read.get("hidden_files_skipped", 0))]
    if read.get("links_skipped"):
        rows.append(("links out of the folder skipped", read["links_skipped"]))
    for name, c in stats["encoded"].items():
        rows += [
            (f"{name}: kept", c["kept"]),
            (f"{name}: truncated", c["truncated"]),
            (f"{name}: dropped (prompt fills cutoff)", c["dropped_prompt_too_long"]),
        ]
    if stats.get("invariant_violations"):
        rows.append(("MASKING INVARIANT VIOLATIONS (dropped)", stats["invariant_violations"]))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {v:>10}" for k, v in rows]
    for name, t in stats["tokens"].items():
        if not t.get("examples"):
            continue
        lines.append(
            f"{name} tokens ({t['examples']} examples, {t['tokens']} tokens, {t['trained_fraction']:.1%} trained)"
        )
        lines.append(f"  {'':<14}{'median':>8}{'p90':>8}{'max':>8}")
        for key in ("prompt_len", "response_len", "length"):
            s = t[key]
            lines.append(f"  {key:<14}{s['median']:>8.0f}{s['p90']:>8.0f}{s['max']:>8}")
        pad = t["padding_fraction"]
        lines.append(
            f"  padding at micro-batch {t['micro_batch_size']}: random {pad['random']:.1%}, "
            f"length-grouped {pad['length_grouped']:.1%}"
        )
    return "\n".join(lines)
