"""Crash-safe file replacement: write to a temporary sibling, fsync it, rename it into place, fsync the folder.

Temporaries are named ``.<name>.tmp-<pid>`` (:func:`temp_sibling`; ``.<name>.old-<pid>`` for a folder being swapped
out); one left behind by a process that died is removed by :func:`clean_stale` on the next run, as is a
``<name>.tmp-<pid>`` left by an older kullm (which named its cached tiny models and processed datasets so).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STALE = re.compile(r"^(?:\..+\.old|.+\.tmp)-(\d+)$")  # any ``.tmp-<pid>``: older kullm wrote some without the dot


def temp_sibling(path: str | Path) -> Path:
    """The temporary name this process writes ``path`` under: ``.<name>.tmp-<pid>`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


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
    tmp = temp_sibling(path)
    try:
        yield tmp
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_folder(folder: str | Path, write: Callable[[Path], None], *, keep_existing: bool = False) -> Path:
    """``write(tmp)`` fills a fresh temporary sibling of ``folder`` (:func:`temp_sibling`), which then replaces
    ``folder``: an existing one is moved aside first and removed only after. On any error the temporary is removed and
    ``folder`` left as it was.

    ``keep_existing``: a ``folder`` already in place stays and the new one is dropped (builders of one content racing,
    e.g. DDP ranks or test workers: the first to finish wins, and a reader never sees the folder missing).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(folder.parent)
    tmp = temp_sibling(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_existing:
        try:
            replace(tmp, folder)
        except OSError:  # another writer finished first
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


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
        pid = int(m.group(1))
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
