"""Training rows that overlap the evaluation set: found before training, refused unless explicitly allowed.

KULLM's own ``data/kullm-v1.jsonl`` is the (English) evaluation set, so "train on v1, evaluate on the 252 items"
silently scores a model on its training data. A training record overlaps when its instruction (whitespace- and
case-normalised) or its id equals one of the evaluation set's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kullm.data.records import ReadOptions, Record, read_records
from kullm.data.sources import DataError

log = logging.getLogger(__name__)


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def eval_overlap(records: Sequence[Record], eval_set: str | Path | None) -> list[str]:
    """Ids of ``records`` that share an instruction or an id with ``eval_set`` ([] when it is absent)."""
    if not eval_set or not Path(str(eval_set)).expanduser().is_file():
        return []
    evals, _ = read_records(eval_set, ReadOptions(source="files", require_output=False, allow_empty_output=True))
    instructions = {normalise(r.instruction) for r in evals} - {""}  # an empty instruction (the text is the input)
    ids = {r.id for r in evals}
    return [r.id for r in records if r.id in ids or normalise(r.instruction) in instructions]


def check_overlap(data: Mapping[str, Any], overlap: Sequence[str]) -> None:
    """Refuse training on rows of the evaluation set unless ``data.allow_eval_overlap``; warn loudly if allowed."""
    if not overlap:
        return
    msg = (
        f"{len(overlap)} training row(s) share an instruction or id with the evaluation set {data['eval_set']} "
        f"(e.g. {', '.join(map(repr, overlap[:3]))}): a model trained on them is scored on its own training data"
    )
    if not data["allow_eval_overlap"]:
        raise DataError(f"{msg}; remove them, or set data.allow_eval_overlap=true to train anyway")
    log.warning("CONTAMINATION: %s (data.allow_eval_overlap=true)", msg)
