"""Adequacy on a sample: back-translate some translated fields into English and compare them with their sources.

A translation that reads as fluent Korean and passes every other gate can still say something else (an LLM that
paraphrased freely, a DeepL sentence dropped). ``qc.adequacy.sample`` fields (chosen by a hash of their key, so the
same fields on every run) are translated back with the same backend reversed (``qc.adequacy.reverse.<backend>``:
DeepL KO→EN-US, an LLM with a Korean→English prompt) through the same cache, so a rerun asks nothing again. The
similarity is the F1 of the words the back-translation shares with the source (lower-cased, spans masked out on
both sides); a field under ``min_similarity`` gets the verdict ``inadequate`` (a flag by default).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

WORD = re.compile(r"[^\W_]+", re.UNICODE)


def similarity(source: str, back: str) -> float:
    """Word-overlap F1 between a source and its back-translation (1.0: the same words; 0.0: none shared)."""
    a, b = Counter(w.lower() for w in WORD.findall(source)), Counter(w.lower() for w in WORD.findall(back))
    shared = sum((a & b).values())
    if not shared:
        return 0.0
    precision, recall = shared / sum(b.values()), shared / sum(a.values())
    return 2 * precision * recall / (precision + recall)


def sample_keys(keys: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` of ``keys``, the same ones on every run (the smallest hashes of seed and key)."""
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    return ranked[: max(n, 0)]


def reverse_config(backend: DictConfig | Mapping[str, Any], reverse: Mapping[str, Any]) -> dict[str, Any]:
    """The ``backend=`` node turned around (its own keys, unresolved, with ``reverse.<name>`` over them)."""
    node = OmegaConf.to_container(backend, resolve=False) if isinstance(backend, DictConfig) else dict(backend)
    over = reverse.get(node["name"]) or {}
    if isinstance(over, DictConfig):
        over = OmegaConf.to_container(over, resolve=True)
    return {**node, **dict(over)}
