"""Crash-safe file replacement: write to a temporary sibling, fsync it, rename it into place, fsync the folder.

Temporaries are named ``.<name>.tmp-<pid>`` (and ``.<name>.old-<pid>`` for a folder being swapped out); one left
behind by a process that died is removed by :func:`clean_stale` on the next run.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STALE = re.compile(r"^\..+\.(tmp|old)-(\d+)$|^.+\.tmp-(\d+)$")


def fsync_tree(path: str | Path) -> None:
    """fsync a file, or every file (and folder) under a folder."""
    path = Path(path)
    targets = [path] if path.is_file() else [*(p for p in path.rglob("*")), path]
    for p in targets:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(src: str | Path, dst: str | Path) -> None:
    """``os.replace`` made durable: the new content is on disk before the rename, and the rename after it."""
    fsync_tree(src)
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextmanager
def rewrite(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` when the block ends without error. A link
    planted at ``path`` is replaced, never written through, and a kill mid-write leaves the previous file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def discard(folder: str | Path) -> None:
    """Remove a folder, renamed away first so that no reader sees it half deleted (a missing one is no error)."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    try:
        os.replace(folder, old)
    except FileNotFoundError:
        return
    shutil.rmtree(old, ignore_errors=True)


def clean_stale(folder: str | Path, min_age_s: float = 60.0) -> list[Path]:
    """Remove the temporaries of processes that are no longer running; return what was removed.

    Only those untouched for ``min_age_s``: on a folder shared between machines another host's pid means nothing
    here, but its live temporaries keep changing.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = STALE.match(p.name)
        if m is None:
            continue
        pid = int(m.group(2) or m.group(3))
        if pid == os.getpid() or _alive(pid) or time.time() - _last_change(p) < min_age_s:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _last_change(p: Path) -> float:
    try:
        times = [p.stat().st_mtime] + ([c.stat().st_mtime for c in p.iterdir()] if p.is_dir() else [])
    except OSError:
        return 0.0
    return max(times)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
