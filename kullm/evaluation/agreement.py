"""How far two judges agree on the same answers: Spearman and Kendall rank correlation, mean absolute difference.

An open-weight judge is trusted once it ranks answers as the pinned judge did; these numbers say how closely.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def agreement(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Spearman's rho, Kendall's tau-b (scipy's, ties handled) and the mean absolute difference of paired scores.

    ``None`` stands for a correlation that is undefined (fewer than two pairs, or one judge gave every answer the
    same score); ``n`` is the number of pairs.
    """
    from scipy.stats import kendalltau, spearmanr

    if len(a) != len(b):
        raise ValueError(f"agreement needs paired scores, got {len(a)} and {len(b)}")
    n = len(a)
    out: dict[str, Any] = {"n": n, "spearman": None, "kendall": None, "mae": None}
    if n == 0:
        return out
    out["mae"] = sum(abs(x - y) for x, y in zip(a, b, strict=True)) / n
    if n >= 2 and len(set(a)) > 1 and len(set(b)) > 1:
        out["spearman"] = _finite(spearmanr(a, b).statistic)
        out["kendall"] = _finite(kendalltau(a, b).statistic)
    return out


def paired(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[list[float], list[float]]:
    """The scores two judges both gave, matched by key (sorted, so the pairing never depends on file order)."""
    keys = sorted(set(a) & set(b))
    return [a[k] for k in keys], [b[k] for k in keys]


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
