"""Append-only JSONL result files that survive a kill: read what is done, append durably, skip done ids.

``kullm-generate`` (responses) and ``kullm-eval`` (judgments) both write one JSON line per finished item and, when
run again on the same file, skip the ids already there. A kill can leave at most a half-written last line, which
is cut before anything is appended.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_done(path: Path, what: str = "row") -> dict[str, dict[str, Any]]:
    """The rows already in ``path`` by id, in file order; the first of duplicate ids wins (``what`` names a row in
    warnings: ``response``, ``judgment``).

    A half-written last line (from a kill mid-write) is cut from the file; other unreadable lines are skipped,
    named by file and line.
    """
    path = Path(path)
    cut_partial_line(path)
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rid = str(row["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s:%d: unreadable %s skipped (an interrupted write?)", path, lineno, what)
                continue
            if rid in done:
                log.warning("%s:%d: duplicate %s of %r ignored (the first is kept)", path, lineno, what, rid)
                continue
            done[rid] = row
    return done


def cut_partial_line(path: Path) -> None:
    """Cut a last line that has no newline: what a kill in the middle of a write leaves."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    log.warning("%s: cutting a half-written last line (%d bytes) left by an interrupted run", path, len(data) - keep)
    with path.open("r+b") as f:
        f.truncate(keep)


class AppendLog:
    """Appends one JSON line per finished item, flushed and fsynced, after cutting a half-written last line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> AppendLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_partial_line(self.path)
        self.f = self.path.open("a", encoding="utf-8")
        return self

    def write(self, obj: Mapping[str, Any]) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def __exit__(self, *exc: object) -> None:
        self.f.close()
