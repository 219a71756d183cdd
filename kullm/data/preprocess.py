"""Records → held-out split → token ids and masks → a cached ``DatasetDict`` (``train`` and ``validation``).

The cache key covers everything that changes the result: the data's bytes (or the hub dataset's fingerprint),
field names and policy, the tokenizer, the template strings, ``cutoff_len``, ``train_on_inputs``, ``add_eos``,
``val_set_size`` and ``seed``. A second run with the same inputs loads from disk in seconds, after checking the
files against the checksums written with them (a damaged entry is rebuilt, with one warning line).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

from kullm.atomic import clean_stale, discard, replace
from kullm.data.contamination import check_overlap, eval_overlap
from kullm.data.records import DataError, Fields, Record, data_files, read_records, write_rejects
from kullm.data.sft import check_batch, encode_batch
from kullm.data.turns import chat_settings, encode_split
from kullm.modeling import cache_root, tokenizer_fingerprint
from kullm.templates import Prompter

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 3: mask-invariant violations dropped; 2: colliding ids renamed, exact duplicates dropped
COLUMNS = ["id", "input_ids", "labels", "attention_mask", "length", "prompt_len", "response_len"]
CHECKSUMS = "checksums.json"  # size and sha256 of every other file of a cache entry, written last
MAX_HELD_OUT = 0.2  # a larger share of the records held out for validation is warned about


@dataclass
class Processed:
    """The processed splits, what happened on the way, and where the cache lives."""

    dataset: Any  # datasets.DatasetDict with "train" and "validation"
    stats: dict[str, Any]
    cache_dir: Path
    cache_hit: bool

    @property
    def rejects_path(self) -> Path:
        return self.cache_dir / "rejects.jsonl"


def preprocess(
    data: Mapping[str, Any], tokenizer, prompter: Prompter, cache_dir: str | Path | None = None
) -> Processed:
    """Read, split, tokenize and cache the data described by a ``data=`` config node."""
    import datasets

    key = cache_key(data, tokenizer, prompter)
    root = Path(cache_dir or data.get("cache_dir") or cache_root() / "processed").expanduser()
    target = root / key
    if target.is_dir() and _intact(target):
        stats = json.loads((target / "stats.json").read_text(encoding="utf-8"))
        _warn_held_out(data, stats["split"])
        eval_set = _eval_set(data)
        if stats.get("eval_set") != eval_set:  # cached against another evaluation set: look again
            stats["eval_set"], stats["eval_overlap_ids"] = eval_set, eval_overlap(_read(data)[0], eval_set)
        check_overlap(data, stats["eval_overlap_ids"])
        ds = load_processed(target / "dataset")
        log.info("loaded processed data from cache %s", target)
        return Processed(ds, stats, target, cache_hit=True)

    clean_stale(root)
    tmp = root / f"{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    records, report = _read(data)
    if report.rejects:  # written with the cache; named by where it will be once the cache is in place
        write_rejects(report.rejects, tmp / "rejects.jsonl")
        log.warning("rejected rows with file:line and reason: %s", target / "rejects.jsonl")
    if not records:
        raise DataError(f"{data['path']}: no usable record ({report.n_rejected} rejected: {dict(report.rejected)})")
    overlap = eval_overlap(records, _eval_set(data))
    check_overlap(data, overlap)
    train_recs, val_recs = split_records(records, data.get("val_set_size", 0), int(data.get("seed", 42)))
    _warn_held_out(data, {"train": len(train_recs), "validation": len(val_recs)})

    splits = {}
    counts: dict[str, dict[str, int]] = {}
    violations: list[str] = []
    # conversations (and anything rendered by the tokenizer's own chat template) take the per-turn path
    encode = encode_split if _chat(data, records) else encode_records
    for name, recs in (("train", train_recs), ("validation", val_recs)):
        ds, c, bad = encode(recs, data, tokenizer, prompter, name)
        splits[name], counts[name] = ds, c
        violations += bad
    if violations:  # dropped under policy=skip (policy=strict stopped at the first): never trained on
        log.error("%d example(s) break the masking invariant, dropped: e.g. %s", len(violations), violations[0])
    dsd = datasets.DatasetDict(splits)

    stats = {
        "source": str(data["path"]),
        "read": report.as_dict(),
        "split": {"train": len(train_recs), "validation": len(val_recs)},
        "encoded": counts,
        "invariant_violations": len(violations),
        "eval_set": _eval_set(data),
        "eval_overlap_ids": overlap,
        "settings": _settings(data, prompter),
    }
    save_processed(dsd, tmp / "dataset")
    (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
    write_checksums(tmp)
    discard(target)  # one that failed its check
    try:
        replace(tmp, target)
    except OSError:  # a concurrent run finished first: use its result
        shutil.rmtree(tmp, ignore_errors=True)
    dsd = load_processed(target / "dataset")  # memory-mapped, like a cache hit
    return Processed(dsd, stats, target, cache_hit=False)


def _read(data: Mapping[str, Any]):
    return read_records(
        data["path"],
        fields=_fields(data),
        policy=data.get("policy", "skip"),
        split=data.get("split", "train"),
        revision=data.get("revision"),
        source=data.get("source", "auto"),
        drop_duplicates=bool(data.get("drop_duplicates", True)),
        format=data.get("format") or "auto",
        roles=dict(data.get("roles") or {}),
    )


def _chat(data: Mapping[str, Any], records: list[Record]) -> bool:
    return data.get("chat_template") == "tokenizer" or any(r.turns for r in records)


def _eval_set(data: Mapping[str, Any]) -> str | None:
    path = data.get("eval_set")
    return str(path) if path and Path(str(path)).expanduser().is_file() else None


def save_processed(dsd, path: str | Path) -> None:
    """``save_to_disk`` that also handles empty splits (``datasets`` cannot reload a zero-row split)."""
    import datasets

    full = datasets.DatasetDict({k: v for k, v in dsd.items() if len(v)})
    full.save_to_disk(str(path))
    empty = [k for k, v in dsd.items() if not len(v)]
    (Path(path) / "empty_splits.json").write_text(json.dumps(empty))


def load_processed(path: str | Path):
    """Load what :func:`save_processed` wrote (memory-mapped), empty splits included."""
    import datasets

    path = Path(path)
    dsd = datasets.load_from_disk(str(path)) if (path / "dataset_dict.json").exists() else datasets.DatasetDict()
    marker = path / "empty_splits.json"
    for name in json.loads(marker.read_text()) if marker.exists() else []:
        dsd[name] = datasets.Dataset.from_dict({c: [] for c in COLUMNS})
    return dsd


def held_out(val_set_size: float, n: int) -> int:
    """How many of ``n`` records ``val_set_size`` holds out: a count as is, a fraction in (0, 1) rounded up."""
    if isinstance(val_set_size, float) and 0 < val_set_size < 1:
        return math.ceil(val_set_size * n)
    return int(val_set_size)


def split_records(records: list[Record], val_set_size: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``val_set_size`` records (a count or a fraction) chosen by ``seed``; the rest keep their order.
    Deterministic."""
    import numpy as np

    n_val = held_out(val_set_size, len(records))
    if n_val <= 0:
        return records, []
    if n_val >= len(records):
        rows = f" ({n_val} rows)" if n_val != val_set_size else ""
        raise DataError(
            f"val_set_size={val_set_size}{rows} leaves no training rows: only {len(records)} records were read"
        )
    held = set(np.random.default_rng(seed).permutation(len(records))[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    return train, val


def _warn_held_out(data: Mapping[str, Any], split: Mapping[str, int]) -> None:
    total = split["train"] + split["validation"]
    if total and split["validation"] > MAX_HELD_OUT * total:
        log.warning(
            "data.val_set_size=%s holds out %d of %d records (%.0f%%) for validation, leaving %d to train on: "
            "give a smaller count or a fraction (e.g. data.val_set_size=0.05)",
            data.get("val_set_size"),
            split["validation"],
            total,
            100 * split["validation"] / total,
            split["train"],
        )


def write_checksums(entry: Path) -> None:
    """Record the size and sha256 of every file of a cache entry, in ``CHECKSUMS``."""
    files = sorted(p for p in entry.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(entry)): [p.stat().st_size, _sha256(p)] for p in files}
    (entry / CHECKSUMS).write_text(json.dumps(sums, indent=1), encoding="utf-8")


def cache_damage(entry: Path) -> str | None:
    """What is wrong with a cache entry's files (missing, resized, altered, no checksums), or ``None``."""
    try:
        sums = json.loads((entry / CHECKSUMS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {CHECKSUMS}: made by an older kullm"
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS} unreadable ({type(e).__name__})"
    for name, (size, _) in sums.items():  # sizes first: a missing or truncated file costs no hashing
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    for name, (_, digest) in sums.items():
        if _sha256(entry / name) != digest:
            return f"{name} differs from what was written"
    return None


def _intact(entry: Path) -> bool:
    damage = cache_damage(entry)
    if damage is not None:
        log.warning("processed-data cache %s failed its check (%s): rebuilding it", entry, damage)
    return damage is None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(data: Mapping[str, Any], tokenizer, prompter: Prompter) -> str:
    """A hash of every input that changes the processed dataset."""
    parts = {
        "version": CACHE_VERSION,
        "source": source_fingerprint(data),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": _settings(data, prompter),
        "chat": chat_settings(data, tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def source_fingerprint(data: Mapping[str, Any]) -> str:
    """Hash of the data's bytes (local files) or the hub dataset's own fingerprint."""
    path = Path(str(data["path"])).expanduser()
    if data.get("source", "auto") != "hub" and path.exists():
        files = data_files(path)
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()
    import datasets

    try:
        ds = datasets.load_dataset(str(data["path"]), split=data.get("split", "train"), revision=data.get("revision"))
    except Exception as e:
        raise DataError(
            f"{data['path']}: not a local file or folder, and it could not be loaded as a hub dataset "
            f"({type(e).__name__}: {e}). Offline? Run scripts/download_data.py first or set data.path to a file."
        ) from None
    return ds._fingerprint


def _fields(data: Mapping[str, Any]) -> Fields:
    f = data.get("fields") or {}
    return Fields(**{k: v for k, v in dict(f).items() if v})


def _settings(data: Mapping[str, Any], prompter: Prompter) -> dict[str, Any]:
    return {
        "fields": asdict(_fields(data)),
        "policy": data.get("policy", "skip"),
        "split": data.get("split", "train"),
        "revision": data.get("revision"),
        "template": asdict(prompter),
        "cutoff_len": int(data["cutoff_len"]),
        "train_on_inputs": bool(data.get("train_on_inputs", False)),
        "add_eos": bool(data.get("add_eos", True)),
        "val_set_size": data.get("val_set_size", 0),
        "seed": int(data.get("seed", 42)),
        "drop_duplicates": bool(data.get("drop_duplicates", True)),
    }


ENCODE_CHUNK = 4096  # rows per tokenizer call: bounds the tokenizer's per-row objects in memory, not the speed


def encode_records(records: list[Record], data: Mapping[str, Any], tokenizer, prompter: Prompter, name: str):
    """Template, tokenize, mask and verify one split of flat records: ``(dataset, counts, violations)``.

    ``ENCODE_CHUNK`` rows per batched tokenizer call (in ``data.num_proc`` processes for large splits), straight
    into Arrow columns; prompt-only rows and invariant violations are dropped and counted.
    """
    import datasets
    import pyarrow as pa

    cutoff = int(data["cutoff_len"])
    settings = {
        "cutoff_len": cutoff,
        "train_on_inputs": bool(data.get("train_on_inputs", False)),
        "add_eos": bool(data.get("add_eos", True)),
        "verify": bool(data.get("verify", True)),
    }
    if not records:
        zero = {"records": 0, "kept": 0, "truncated": 0, "dropped_prompt_too_long": 0, "dropped_invariant": 0}
        return datasets.Dataset.from_dict({c: [] for c in COLUMNS}), zero, []
    ids = [r.id for r in records]
    prompts = [prompter.render(r.instruction, r.input) for r in records]
    outputs = [r.output for r in records]
    num_proc = int(data.get("num_proc") or 1)
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
    if bad and data.get("policy", "skip") == "strict":
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
