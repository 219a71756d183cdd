"""Temporaries a killed process left behind are removed on the next run; live ones are not."""

import os
import subprocess
import sys
import time

from kullm.atomic import clean_stale, replace


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, old = dead_pid(), time.time() - 3600
    stale = [tmp_path / f".last.ckpt.tmp-{dead}", tmp_path / f".adapter.tmp-{dead}", tmp_path / f"abc123.tmp-{dead}"]
    stale[0].write_bytes(b"half a checkpoint")
    for d in stale[1:]:
        d.mkdir()
        (d / "x").write_text("x")
        os.utime(d / "x", (old, old))
    for p in stale:
        os.utime(p, (old, old))
    live = [tmp_path / f".mine.tmp-{os.getpid()}", tmp_path / f".fresh.tmp-{dead}", tmp_path / "last.ckpt"]
    for p in live:
        p.write_text("keep")
    os.utime(live[0], (old, old))
    assert sorted(clean_stale(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in live) and not any(p.exists() for p in stale)


def test_replace_moves_a_folder_into_place(tmp_path):
    src, dst = tmp_path / ".new.tmp-1", tmp_path / "new"
    src.mkdir()
    (src / "a.txt").write_text("a")
    replace(src, dst)
    assert (dst / "a.txt").read_text() == "a" and not src.exists()
