"""Records → held-out split → token ids and masks → a cached ``DatasetDict`` (``train`` and ``validation``).

The cache key covers everything that changes the result: the data's bytes (or the hub dataset's fingerprint),
field names and policy, the tokenizer, the template strings, ``cutoff_len``, ``train_on_inputs``, ``add_eos``,
``val_set_size`` and ``seed``. A second run with the same inputs loads from disk in seconds, after checking the
files against the checksums written with them (a damaged entry is rebuilt, with one warning line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kullm.atomic import write_folder
from kullm.cache import cache_root
from kullm.config import ConfigError
from kullm.data import pairs, sft, sft_chat
from kullm.data.contamination import check_overlap, eval_overlap
from kullm.data.preference import KTO, PAIRS, read_preference
from kullm.data.records import ReadOptions, Record, read_records, write_rejects
from kullm.data.sft import COLUMNS
from kullm.data.sources import DataError, data_files
from kullm.modeling import tokenizer_fingerprint
from kullm.templates import Prompter

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 3: mask-invariant violations dropped; 2: colliding ids renamed, exact duplicates dropped
CHECKSUMS = "checksums.json"  # size and sha256 of every other file of a cache entry, written last
MAX_HELD_OUT = 0.2  # a larger share of the records held out for validation is warned about
# The knobs of the validation split users type most (kullm.config.validate collects this table and check_config).
SCHEMA: dict[str, Any] = {
    "data.val_set_size": float,  # a count of rows (an integer) or a fraction of them (a float below 1)
    "data.seed": int,
}
MINIMUM: dict[str, float] = {"data.val_set_size": 0}


def check_config(cfg: DictConfig) -> None:
    """``data.val_set_size``: a fraction lies below 1 (a count of rows is an integer)."""
    held_out = OmegaConf.select(cfg, "data.val_set_size", default=None)
    if isinstance(held_out, float) and held_out >= 1:
        raise ConfigError(f"data.val_set_size={held_out!r}: a fraction must lie below 1; a count of rows is an integer")


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
    root = Path(cache_dir or data.cache_dir or cache_root() / "processed").expanduser()
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

    records, report = _read(data)
    if report.rejects:  # written with the cache; named by where it will be once the cache is in place
        log.warning("rejected rows with file:line and reason: %s", target / "rejects.jsonl")
    if not records:
        raise DataError(f"{data['path']}: no usable record ({report.n_rejected} rejected: {dict(report.rejected)})")
    overlap = eval_overlap(records, _eval_set(data))
    check_overlap(data, overlap)
    train_recs, val_recs = split_records(records, data.val_set_size, int(data.seed))
    _warn_held_out(data, {"train": len(train_recs), "validation": len(val_recs)})

    splits = {}
    counts: dict[str, dict[str, int]] = {}
    violations: list[str] = []
    # conversations (and anything rendered by the tokenizer's own chat template) take the per-turn path;
    # preference rows (data.kind=pairs|kto) theirs
    encode = _encoder(data, records)
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

    def write(tmp: Path) -> None:
        tmp.mkdir()
        if report.rejects:
            write_rejects(report.rejects, tmp / "rejects.jsonl")
        save_processed(dsd, tmp / "dataset")
        (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
        write_checksums(tmp)

    write_folder(target, write)  # replaces one that failed its check
    dsd = load_processed(target / "dataset")  # memory-mapped, like a cache hit
    return Processed(dsd, stats, target, cache_hit=False)


def _read(data: Mapping[str, Any]):
    if data["kind"] in (PAIRS, KTO):
        return read_preference(data)
    return read_records(data["path"], ReadOptions.training(data))


def _encoder(data: Mapping[str, Any], records: list):
    """The function that encodes a split: preference rows', conversations' or flat rows'."""
    if data["kind"] == PAIRS:
        return pairs.encode_pairs
    if data["kind"] == KTO:
        return pairs.encode_kto
    return sft_chat.encode_split if _chat(data, records) else sft.encode_split


def _chat(data: Mapping[str, Any], records: list[Record]) -> bool:
    return data["chat_template"] == "tokenizer" or any(r.turns for r in records)


def _eval_set(data: Mapping[str, Any]) -> str | None:
    path = data["eval_set"]
    return str(path) if path and Path(str(path)).expanduser().is_file() else None


def save_processed(dsd, path: str | Path) -> None:
    """``save_to_disk`` that also handles empty splits (``datasets`` cannot reload a zero-row split)."""
    import datasets

    full = datasets.DatasetDict({k: v for k, v in dsd.items() if len(v)})
    full.save_to_disk(str(path))
    empty = {k: v.column_names for k, v in dsd.items() if not len(v)}  # an empty split keeps its columns
    (Path(path) / "empty_splits.json").write_text(json.dumps(empty))


def load_processed(path: str | Path):
    """Load what :func:`save_processed` wrote (memory-mapped), empty splits included."""
    import datasets

    path = Path(path)
    dsd = datasets.load_from_disk(str(path)) if (path / "dataset_dict.json").exists() else datasets.DatasetDict()
    marker = path / "empty_splits.json"
    empty = json.loads(marker.read_text()) if marker.exists() else []
    for name in empty:  # a list of names (older caches: SFT columns), or each name with its columns
        dsd[name] = datasets.Dataset.from_dict({c: [] for c in (empty[name] if isinstance(empty, dict) else COLUMNS)})
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
            data["val_set_size"],
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
        "chat": sft_chat.chat_settings(data, tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def source_fingerprint(data: Mapping[str, Any]) -> str:
    """Hash of the data's bytes (local files) or the hub dataset's own fingerprint."""
    path = Path(str(data["path"])).expanduser()
    if data["source"] != "hub" and path.exists():
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
        ds = datasets.load_dataset(str(data["path"]), split=data["split"], revision=data["revision"])
    except Exception as e:
        raise DataError(
            f"{data['path']}: not a local file or folder, and it could not be loaded as a hub dataset "
            f"({type(e).__name__}: {e}). Offline? Run scripts/download_data.py first or set data.path to a file."
        ) from None
    return ds._fingerprint


def _settings(data: Mapping[str, Any], prompter: Prompter) -> dict[str, Any]:
    return {
        "fields": asdict(ReadOptions.training(data).fields),
        "policy": data["policy"],
        "split": data["split"],
        "revision": data["revision"],
        "template": asdict(prompter),
        "cutoff_len": int(data["cutoff_len"]),
        "train_on_inputs": bool(data["train_on_inputs"]),
        "add_eos": bool(data["add_eos"]),
        "val_set_size": data["val_set_size"],
        "seed": int(data["seed"]),
        "drop_duplicates": bool(data["drop_duplicates"]),
        "kind": data["kind"],
        "kto_from_pairs": bool(data["kto_from_pairs"]),
    }
