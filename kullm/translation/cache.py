"""The translation cache: a source text is paid for once per backend and options, across reruns, resumes and sets.

One SQLite file (write-ahead log): each entry is keyed by the sha256 of the backend's identity (name, model and
every option that changes the output) and the source text, and holds the translation. :meth:`TranslationCache.
put_many` commits one batch in one transaction, so a run killed at any point keeps every batch it finished and
loses none half-written; other processes may read (a second run, a report) while one writes.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from kullm.errors import KullmError

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS translations (key TEXT PRIMARY KEY, backend TEXT NOT NULL, translation TEXT NOT NULL, "
    "created REAL NOT NULL)"
)
_CHUNK = 500  # keys per SELECT (SQLite's bound on host parameters is 999 in old builds)


class CacheError(KullmError):
    """The cache file cannot be used (not a SQLite database, a symbolic link, unwritable)."""


def cache_key(identity: str, text: str) -> str:
    """The sha256 of the backend identity and the source text (lengths framed, so no two pairs run together)."""
    h = hashlib.sha256()
    for part in (identity, text):
        data = part.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


class TranslationCache:
    """``with TranslationCache(path, backend.identity) as cache: cache.get_many(texts); cache.put_many(pairs)``."""

    def __init__(self, path: str | os.PathLike, identity: str) -> None:
        self.path, self.identity = Path(path), identity
        self._backend = hashlib.sha256(identity.encode("utf-8")).hexdigest()
        if self.path.is_symlink():
            raise CacheError(f"{self.path}: a symbolic link: the translation cache is never written through a link")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed batch survives a power cut too
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise CacheError(f"{self.path}: not a usable translation cache ({e})") from None

    def __enter__(self) -> TranslationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def get_many(self, texts: Sequence[str]) -> dict[str, str]:
        """The cached translations of ``texts`` (hits only), by source text."""
        keys = {cache_key(self.identity, t): t for t in texts}
        found: dict[str, str] = {}
        ordered = list(keys)
        for at in range(0, len(ordered), _CHUNK):
            chunk = ordered[at : at + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, translation FROM translations WHERE key IN ({marks})", chunk)
            found |= {keys[k]: v for k, v in rows}
        return found

    def put_many(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Store ``(source, translation)`` pairs in one transaction, committed (on disk) on return; a pair already
        cached is replaced."""
        now = time.time()
        rows = [(cache_key(self.identity, s), self._backend, t, now) for s, t in pairs]
        if not rows:
            return
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO translations (key, backend, translation, created) VALUES (?, ?, ?, ?)", rows
            )

    def __len__(self) -> int:
        """The entries of this backend identity."""
        return self._db.execute("SELECT COUNT(*) FROM translations WHERE backend = ?", (self._backend,)).fetchone()[0]

    def _transaction(self) -> _Tx:
        return _Tx(self._db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *exc: object) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")
