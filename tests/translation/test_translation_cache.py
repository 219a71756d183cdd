"""The translation cache: keyed by backend identity and source text, durable across a kill, readable while written."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from kullm.translation.cache import CacheError, TranslationCache, cache_key


def test_hits_only_by_identity_and_text(tmp_path):
    path = tmp_path / "sub" / "cache.db"
    with TranslationCache(path, '{"backend":"deepl"}') as a:
        a.put_many([("Hello", "안녕하세요"), ("Bye", "잘 가요"), ("", "")])
        assert a.get_many(["Hello", "Nope", "Bye"]) == {"Hello": "안녕하세요", "Bye": "잘 가요"}
        a.put_many([("Hello", "안녕")])  # a later translation of the same text replaces the first
        assert a.get_many(["Hello"]) == {"Hello": "안녕"} and len(a) == 3
    with TranslationCache(path, '{"backend":"deepl","formality":"more"}') as b:  # other options: other entries
        assert b.get_many(["Hello", "Bye"]) == {} and len(b) == 0
        b.put_many([("Hello", "안녕하십니까")])
    with TranslationCache(path, '{"backend":"deepl"}') as a:  # reopened: still there
        assert a.get_many(["Hello", "Bye"]) == {"Hello": "안녕", "Bye": "잘 가요"}
    assert cache_key("ab", "c") != cache_key("a", "bc")  # framed: no two pairs run together
    many = [(f"text {i}", f"번역 {i}") for i in range(2500)]  # more keys than one SELECT's parameters
    with TranslationCache(path, "x") as c:
        c.put_many(many)
        assert c.get_many([s for s, _ in many]) == dict(many)


def test_a_link_or_a_foreign_file_is_refused(tmp_path):
    (tmp_path / "real.db").write_bytes(b"")
    os.symlink(tmp_path / "real.db", tmp_path / "link.db")
    with pytest.raises(CacheError, match="a symbolic link"):
        TranslationCache(tmp_path / "link.db", "x")
    (tmp_path / "notes.txt").write_text("not a database, just text " * 100)
    with pytest.raises(CacheError, match="not a usable translation cache"):
        TranslationCache(tmp_path / "notes.txt", "x")


WRITER = textwrap.dedent(
    """
    import sys, time
    from kullm.translation.cache import TranslationCache
    with TranslationCache(sys.argv[1], "id") as c:
        for b in range(100000):
            c.put_many([(f"s{b}-{i}", f"t{b}-{i}") for i in range(10)])
            print(b, flush=True)
            time.sleep(0.002)
    """
)


@pytest.mark.parametrize("attempt", range(3))
def test_a_kill_keeps_every_finished_batch_and_readers_never_block(tmp_path, attempt):
    path = tmp_path / "cache.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        done = -1
        for _ in range(30):  # wait for 30 committed batches
            done = int(proc.stdout.readline())
        reads = 0
        with TranslationCache(path, "id") as reader:  # a second process reading while the first appends
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                n = len(reader)
                assert n % 10 == 0 and n >= 300  # whole batches only
                reads += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with TranslationCache(path, "id") as c:
        n = len(c)
        assert n % 10 == 0 and n >= (done + 1) * 10 and reads > 5
        batches = n // 10
        assert c.get_many([f"s{b}-{i}" for b in range(batches) for i in range(10)]) == {
            f"s{b}-{i}": f"t{b}-{i}" for b in range(batches) for i in range(10)
        }
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
