"""Preference rows → token ids and labels with exact masks, and the collators that batch them.

Every answer is rendered as the last assistant turn of its prompt, through the same renderers as SFT
(:mod:`kullm.data.sft_chat`: the ``template=`` prompt, or the tokenizer's own chat template), each piece tokenized
apart: the prompt's ids are the same for the chosen and the rejected answer (checked), its labels -100, and each
answer is trained exactly. The invariant, checked on every example (``data.verify``): the trained tokens of each
answer decode to its text plus the end-of-turn token (a prefix of the text when cut at ``cutoff_len``). The prompt
is always kept whole and each answer cut so its row fits ``cutoff_len``; a pair whose prompt alone fills it is dropped
and counted (``dropped_prompt_too_long``), as is a row the template cannot render or whose masks break the invariant
(``dropped_invariant``, named by id).

Columns (:data:`PAIR_COLUMNS`, :data:`KTO_COLUMNS`): see ``docs/data.md#preference-data``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kullm.config import defaults
from kullm.data.conversations import ASSISTANT, USER
from kullm.data.preference import KTO, PAIRS, PairRecord, PrefRecord, kto_rows
from kullm.data.records import Record
from kullm.data.sft import IGNORE_INDEX, Collator
from kullm.data.sft_chat import (
    Piece,
    Unrenderable,
    check_conversation,
    encode_conversations,
    render_with_prompter,
    render_with_tokenizer,
)
from kullm.data.sources import DataError

log = logging.getLogger(__name__)

# the columns of an encoded split, as cached
PAIR_COLUMNS = [
    "id",
    "chosen_input_ids",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_labels",
    "prompt_len",
    "length",
]
KTO_COLUMNS = ["id", "input_ids", "labels", "label", "prompt_len", "response_len", "length"]
# reference log-probs a paired split may carry (objective.precompute_ref adds them after preprocessing): the
# datamodule keeps them and PairCollator batches them as ``ref_logps``
REF_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps"]


def columns(kind: str) -> list[str]:
    """The columns a split of ``data.kind`` rows may have (SFT's are :data:`kullm.data.sft.COLUMNS`; a paired
    split's may add :data:`REF_COLUMNS`)."""
    from kullm.data.sft import COLUMNS

    return {PAIRS: PAIR_COLUMNS + REF_COLUMNS, KTO: KTO_COLUMNS}.get(kind, COLUMNS)


def _as_record(rec: PrefRecord, answer: str) -> Record:
    """The record SFT would render for ``answer`` after ``rec``'s prompt: a flat row for a one-string prompt (the
    single-turn prompt, exactly as SFT), else the conversation with ``answer`` as its last assistant turn."""
    if rec.flat:
        ((_, prompt),) = rec.prompt
        return Record(rec.id, prompt, "", answer, rec.source)
    turns = (*rec.prompt, (ASSISTANT, answer))
    first_user = next(text for role, text in rec.prompt if role == USER)
    return Record(rec.id, first_user, "", answer, rec.source, turns)


def _render(tokenizer, prompter, renderer: str, record: Record) -> list[Piece]:
    if renderer == "tokenizer":
        return render_with_tokenizer(tokenizer, record)
    return render_with_prompter(prompter, tokenizer, record)


def _encode(
    answers: Sequence[Sequence[Record]], data: Mapping[str, Any], tokenizer, prompter, name: str
) -> tuple[list[tuple[int, int]], dict[str, list], list[str], list[str]]:
    """Render and encode each group of answers to one prompt (a pair: two; a KTO row: one).

    Returns ``(group, first row)`` of each kept group (the rows of ``encode_conversations``'s output, the groups'
    answers in order), the encoding, the groups dropped as unrenderable or breaking the invariant (``"id: why"``),
    and the ids of those whose prompt alone fills ``cutoff_len``.
    """
    cutoff = int(data.cutoff_len)
    renderer = data.chat_template or "template"
    strict = data.policy == "strict"
    bad: list[str] = []
    rendered: list[list[Piece]] = []
    placed: list[tuple[int, int]] = []  # (group, its first row in the encoding)
    for g, group in enumerate(answers):
        try:
            pieces = [_render(tokenizer, prompter, renderer, r) for r in group]
        except Unrenderable as e:
            if strict:
                raise DataError(f"{group[0].source}: id {group[0].id}: {e}") from None
            bad.append(f"{group[0].id}: {e}")
            continue
        placed.append((g, len(rendered)))
        rendered += pieces
    enc = encode_conversations(tokenizer, rendered, cutoff_len=cutoff, train_on="last") if rendered else {}
    kept: list[tuple[int, int]] = []
    too_long: list[str] = []
    for g, first in placed:
        rows = range(first, first + len(answers[g]))
        rid = answers[g][0].id
        n_prompt = enc["prompt_len"][first]
        if n_prompt >= cutoff:
            too_long.append(rid)
            continue
        problem = ""
        prompt_ids = enc["input_ids"][first][:n_prompt]
        if any(enc["prompt_len"][i] != n_prompt or enc["input_ids"][i][:n_prompt] != prompt_ids for i in rows):
            problem = "the prompt tokenizes differently before the chosen and the rejected answer"
        for i in rows if data.verify and not problem else ():
            problem = check_conversation(
                tokenizer,
                enc["input_ids"][i],
                enc["labels"][i],
                enc["spans"][i],
                train_on="last",
                text=enc["text"][i],
                truncated=enc["truncated"][i],
            )
            if problem:
                break
        if problem:
            if strict:
                raise DataError(f"{name}: the masking invariant fails for id {rid}: {problem}")
            bad.append(f"{rid}: {problem}")
            continue
        kept.append((g, first))
    if too_long:
        log.warning(
            "%s: %d preference rows dropped: the prompt alone fills cutoff_len=%d (e.g. id %s)",
            name,
            len(too_long),
            cutoff,
            too_long[0],
        )
    return kept, enc, bad, too_long


def encode_pairs(records: Sequence[PrefRecord], data: Mapping[str, Any], tokenizer, prompter, name: str):
    """Encode one split of preference pairs: ``(dataset, counts, violations)``, as :func:`kullm.data.sft.encode_split`.

    The keys a partial ``data`` leaves out are ``conf/data/sample.yaml``'s.
    """

    data = defaults("data/sample", data)
    pairs = [r for r in records if isinstance(r, PairRecord)]
    if len(pairs) != len(records):
        raise DataError(f"{name}: KTO rows (prompt/completion/label) cannot make preference pairs")
    groups = [(_as_record(r, r.chosen), _as_record(r, r.rejected)) for r in pairs]
    kept, enc, bad, too_long = _encode(groups, data, tokenizer, prompter, name)
    rows: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    truncated = 0
    for g, c in kept:
        rec, r = pairs[g], c + 1
        rows["id"].append(rec.id)
        for side, i in (("chosen", c), ("rejected", r)):
            rows[f"{side}_input_ids"].append(enc["input_ids"][i])
            rows[f"{side}_labels"].append(enc["labels"][i])
        rows["prompt_len"].append(enc["prompt_len"][c])
        rows["length"].append(max(len(enc["input_ids"][c]), len(enc["input_ids"][r])))
        truncated += bool(enc["truncated"][c] or enc["truncated"][r])
    counts = {
        "records": len(records),
        "kept": len(rows["id"]),
        "truncated": truncated,
        "dropped_prompt_too_long": len(too_long),
        "dropped_invariant": len(bad),
    }
    return _dataset(rows, PAIR_COLUMNS), counts, bad


def encode_kto(records: Sequence[PrefRecord], data: Mapping[str, Any], tokenizer, prompter, name: str):
    """Encode one split of KTO rows (pairs split by :func:`kullm.data.preference.kto_rows` first):
    ``(dataset, counts, violations)``; the counts add ``desirable`` and ``undesirable`` (kept rows)."""
    data = defaults("data/sample", data)
    rows_in = kto_rows(records)
    groups = [(_as_record(r, r.completion),) for r in rows_in]
    kept, enc, bad, too_long = _encode(groups, data, tokenizer, prompter, name)
    rows: dict[str, list] = {c: [] for c in KTO_COLUMNS}
    truncated = 0
    for g, s in kept:
        rec = rows_in[g]
        rows["id"].append(rec.id)
        rows["input_ids"].append(enc["input_ids"][s])
        rows["labels"].append(enc["labels"][s])
        rows["label"].append(rec.label)
        rows["prompt_len"].append(enc["prompt_len"][s])
        rows["response_len"].append(enc["response_len"][s])
        rows["length"].append(len(enc["input_ids"][s]))
        truncated += bool(enc["truncated"][s])
    counts = {
        "records": len(rows_in),
        "kept": len(rows["id"]),
        "truncated": truncated,
        "dropped_prompt_too_long": len(too_long),
        "dropped_invariant": len(bad),
        "desirable": sum(rows["label"]),
        "undesirable": len(rows["label"]) - sum(rows["label"]),
    }
    return _dataset(rows, KTO_COLUMNS), counts, bad


def _dataset(rows: dict[str, list], names: list[str]):
    import datasets

    return datasets.Dataset.from_dict({c: rows[c] for c in names})


def as_sequence(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """One example as an SFT-shaped row (``input_ids``, ``labels``, ``prompt_len``): a pair's chosen answer (what a
    sample generation continues); a KTO or SFT row as it is."""
    if "chosen_input_ids" not in row:
        return row
    return {
        "id": row["id"],
        "input_ids": row["chosen_input_ids"],
        "labels": row["chosen_labels"],
        "prompt_len": row["prompt_len"],
    }


def stats_view(ds):
    """A split as single sequences for :func:`kullm.data.stats.token_stats`: a paired split's chosen rows, then its
    rejected rows (``input_ids``, ``labels``, ``length``, ``prompt_len``, ``response_len``); another split as it is."""
    import datasets

    if "chosen_input_ids" not in ds.column_names:
        return ds
    seqs: dict[str, list] = {k: [] for k in ("input_ids", "labels", "length", "prompt_len", "response_len")}
    for side in ("chosen", "rejected"):
        for ids, labels, n_prompt in zip(ds[f"{side}_input_ids"], ds[f"{side}_labels"], ds["prompt_len"], strict=True):
            seqs["input_ids"].append(ids)
            seqs["labels"].append(labels)
            seqs["length"].append(len(ids))
            seqs["prompt_len"].append(n_prompt)
            seqs["response_len"].append(len(ids) - min(n_prompt, len(ids)))
    return datasets.Dataset.from_dict(seqs)


# --- batches --------------------------------------------------------------------------------------------------


@dataclass
class PairCollator:
    """Pairs → one batch of 2B right-padded rows: the B chosen answers, then the B rejected ones in the same order.

    The keys are :class:`kullm.data.sft.Collator`'s (``input_ids``, ``labels`` with -100 on prompt and padding,
    ``attention_mask``, ``trained_positions``, ``n_trained``, ``n_tokens``, ``right_padded``) and ``n_pairs`` (B);
    rows carrying precomputed reference log-probs (:data:`REF_COLUMNS`) add ``ref_logps``, float64 of 2B (chosen,
    then rejected, like the rows).
    """

    pad_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        features = [
            {"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"]}
            for side in ("chosen", "rejected")
            for r in rows
        ]
        batch = Collator(self.pad_id, self.pad_to_multiple_of)(features)
        batch["n_pairs"] = len(rows)
        if REF_COLUMNS[0] in rows[0]:
            import torch

            logps = [r[REF_COLUMNS[0]] for r in rows] + [r[REF_COLUMNS[1]] for r in rows]
            batch["ref_logps"] = torch.tensor(logps, dtype=torch.float64)
        return batch


def collate_pairs(rows: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, Any]:
    """:class:`PairCollator` as a function."""
    return PairCollator(pad_id, pad_to_multiple_of)(rows)


@dataclass
class KtoCollator:
    """KTO rows → one batch of 2B right-padded rows: the B examples, then B mismatched rows for KTO's KL estimate
    (example i's prompt with example (i+1) mod B's answer, labels -100 on the prompt, cut to ``max_len``).

    The keys are :class:`kullm.data.sft.Collator`'s, ``label`` (a bool tensor of B: desirable) and ``n_examples``
    (B). With B = 1 the mismatched row is the example itself.
    """

    pad_id: int
    pad_to_multiple_of: int = 8
    max_len: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not rows:
            raise ValueError("cannot collate an empty batch")
        n = len(rows)
        features = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        for i, r in enumerate(rows):
            other = rows[(i + 1) % n]
            p, q = int(r["prompt_len"]), int(other["prompt_len"])
            answer = list(other["input_ids"][q:])
            ids = list(r["input_ids"][:p]) + answer
            labels = [IGNORE_INDEX] * p + answer
            if self.max_len is not None:
                ids, labels = ids[: self.max_len], labels[: self.max_len]
            features.append({"input_ids": ids, "labels": labels})
        batch = Collator(self.pad_id, self.pad_to_multiple_of)(features)
        batch["label"] = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
        batch["n_examples"] = n
        return batch


def collate_kto(
    rows: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 8, max_len: int | None = None
) -> dict[str, Any]:
    """:class:`KtoCollator` as a function."""
    return KtoCollator(pad_id, pad_to_multiple_of, max_len)(rows)


def collator(kind: str, pad_id: int, pad_to_multiple_of: int = 8, max_len: int | None = None):
    """The collator for a split of ``data.kind`` rows."""
    if kind == PAIRS:
        return PairCollator(pad_id, pad_to_multiple_of)
    if kind == KTO:
        return KtoCollator(pad_id, pad_to_multiple_of, max_len)
    return Collator(pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
