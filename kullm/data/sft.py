"""Supervised fine-tuning examples: tokenize prompt and response apart, mask the prompt, pad into batches.

:func:`encode_split` turns one split of flat records into the cached Arrow columns (:data:`COLUMNS`); its twin for
conversations is :func:`kullm.data.sft_chat.encode_split`, with the same contract.

The invariant (checked by :func:`check_example`): for an untruncated example the tokens whose label is not -100
decode exactly to ``output + EOS``; for a truncated one, to a prefix of ``output``. A prompt begins with the BOS the
tokenizer's own call would add (:func:`kullm.special_tokens.bos_ids`), masked with the rest of the prompt.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

from kullm.config import defaults
from kullm.data.records import Record
from kullm.data.sources import DataError
from kullm.special_tokens import bos_ids, with_bos
from kullm.templates import Prompter

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# the columns of an encoded split, flat or conversation (kullm.data.sft_chat), as cached
COLUMNS = ["id", "input_ids", "labels", "attention_mask", "length", "prompt_len", "response_len"]
# Text beyond cutoff_len × this many characters cannot reach the first cutoff_len tokens (no real tokenizer has
# tokens that long), so it is cut before tokenizing: a 50 MB row costs kilobytes, not gigabytes.
MAX_CHARS_PER_TOKEN = 128
# The knobs of encoding and padding examples users type most (kullm.config.validate collects this table).
SCHEMA: dict[str, Any] = {
    "data.cutoff_len": int,
    "data.train_on_inputs": bool,
    "data.add_eos": bool,
    "data.verify": bool,
    "pad_to_multiple_of": int,
}
MINIMUM: dict[str, float] = {"data.cutoff_len": 2}


def encode_batch(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    cutoff_len: int,
    train_on_inputs: bool = False,
    add_eos: bool = True,
) -> dict[str, list]:
    """Token ids and labels for a batch of (prompt, response) pairs.

    Prompt and response are tokenized separately and concatenated, so the mask boundary is exact (BPE never merges
    across it). The prompt begins with the tokenizer's BOS where its own call adds one; EOS is appended, then
    everything is cut to ``cutoff_len`` (a truncated answer keeps no EOS: it did not end). Rows whose prompt alone
    fills ``cutoff_len`` have nothing to learn: ``keep`` is False.
    """
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len must be at least 2, got {cutoff_len}")
    budget = cutoff_len * MAX_CHARS_PER_TOKEN
    ids = token_ids(tokenizer, [p[:budget] for p in prompts] + [r[:budget] for r in responses])
    bos = bos_ids(tokenizer)
    p_ids, r_ids = [with_bos(bos, p) for p in ids[: len(prompts)]], ids[len(prompts) :]
    eos = [tokenizer.eos_token_id] if add_eos else []
    input_ids, labels, prompt_len, response_len, truncated, keep = [], [], [], [], [], []
    for p, r in zip(p_ids, r_ids, strict=True):
        n_prompt, n = len(p), len(p) + len(r) + len(eos)
        row = (p + r + eos)[:cutoff_len] if n > cutoff_len else p + r + eos
        input_ids.append(row)
        if train_on_inputs:
            labels.append(list(row))
        else:
            labels.append([IGNORE_INDEX] * min(n_prompt, cutoff_len) + row[n_prompt:])
        prompt_len.append(n_prompt)
        response_len.append(len(r) + len(eos))
        truncated.append(n > cutoff_len)
        keep.append(n_prompt < cutoff_len)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "prompt_len": prompt_len,
        "response_len": response_len,
        "truncated": truncated,
        "keep": keep,
    }


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``, from the Rust tokenizer directly when that is
    the same thing.

    A plain ``tokenizers``-backed tokenizer (transformers' ``TokenizersBackend`` with no Python-level override, no
    truncation or padding set on its backend) gives the same ids from ``encode_batch_fast``, which skips the
    offsets and the per-example Python conversion. Anything else goes through ``tokenizer(...)``.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if _plain_backend(tokenizer, backend):
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def decode_texts(tokenizer, seqs: Sequence[Sequence[int]]) -> list[str]:
    """``tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)`` for each sequence:
    one ``decode_batch`` call into the Rust tokenizer when that is the same thing, else one call per sequence."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if _plain_backend(tokenizer, backend, ("decode", "_decode", "batch_decode")):
        return backend.decode_batch([s if isinstance(s, list) else list(s) for s in seqs], skip_special_tokens=False)
    return [tokenizer.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in seqs]


def _plain_backend(tokenizer, backend, methods: Sequence[str] = ("__call__", "_encode_plus", "encode")) -> bool:
    """Whether ``backend`` (the Rust tokenizer) does what ``tokenizer``'s ``methods`` would: none overridden."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, TokenizersBackend)
        and hasattr(backend, "encode_batch_fast")
        and all(getattr(cls, m) is getattr(TokenizersBackend, m) for m in methods)
        and backend.truncation is None
        and backend.padding is None
        and bool(backend.encode_special_tokens) == bool(getattr(tokenizer, "split_special_tokens", False))
    )


def check_example(
    tokenizer,
    input_ids: Sequence[int],
    labels: Sequence[int],
    output: str,
    add_eos: bool = True,
    *,
    train_on_inputs: bool = False,
    prompt_len: int | None = None,
) -> str:
    """Check the masking invariant on one example; return ``""`` when it holds, else what is wrong.

    With ``train_on_inputs`` every position is trained (labels equal the ids throughout) and the response span
    (after ``prompt_len`` tokens) must decode as the trained span would without it.
    """
    if train_on_inputs and prompt_len is None:
        raise ValueError("check_example with train_on_inputs needs prompt_len")
    return check_batch(
        tokenizer, [input_ids], [labels], [output], [prompt_len or 0], add_eos=add_eos, train_on_inputs=train_on_inputs
    )[0]


def check_batch(
    tokenizer,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    outputs: Sequence[str],
    prompt_lens: Sequence[int],
    *,
    add_eos: bool = True,
    train_on_inputs: bool = False,
) -> list[str]:
    """:func:`check_example` on every row of a batch (``""`` where the invariant holds): the structure is checked
    with list comparisons, and all the trained spans are decoded in one call (:func:`decode_texts`)."""
    eos = tokenizer.eos_token_id
    found: list[str] = []
    spans: list[list[int]] = []  # per row: the trained ids to decode, without the EOS that ends them
    ended: list[bool] = []  # per row: whether the trained span ends with EOS (the answer was not cut)
    for ids, labs, n_prompt in zip(input_ids, labels, prompt_lens, strict=True):
        ids, labs = (x if isinstance(x, list) else list(x) for x in (ids, labs))  # list compares below
        span: list[int] = []
        if len(ids) != len(labs):
            found.append(f"{len(ids)} input ids but {len(labs)} labels")
        elif train_on_inputs and labs != ids:
            found.append("train_on_inputs: some position is not trained, or a label differs from its input id")
        else:
            # without train_on_inputs the masked prompt is the leading -100s: a -100 after a trained label leaves
            # a trained label among the first ``first`` positions
            first = min(n_prompt, len(labs)) if train_on_inputs else labs.count(IGNORE_INDEX)
            if first == len(labs):
                found.append("no token is trained")
            elif not train_on_inputs and labs[:first] != [IGNORE_INDEX] * first:
                found.append("trained positions are not one contiguous span ending the example")
            elif not train_on_inputs and labs[first:] != ids[first:]:
                found.append("a label differs from its input id")
            else:
                found.append("")
                span = ids[first:]
        ended.append(add_eos and bool(span) and span[-1] == eos)
        spans.append(span[:-1] if ended[-1] else span)
    todo = [i for i, f in enumerate(found) if not f]
    for i, text in zip(todo, decode_texts(tokenizer, [spans[i] for i in todo]), strict=True):
        output = outputs[i]
        if ended[i]:
            if text != output:
                found[i] = f"trained tokens decode to {text[:60]!r}…, not the output {output[:60]!r}…"
            continue
        text = text.rstrip("\ufffd")  # a cut inside a multi-byte character
        if not output.startswith(text):
            found[i] = f"truncated trained tokens decode to {text[:60]!r}…, not a prefix of the output {output[:60]!r}…"
    return found


ENCODE_CHUNK = 4096  # rows per tokenizer call: bounds the tokenizer's per-row objects in memory, not the speed


def encode_split(records: list[Record], data: Mapping[str, Any], tokenizer, prompter: Prompter, name: str):
    """Template, tokenize, mask and verify one split of flat records: ``(dataset, counts, violations)``.

    ``ENCODE_CHUNK`` rows per batched tokenizer call (in ``data.num_proc`` processes for large splits), straight
    into Arrow columns; prompt-only rows and invariant violations are dropped and counted. The keys a partial ``data``
    leaves out are ``conf/data/sample.yaml``'s.
    """
    import datasets
    import pyarrow as pa

    data = defaults("data/sample", data)
    cutoff = int(data.cutoff_len)
    settings = {
        "cutoff_len": cutoff,
        "train_on_inputs": bool(data.train_on_inputs),
        "add_eos": bool(data.add_eos),
        "verify": bool(data.verify),
    }
    if not records:
        zero = {"records": 0, "kept": 0, "truncated": 0, "dropped_prompt_too_long": 0, "dropped_invariant": 0}
        return datasets.Dataset.from_dict({c: [] for c in COLUMNS}), zero, []
    ids = [r.id for r in records]
    prompts = [prompter.render(r.instruction, r.input) for r in records]
    outputs = [r.output for r in records]
    num_proc = int(data.num_proc or 1)
    if num_proc > 1 and len(records) >= 1000 * num_proc:  # below that, process start-up costs more than it saves
        raw = datasets.Dataset.from_dict({"id": ids, "prompt": prompts, "output": outputs})
        table = raw.map(
            partial(_encode_rows, tokenizer=tokenizer, **settings),
            input_columns=["prompt", "output"],
            batched=True,
            batch_size=ENCODE_CHUNK,
            num_proc=num_proc,
            remove_columns=["prompt", "output"],
            features=datasets.Features.from_arrow_schema(_schema()),
            desc=f"tokenizing {name}",
        ).data.table
    else:
        with _gc_paused():  # millions of short-lived lists: the cyclic GC would scan them for nothing
            table = pa.concat_tables(
                pa.Table.from_pydict(
                    {"id": ids[i : i + ENCODE_CHUNK]}
                    | _encode_rows(prompts[i : i + ENCODE_CHUNK], outputs[i : i + ENCODE_CHUNK], tokenizer, **settings),
                    schema=_schema(),
                )
                for i in range(0, len(records), ENCODE_CHUNK)
            )
    keep, violation = table.column("keep").to_pylist(), table.column("violation").to_pylist()
    truncated = sum(t and k for t, k in zip(table.column("truncated").to_pylist(), keep, strict=True))
    bad = [f"{i}: {v}" for i, v, k in zip(ids, violation, keep, strict=True) if v and k]
    if bad and data.policy == "strict":
        raise DataError(f"{name}: the masking invariant fails for id {bad[0]} ({len(bad)} example(s) in all)")
    kept = _with_mask(table.filter(pa.array([k and not v for k, v in zip(keep, violation, strict=True)])))
    counts = {
        "records": len(records),
        "kept": kept.num_rows,
        "truncated": int(truncated),
        "dropped_prompt_too_long": len(records) - sum(keep),
        "dropped_invariant": len(bad),
    }
    dropped_ids = [i for i, k in zip(ids, keep, strict=True) if not k]
    if dropped_ids:
        log.warning(
            "%s: %d examples dropped: the prompt alone fills cutoff_len=%d (e.g. id %s)",
            name,
            len(dropped_ids),
            cutoff,
            dropped_ids[0],
        )
    return datasets.Dataset(kept, fingerprint=_table_fingerprint(kept)), counts, bad


def _encode_rows(
    prompts: list[str],
    outputs: list[str],
    tokenizer,
    *,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos: bool,
    verify: bool,
) -> dict[str, list]:
    """Ids, labels, lengths and flags of a chunk of rows, and each kept row's invariant violation (``""``: none)."""
    enc = encode_batch(
        tokenizer, prompts, outputs, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs, add_eos=add_eos
    )
    checked = [i for i, k in enumerate(enc["keep"]) if k] if verify else []
    found = check_batch(
        tokenizer,
        [enc["input_ids"][i] for i in checked],
        [enc["labels"][i] for i in checked],
        [outputs[i] for i in checked],
        [enc["prompt_len"][i] for i in checked],
        add_eos=add_eos,
        train_on_inputs=train_on_inputs,
    )
    enc["violation"] = [""] * len(prompts)
    for i, v in zip(checked, found, strict=True):
        enc["violation"][i] = v
    return enc


@contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector (reference counting still frees everything), then restore it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _table_fingerprint(table) -> str:
    """A hash of the table's bytes (``datasets`` would pickle the whole table to make one)."""
    h = hashlib.blake2b(table.schema.to_string().encode(), digest_size=8)
    for column in table.columns:
        for chunk in column.chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return h.hexdigest()


@cache
def _schema():
    """The encoded columns as ``datasets`` stored them before (ids int32, labels int64), plus the per-row flags."""
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int64())),
            ("prompt_len", pa.int64()),
            ("response_len", pa.int64()),
            ("truncated", pa.bool_()),
            ("keep", pa.bool_()),
            ("violation", pa.string()),
        ]
    )


def _with_mask(table):
    """The kept rows in the cached layout: ``attention_mask`` (all ones) and ``length`` made from the ids' offsets
    in Arrow, no Python lists."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = table.column("input_ids").combine_chunks()
    offsets = pc.subtract(ids.offsets, ids.offsets[0]) if len(ids) else pa.array([0], pa.int32())
    mask = pa.ListArray.from_arrays(offsets, pa.array(np.ones(len(ids.flatten()), dtype=np.int8)))
    length = pc.list_value_length(ids).cast(pa.int64())
    table = table.append_column("attention_mask", mask).append_column("length", length)
    return table.select(["id", "input_ids", "labels", "prompt_len", "response_len", "attention_mask", "length"])


@dataclass
class Collator:
    """Right-pad a list of examples into a batch: ``input_ids`` with the pad id, ``labels`` with -100.

    Lengths are rounded up to ``pad_to_multiple_of`` (tensor-core friendly). Works on examples with
    ``input_ids`` and ``labels`` (and optional ``position_ids`` for packed rows); other keys are ignored.

    The counts the training step needs are made here, on the CPU, so the step never waits for the device to
    learn them: ``trained_positions`` (flat indices ``row × width + t`` of the positions whose next-token label is
    trained, in order), ``n_trained`` (their number) and ``n_tokens`` (non-pad tokens), the last two 0-d tensors;
    ``right_padded`` tells the loss that a causal model needs no padding mask for these rows.
    """

    pad_id: int
    pad_to_multiple_of: int = 8
    label_pad_id: int = IGNORE_INDEX

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not features:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of or 1
        width = -(-longest // m) * m
        n = len(features)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), self.label_pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        has_pos = "position_ids" in features[0]
        position_ids = torch.zeros((n, width), dtype=torch.long) if has_pos else None
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[i, :k] = 1
            if position_ids is not None:
                position_ids[i, :k] = torch.as_tensor(f["position_ids"], dtype=torch.long)
        trained = labels[:, 1:] != IGNORE_INDEX
        rows, cols = trained.nonzero(as_tuple=True)
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "trained_positions": rows * width + cols,
            "n_trained": torch.tensor(len(rows)),
            "n_tokens": attention_mask.sum(),
            "right_padded": True,
        }
        if position_ids is not None:
            batch["position_ids"] = position_ids
        return batch


def padded_tokens(lengths: Sequence[int], pad_to_multiple_of: int = 8) -> int:
    """How many token slots a batch of these lengths occupies once padded."""
    if not lengths:
        return 0
    m = pad_to_multiple_of or 1
    return -(-max(lengths) // m) * m * len(lengths)
