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

* ``gpt4all``, ``dolly``, ``vicuna``: KULLM v2's English sources, for ``kullm-translate recipe=kullm-v2`` (fetched only
  when named with ``--only``): ``nomic-ai/gpt4all_prompt_generations``, ``databricks/databricks-dolly-15k`` (their
  train splits) and ``anon8231489123/ShareGPT_Vicuna_unfiltered``'s ``ShareGPT_V3_unfiltered_cleaned_split_no_
  imsorry.json`` (a JSON array, written as JSONL), to ``<out>/kullm-v2-sources/<name>.jsonl``. Each is pinned like
  KULLM v2, by ``<out>/kullm-v2-sources/<name>.lock.json`` (hub commit, sha256 and row count of the written file),
  which the first fetch writes: commit the locks to pin everyone.

* ``logickor``, ``komt_bench``, ``k2_eval``: the questions, reference answers and judge prompts of kullm-bench's
  judge suites (fetched only when named with ``--only``), from instructkr/LogicKor and LG-AI-EXAONE/KoMT-Bench at
  pinned commits (sha256-checked) and the hub dataset HAERAE-HUB/K2-Eval at a pinned revision (its sha256 recorded
  in ``<out>/k2_eval.lock.json`` by the first fetch), written byte for byte under ``<out>/<name>/``.

* ``ko-ultrafeedback``: Korean preference pairs (UltraFeedback binarized, machine-translated) for ``objective=dpo``
  and its relatives (fetched only when named with ``--only``): hub dataset ``maywell/ko_Ultrafeedback_binarized``,
  its train split, to ``<out>/ko-ultrafeedback/ko-ultrafeedback.jsonl``; pinned like KULLM v2 by
  ``<out>/ko-ultrafeedback.lock.json`` (hub commit, sha256, rows), which the first fetch writes: commit it.

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
import functools
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
# Korean preference pairs for objective=dpo and its relatives (fetched only when named with --only): name -> hub
# dataset (its train split); pinned like KULLM v2 by <out>/<name>.lock.json, which the first fetch writes
PREFERENCE_SETS = {"ko-ultrafeedback": "maywell/ko_Ultrafeedback_binarized"}
# KULLM v2's English sources (kullm-translate recipe=kullm-v2): name -> (hub dataset, a file in it, or None for the
# dataset's train split); pinned by <out>/kullm-v2-sources/<name>.lock.json, written by the first fetch
KULLM_V2_SOURCES = {
    "gpt4all": ("nomic-ai/gpt4all_prompt_generations", None),
    "dolly": ("databricks/databricks-dolly-15k", None),
    "vicuna": ("anon8231489123/ShareGPT_Vicuna_unfiltered", "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json"),
}
SOURCES_DIR = Path("kullm-v2-sources")
# The judge suites of kullm-bench (fetched only when named with --only): name -> [(url, sha256, path under <out>)].
# The GitHub files are pinned by commit and sha256; K2-Eval's CSV by hub revision, its sha256 (unknown offline) is
# recorded in <out>/<name>.lock.json by the first fetch and checked by every later one: commit the lock.
LOGICKOR_COMMIT = "11c3a84f93d176754f1ce197a8f00961cffa9de2"  # instructkr/LogicKor (read-only since Oct 2024)
KOMT_COMMIT = "56d4f3af437543dce39f08aecfb818abed81210d"  # LG-AI-EXAONE/KoMT-Bench
K2_EVAL_REVISION = "046c76e2ae723bbaf683cbafe72b69674bf7f19d"  # HAERAE-HUB/K2-Eval (hub dataset)
_LOGICKOR = f"https://raw.githubusercontent.com/instructkr/LogicKor/{LOGICKOR_COMMIT}"
_KOMT = f"https://raw.githubusercontent.com/LG-AI-EXAONE/KoMT-Bench/{KOMT_COMMIT}/FastChat/fastchat/llm_judge/data"
BENCH_FILES: dict[str, list[tuple[str, str | None, Path]]] = {
    "logickor": [
        (
            f"{_LOGICKOR}/questions.jsonl",
            "83440ad0424fa9e9a92206dc6cb5a3d9e2f7c3074ad4ac8425c3e1d8af11782c",
            Path("logickor/questions.jsonl"),
        ),
        (
            f"{_LOGICKOR}/templates.py",
            "e27beaf59de2ce323531b7993989becceccb7ff38f8b767286a4fcbb9f6c25c7",
            Path("logickor/templates.py"),
        ),  # the judge's system prompts and (below) how its user message is built: read with ast, never run
        (
            f"{_LOGICKOR}/evaluator.py",
            "4032eb3bf71ab8004d2862173a1fff3d52f41c44a82c87bfad2317ab92b058d0",
            Path("logickor/evaluator.py"),
        ),
    ],
    "komt_bench": [
        (
            f"{_KOMT}/mt_bench/question_ko.jsonl",
            "b5738f10e6eeca5b83c4568a1152acd79a04517f6c03e698dcdb6ef3889652fa",
            Path("komt_bench/question_ko.jsonl"),
        ),
        (
            f"{_KOMT}/judge_prompts_ko.jsonl",
            "32d1e94b1b3877c68bed2254ef33e05b496999896b1cb3887613e0ba5d755fa5",
            Path("komt_bench/judge_prompts_ko.jsonl"),
        ),
        (
            f"{_KOMT}/mt_bench/reference_answer_ko/gpt-4.jsonl",
            "2c949fa6640e10e77f315793f6ae0de2b7f89cd9b5b6d97df19697ad10fa3347",
            Path("komt_bench/reference_answer_ko.jsonl"),
        ),
    ],
    "k2_eval": [
        (
            f"https://huggingface.co/datasets/HAERAE-HUB/K2-Eval/resolve/{K2_EVAL_REVISION}/data/k2-eval-knowledge.csv",
            None,
            Path("k2_eval/k2-eval-knowledge.csv"),
        ),
    ],
}
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


def write_bytes_atomic(path: Path, body: bytes) -> None:
    """Write ``body`` to ``path`` unchanged, via a temp file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    return fetch_hub(KULLM_V2_REPO, path, lock_path)


def fetch_source(repo: str, lock_path: Path, filename: str | None, path: Path) -> int:
    """:func:`fetch_hub` with the path last (what ``main``'s table calls)."""
    return fetch_hub(repo, path, lock_path, filename)


def fetch_hub(repo: str, path: Path, lock_path: Path, filename: str | None = None) -> int:
    """Load hub dataset ``repo`` (its train split, or the JSON array ``filename`` in it) at the pinned (or current)
    commit, write it to ``path`` as JSONL and check or record its pin in ``lock_path``; return rows written."""
    try:
        import datasets
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError as e:
        raise FetchError(f"could not fetch {repo} ({_one_line(e)}): pip install datasets") from None
    lock = read_lock(lock_path)
    try:
        revision = lock["revision"] if lock else HfApi().dataset_info(repo).sha
        if filename is None:
            ds = datasets.load_dataset(repo, split="train", revision=revision)
        else:
            local = hf_hub_download(repo, filename, repo_type="dataset", revision=revision)
            ds = json.loads(Path(local).read_text(encoding="utf-8"))
    except Exception as e:  # the hub raises many types: connection, offline mode, missing repo
        raise FetchError(f"could not fetch {repo} ({_one_line(e)}): {_hub_hint()}") from None
    staged = path.with_name(f".{path.name}.staged")  # replaces ``path`` only once it passed the check
    n = write_jsonl_atomic(staged, (json.dumps(row, ensure_ascii=False, default=str) for row in ds))
    if lock:
        check_pinned(staged, lock)
    os.replace(staged, path)
    if not lock:
        lock = {"repo": repo, "revision": revision, "sha256": sha256_of(path), "rows": n}
        lock_path.write_text(json.dumps(lock, indent=2) + "\n", encoding="utf-8")
        print(f"{PROG}: pinned {repo} at {revision} in {lock_path} (commit it to pin the set for everyone)")
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
    write_bytes_atomic(path, body)
    return len(rows)


def fetch_pinned_files(files: list[tuple[str, str | None, Path]], out: Path, lock_path: Path, timeout: float) -> int:
    """Download each ``(url, sha256, path)``, check its sha256 (a ``None`` one against ``lock_path``, which the first
    fetch writes) and write its bytes unchanged under ``out``; nothing is written unless every file checks out.
    Returns the first file's line count."""
    lock = json.loads(lock_path.read_text(encoding="utf-8")) if lock_path.exists() else {}
    bodies = []
    for url, want, rel in files:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = resp.read()
        except Exception as e:  # URLError, HTTPError, timeouts, connection resets, bad URLs
            raise FetchError(f"could not fetch {url} ({_one_line(e)}): are you online?") from None
        got = hashlib.sha256(body).hexdigest()
        want = want or lock.get(str(rel))
        if want and got != want:
            raise FetchError(f"{url}: sha256 {got[:16]}… is not the pinned {want[:16]}… (another version?)")
        lock.setdefault(str(rel), got)
        bodies.append((out / rel, body))
    for path, body in bodies:
        write_bytes_atomic(path, body)
    if any(want is None for _, want, _ in files) and not lock_path.exists():
        lock_path.write_text(json.dumps(lock, indent=2) + "\n", encoding="utf-8")
        print(f"{PROG}: pinned the sha256 of {', '.join(str(r) for _, w, r in files if w is None)} in {lock_path}")
    return bodies[0][1].count(b"\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fetch KULLM v2 (hub) and the KULLM evaluation set (GitHub) as JSONL.",
    )
    parser.add_argument("--out", type=Path, default=Path("data"), help="data folder to write into (default: data)")
    parser.add_argument(
        "--only",
        action="append",
        choices=(*TARGETS, *KULLM_V2_SOURCES, *BENCH_FILES, *PREFERENCE_SETS),
        help=f"fetch only this target; repeatable (default: {', '.join(TARGETS)})",
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
    for name, (repo, filename) in KULLM_V2_SOURCES.items():
        lock = args.out / SOURCES_DIR / f"{name}.lock.json"
        jobs[name] = (args.out / SOURCES_DIR / f"{name}.jsonl", functools.partial(fetch_source, repo, lock, filename))
    for name, repo in PREFERENCE_SETS.items():
        lock = args.out / f"{name}.lock.json"
        jobs[name] = (args.out / name / f"{name}.jsonl", lambda p, repo=repo, lock=lock: fetch_hub(repo, p, lock))
    for name, files in BENCH_FILES.items():  # skipped once the last file of the target is there
        fetch = functools.partial(fetch_pinned_files, files, args.out, args.out / f"{name}.lock.json", args.timeout)
        jobs[name] = (args.out / files[-1][2], lambda p, fetch=fetch: fetch())
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
