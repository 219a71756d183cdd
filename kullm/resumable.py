"""Append-only JSONL result files that survive a kill: read what is done, append durably, skip done ids.

``kullm-generate`` (responses) and ``kullm-eval`` (judgments) both write one JSON line per finished item and, when
run again on the same file, skip the ids already there. A kill can leave at most a half-written last line, which
is cut before anything is appended. A result file that is a symbolic link is refused, never read, cut or appended
through: a link planted there could point anywhere.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_done(path: Path, what: str = "row", key: Callable[[dict], Hashable] = lambda row: str(row["id"])) -> dict:
    """The rows already in ``path`` by id (or by ``key(row)``), in file order; the first of duplicates wins (``what``
    names a row in warnings: ``response``, ``judgment``).

    A half-written last line (from a kill mid-write) is cut from the file; other unreadable lines are skipped,
    named by file and line.
    """
    path = Path(path)
    cut_partial_line(path)
    done: dict[Hashable, dict[str, Any]] = {}
    if not path.exists():
        return done
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rid = key(row)
            except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
                log.warning("%s:%d: unreadable %s skipped (an interrupted write?)", path, lineno, what)
                continue
            if rid in done:
                log.warning("%s:%d: duplicate %s of %r ignored (the first is kept)", path, lineno, what, rid)
                continue
            done[rid] = row
    return done


def cut_partial_line(path: Path) -> None:
    """Cut a last line that has no newline: what a kill in the middle of a write leaves."""
    refuse_link(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    log.warning("%s: cutting a half-written last line (%d bytes) left by an interrupted run", path, len(data) - keep)
    with path.open("r+b") as f:
        f.truncate(keep)


def refuse_link(path: Path) -> None:
    """Raise :class:`OSError` (one line, naming the file and where it points) when ``path`` is a symbolic link."""
    if os.path.islink(path):
        raise OSError(f"{path}: a symbolic link (to {os.readlink(path)}): results are never written through a link")


class AppendLog:
    """Appends one JSON line per finished item, flushed and fsynced, after cutting a half-written last line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> AppendLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_partial_line(self.path)
        try:  # O_NOFOLLOW: a link planted after the check above is refused too
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError:
            refuse_link(self.path)
            raise
        self.f = open(fd, "a", encoding="utf-8")
        return self

    def write(self, obj: Mapping[str, Any]) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def write_many(self, objs: Iterable[Mapping[str, Any]]) -> None:
        """Append several lines with one flush and fsync (a kill still leaves at most a half-written last line)."""
        self.f.write("".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in objs))
        self.f.flush()
        os.fsync(self.f.fileno())

    def __exit__(self, *exc: object) -> None:
        self.f.close()
