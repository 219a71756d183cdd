"""Fetch the real KULLM data sets (needs internet access).

Two targets, both written as UTF-8 JSONL (one object a line, ``ensure_ascii=False``):

* ``kullm-v2``: the KULLM v2 training set, hub dataset ``nlpai-lab/kullm-v2`` (~152k rows of
  ``id/instruction/input/output``: GPT4ALL, Dolly and Vicuna translated into Korean with DeepL),
  written to ``<out>/kullm-v2/kullm-v2.jsonl``. It is pinned by ``<out>/kullm-v2.lock.json`` (hub commit, sha256
  and row count of the written file): with a lock, that exact commit is fetched and the file must match its
  checksum; without one, the hub's current commit is fetched and the lock is written (commit it to pin everyone).
* ``eval``: the 252-item user-oriented evaluation set (self-instruct layout), ``data/user_oriented_instructions_
  eval.jsonl`` of ``nlpai-lab/KULLM`` at commit 33ef2a4 (the branch ``kullm_v2``; the file is gone from ``master``),
  checked against its sha256 and written byte for byte to ``<out>/eval/user_oriented_instructions_eval.jsonl``.
  ``KULLM_EVAL_URL`` fetches the same file from a mirror (the checksum still applies).

KULLM v1 (GPT4ALL in Korean) is not public: the repo's ``data/kullm-v1.jsonl`` is the *English* evaluation set
(the same 252 ``user_oriented_task_*`` instructions), so there is nothing to fetch, and training on that file
would contaminate the evaluation.

Usage::

    python scripts/download_data.py                    # both, into data/
    python scripts/download_data.py --only eval        # just the evaluation set
    python scripts/download_data.py --out /big/disk --force

Files that already exist are skipped unless ``--force``. Each file is written to a temporary file
first and moved into place, so an interrupted run never leaves a half-written file behind.
On a network or hub error the script prints one line saying what failed and exits with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

PROG = "download_data"
KULLM_V2_REPO = "nlpai-lab/kullm-v2"
KULLM_V2_FILE = Path("kullm-v2") / "kullm-v2.jsonl"
KULLM_V2_LOCK = Path("kullm-v2.lock.json")
KULLM_COMMIT = "33ef2a461da1c6ffb191b5ff162c456b7ae35d28"  # nlpai-lab/KULLM, branch kullm_v2: the v1/v2 code and data
EVAL_URL = f"https://raw.githubusercontent.com/nlpai-lab/KULLM/{KULLM_COMMIT}/data/user_oriented_instructions_eval.jsonl"
EVAL_SHA256 = "de8441249185a28384759414d6d33377209105363b76dbe56f31e7625d9d0997"  # 252 rows, 179,997 bytes
EVAL_URL_ENV = "KULLM_EVAL_URL"
EVAL_SHA256_ENV = "KULLM_EVAL_SHA256"  # another expected checksum (a corrected copy of the set, or tests)
EVAL_FILE = Path("eval") / "user_oriented_instructions_eval.jsonl"
TARGETS = ("kullm-v2", "eval")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class FetchError(Exception):
    """A target could not be fetched or written; the message is one line for the user."""


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, shortened to ``limit`` characters."""
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hub_hint() -> str:
    """What to check when the hub could not be reached."""
    offline = [v for v in OFFLINE_ENV if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if offline:
        return f"are you online? {'/'.join(offline)} is set: unset it to fetch from the hub"
    return "are you online? Check the network (or HF_ENDPOINT / proxy settings) and try again"


def write_jsonl_atomic(path: Path, lines: Iterable[str]) -> int:
    """Write ``lines`` (JSON texts without newline) to ``path`` via a temp file and ``os.replace``; return the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_lock(lock_path: Path) -> dict | None:
    """The pin of a previous fetch (``repo``, ``revision``, ``sha256``, ``rows``), or ``None``."""
    if not lock_path.exists():
        return None
    try:
        lock = json.loads(lock_path.read_text(encoding="utf-8"))
        if not all(isinstance(lock.get(k), str) and lock[k] for k in ("repo", "revision", "sha256")):
            raise ValueError("needs repo, revision and sha256")
    except ValueError as e:
        raise FetchError(f"{lock_path}: not a valid lock file ({_one_line(e)}); fix or delete it") from None
    return lock


def check_pinned(path: Path, lock: dict) -> None:
    """Refuse (and remove) a freshly written file whose checksum is not the pinned one."""
    got = sha256_of(path)
    if got != lock["sha256"]:
        path.unlink(missing_ok=True)
        raise FetchError(
            f"{lock['repo']}@{lock['revision'][:12]} gave a file with sha256 {got[:16]}…, the lock pins "
            f"{lock['sha256'][:16]}…: nothing kept; if the set changed on purpose, delete the lock and fetch again"
        )


def fetch_kullm_v2(path: Path, lock_path: Path) -> int:
    """Load ``nlpai-lab/kullm-v2`` (train split) at the pinned (or current) hub commit, write it to ``path`` and
    check or record its pin in ``lock_path``; return rows written."""
    try:
        import datasets
        from huggingface_hub import HfApi
    except ImportError as e:
        raise FetchError(f"could not fetch {KULLM_V2_REPO} ({_one_line(e)}): pip install datasets") from None
    lock = read_lock(lock_path)
    try:
        revision = lock["revision"] if lock else HfApi().dataset_info(KULLM_V2_REPO).sha
        ds = datasets.load_dataset(KULLM_V2_REPO, split="train", revision=revision)
    except Exception as e:  # the hub raises many types: connection, offline mode, missing repo
        raise FetchError(f"could not fetch {KULLM_V2_REPO} ({_one_line(e)}): {_hub_hint()}") from None
    staged = path.with_name(f".{path.name}.staged")  # replaces ``path`` only once it passed the check
    n = write_jsonl_atomic(staged, (json.dumps(row, ensure_ascii=False, default=str) for row in ds))
    if lock:
        check_pinned(staged, lock)
    os.replace(staged, path)
    if not lock:
        lock = {"repo": KULLM_V2_REPO, "revision": revision, "sha256": sha256_of(path), "rows": n}
        lock_path.write_text(json.dumps(lock, indent=2) + "\n", encoding="utf-8")
        print(f"{PROG}: pinned {KULLM_V2_REPO} at {revision} in {lock_path} (commit it to pin the set for everyone)")
    return n


def fetch_eval(path: Path, timeout: float) -> int:
    """Download the eval set (``$KULLM_EVAL_URL`` or :data:`EVAL_URL`), check its sha256 and that it is JSONL, and
    write its bytes unchanged to ``path``."""
    url = os.environ.get(EVAL_URL_ENV) or EVAL_URL
    want = os.environ.get(EVAL_SHA256_ENV) or EVAL_SHA256
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except Exception as e:  # URLError, HTTPError, timeouts, connection resets, bad URLs
        raise FetchError(f"could not fetch {url} ({_one_line(e)}): are you online?") from None
    try:
        text = body.decode("utf-8-sig")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise FetchError(f"{url} is not UTF-8 JSONL ({_one_line(e)})") from None
    if not rows:
        raise FetchError(f"{url} returned no rows")
    got = hashlib.sha256(body).hexdigest()
    if got != want:
        raise FetchError(f"{url}: sha256 {got[:16]}… is not the pinned {want[:16]}… (another version of the set?)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fetch KULLM v2 (hub) and the KULLM evaluation set (GitHub) as JSONL.",
    )
    parser.add_argument("--out", type=Path, default=Path("data"), help="data folder to write into (default: data)")
    parser.add_argument(
        "--only",
        action="append",
        choices=TARGETS,
        help="fetch only this target; repeatable (default: all of them)",
    )
    parser.add_argument("--force", action="store_true", help="fetch again even if the file exists")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait on the network (default: 60)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs: dict[str, tuple[Path, Callable[[Path], int]]] = {
        "kullm-v2": (args.out / KULLM_V2_FILE, lambda p: fetch_kullm_v2(p, args.out / KULLM_V2_LOCK)),
        "eval": (args.out / EVAL_FILE, lambda p: fetch_eval(p, args.timeout)),
    }
    failed = 0
    for name in dict.fromkeys(args.only or TARGETS):  # keep order, drop repeats
        path, fetch = jobs[name]
        if path.exists() and not args.force:
            print(f"{PROG}: {path} exists, skipped (use --force to fetch it again)")
            continue
        try:
            n = fetch(path)
        except FetchError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            failed += 1
            continue
        except OSError as e:
            print(f"{PROG}: could not write {path} ({_one_line(e)})", file=sys.stderr)
            failed += 1
            continue
        print(f"{PROG}: wrote {n} rows to {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
