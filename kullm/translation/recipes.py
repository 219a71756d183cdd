"""Recipes (``recipe=``): sources merged into one flat data set before translating, as a known data set was built.

``kullm-v2`` rebuilds KULLM v2's input: GPT4ALL (``prompt``/``response``), Dolly (``instruction``/``context``/
``response``) and Vicuna (ShareGPT conversations, each human→gpt exchange one row), fetched at pinned hub commits by
``scripts/download_data.py`` and merged into KULLM v2's layout ``{id, instruction, input, output}`` with ids
``<source>_<n>`` (``n``: the row's place in its source file, from 0; Vicuna: ``vicuna_<conversation id>_<k>``).
Each source's fields are named in ``conf/recipe/<name>.yaml``, so a recipe of your own is a YAML file.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kullm.atomic import rewrite
from kullm.config import ROOT
from kullm.data.conversations import SHAREGPT_ROLES
from kullm.data.sources import DataError, SourceReport, read_rows

log = logging.getLogger(__name__)

DOWNLOAD_SCRIPT = ROOT / "scripts" / "download_data.py"


def prepare_recipe(recipe: Mapping[str, Any], out_dir: Path) -> Path:
    """Merge the recipe's sources into ``<out_dir>/<name>.jsonl`` (fetching missing ones first when
    ``recipe.fetch``); return its path. The file is rewritten only when its content changes."""
    sources = dict(recipe["sources"] or {})
    if not sources:
        raise DataError(f"recipe {recipe['name']}: no sources")
    missing = [name for name, src in sources.items() if not Path(str(src["path"])).exists()]
    if missing:
        fetch(recipe, missing)
    counts: Counter = Counter()
    lines = []
    for name, src in sources.items():
        for row in merge_source(name, src, counts, recipe["limit"]):
            lines.append(json.dumps(row, ensure_ascii=False))
    target = Path(out_dir) / f"{recipe['name']}.jsonl"
    body = "".join(line + "\n" for line in lines)
    if not target.exists() or target.read_text(encoding="utf-8") != body:
        target.parent.mkdir(parents=True, exist_ok=True)
        with rewrite(target) as tmp:
            tmp.write_text(body, encoding="utf-8")
    log.info(
        "recipe %s: %d rows merged into %s (%s)",
        recipe["name"],
        len(lines),
        target,
        ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
    )
    return target


def fetch(recipe: Mapping[str, Any], names: list[str]) -> None:
    """Fetch the missing sources with ``scripts/download_data.py`` (pinned by its lock files)."""
    paths = ", ".join(str(recipe["sources"][n]["path"]) for n in names)
    how = f"python scripts/download_data.py {' '.join(f'--only {n}' for n in names)}"
    if not recipe["fetch"] or not DOWNLOAD_SCRIPT.exists():
        raise DataError(f"recipe {recipe['name']}: {paths} missing; fetch them first ({how}) on a machine online")
    out = Path(str(recipe["data_dir"]))
    cmd = [sys.executable, str(DOWNLOAD_SCRIPT), "--out", str(out), *(a for n in names for a in ("--only", n))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise DataError(f"recipe {recipe['name']}: fetching {', '.join(names)} failed: {why}")


def merge_source(name: str, src: Mapping[str, Any], counts: Counter, limit: int | None = None) -> Iterator[dict]:
    """The flat KULLM v2 rows of one source: instruction/input/output fields renamed, or each human→gpt exchange
    of a ShareGPT conversation; rows that fit neither are skipped and counted (``<name>_skipped``)."""
    report = SourceReport()
    turns_key = src.get("conversations")
    fields = dict(src.get("fields") or {})
    n = 0
    for i, row in enumerate(read_rows(str(src["path"]), "train", None, "files", report)):
        if limit is not None and n >= int(limit):
            return
        obj = row.obj
        made = list(_exchanges(name, obj, turns_key)) if turns_key else [_flat(name, obj, fields, i)]
        made = [m for m in made if m is not None]
        if row.bad is not None or not made:
            counts[f"{name}_skipped"] += 1
            continue
        counts[name] += len(made)
        n += 1
        yield from made


def _flat(name: str, obj: Any, fields: Mapping[str, str | None], n: int) -> dict | None:
    if not isinstance(obj, dict):
        return None
    out = {"id": f"{name}_{n}"}
    for target in ("instruction", "input", "output"):
        key = fields.get(target, target)
        value = obj.get(key) if key else ""
        if value is None:
            value = ""
        if not isinstance(value, str):
            return None
        out[target] = value
    return out if out["instruction"].strip() and out["output"].strip() else None


def _exchanges(name: str, obj: Any, key: str) -> Iterator[dict | None]:
    """Each human turn followed by a gpt turn, as a flat row ``<name>_<conversation id>_<k>``."""
    turns = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(turns, list):
        return
    cid = obj.get("id", "")
    roles = [SHAREGPT_ROLES.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None for t in turns]
    k = 0
    for i in range(len(turns) - 1):
        if roles[i] == "user" and roles[i + 1] == "assistant":
            q, a = turns[i].get("value"), turns[i + 1].get("value")
            if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                yield {"id": f"{name}_{cid}_{k}", "instruction": q, "input": "", "output": a}
                k += 1
