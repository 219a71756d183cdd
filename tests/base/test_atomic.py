"""Temporaries a killed process left behind are removed on the next run; live ones are not."""

import os
import subprocess
import sys
import time

import pytest

from kullm.atomic import STALE, clean_stale, replace, temp_sibling, write_folder


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


def test_temp_sibling_is_a_hidden_name_beside_the_path_that_clean_stale_knows(tmp_path):
    tmp = temp_sibling(tmp_path / "adapter")
    assert tmp == tmp_path / f".adapter.tmp-{os.getpid()}" and STALE.match(tmp.name)


def test_write_folder_replaces_a_folder_whole(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.txt").write_text("old")

    def write(tmp):
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")

    assert write_folder(folder, write) == folder
    assert [p.name for p in folder.iterdir()] == ["new.txt"] and (folder / "new.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # neither the temporary nor the old folder is left


def test_a_failing_write_leaves_the_old_folder_and_no_temporary(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.txt").write_text("old")

    def write(tmp):
        tmp.mkdir()
        (tmp / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder(folder, write)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (folder / "old.txt").read_text() == "old"
    assert [p.name for p in folder.iterdir()] == ["old.txt"]


def test_keep_existing_leaves_the_folder_another_writer_finished_first(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "first.txt").write_text("first")

    def write(tmp):
        tmp.mkdir()
        (tmp / "second.txt").write_text("second")

    write_folder(folder, write, keep_existing=True)
    assert [p.name for p in folder.iterdir()] == ["first.txt"] and [p.name for p in tmp_path.iterdir()] == ["tiny"]
    write_folder(tmp_path / "new", write, keep_existing=True)
    assert (tmp_path / "new" / "second.txt").read_text() == "second"
