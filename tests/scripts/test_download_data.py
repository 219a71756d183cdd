"""scripts/download_data.py: clear one-line failures offline, and a real (local) HTTP fetch of the eval set."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, SHARED_EVAL_SET

SCRIPT = ROOT / "scripts" / "download_data.py"
EVAL_REL = Path("eval") / "user_oriented_instructions_eval.jsonl"
EVAL_ROWS = [
    {
        "id": "user_oriented_task_0",
        "motivation_app": "Grammarly",
        "instruction": "다음 문장의 맞춤법을 고쳐 주세요.",
        "instances": [{"input": "내일 뵈요!", "output": "내일 봬요!"}],
    },
    {
        "id": "user_oriented_task_1",
        "motivation_app": "Google Search",
        "instruction": "서울의 날씨를 알려 주세요. 😊",
        "instances": [{"input": "", "output": "오늘 서울은 맑습니다."}],
    },
    {
        "id": "user_oriented_task_2",
        "motivation_app": "Python",
        "instruction": "Format {name} with a value.",
        "instances": [{"input": "### 응답:", "output": "ok"}, {"input": "x", "output": "y"}],
    },
]

BODY = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EVAL_ROWS).encode("utf-8")
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()


def run_script(tmp_path: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    """Run the script in a clean, offline-safe environment (no proxies, an empty HF cache under tmp_path)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "data"), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=tmp_path,
        timeout=60,
    )


def assert_clear_failure(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("download_data: ")]
    assert len(lines) == 1, proc.stderr
    assert f"could not fetch {what} (" in lines[0], lines[0]
    assert "are you online?" in lines[0], lines[0]


def test_kullm_v2_offline_fails_clearly(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "--only", "kullm-v2", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert_clear_failure(proc, "nlpai-lab/kullm-v2")
    assert not (tmp_path / "data" / "kullm-v2" / "kullm-v2.jsonl").exists()


def test_eval_unreachable_fails_clearly(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/none"
    proc = run_script(tmp_path, "--only", "eval", "--timeout", "5", KULLM_EVAL_URL=url)
    assert_clear_failure(proc, url)
    out_dir = tmp_path / "data" / "eval"
    assert not out_dir.exists() or not any(out_dir.iterdir())  # no file, no leftover temp file


class _Handler(http.server.BaseHTTPRequestHandler):
    body: bytes = b""

    def do_GET(self) -> None:
        if self.path != "/eval.jsonl":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
        pass


@pytest.fixture
def eval_server() -> Iterator[str]:
    """Serve EVAL_ROWS as JSONL on 127.0.0.1 (random port); yield the base URL."""
    body = BODY
    handler = type("Handler", (_Handler,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_eval_fetch_writes_jsonl(tmp_path: Path, eval_server: str) -> None:
    url = f"{eval_server}/eval.jsonl"
    proc = run_script(tmp_path, "--only", "eval", KULLM_EVAL_URL=url, KULLM_EVAL_SHA256=BODY_SHA256)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data" / EVAL_REL
    assert f"wrote {len(EVAL_ROWS)} rows to {out}" in proc.stdout
    text = out.read_text(encoding="utf-8")
    assert "봬요" in text and "😊" in text  # written as UTF-8, not \u escapes
    assert [json.loads(line) for line in text.splitlines()] == EVAL_ROWS
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind

    # an existing file is kept unless --force
    out.write_text("{}\n", encoding="utf-8")
    proc = run_script(tmp_path, "--only", "eval", KULLM_EVAL_URL=url)
    assert proc.returncode == 0 and "skipped" in proc.stdout
    assert out.read_text(encoding="utf-8") == "{}\n"
    proc = run_script(tmp_path, "--only", "eval", "--force", KULLM_EVAL_URL=url, KULLM_EVAL_SHA256=BODY_SHA256)
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(EVAL_ROWS)


def test_eval_http_error_fails_clearly(tmp_path: Path, eval_server: str) -> None:
    url = f"{eval_server}/missing.jsonl"
    proc = run_script(tmp_path, "--only", "eval", KULLM_EVAL_URL=url)
    assert_clear_failure(proc, url)
    assert "404" in proc.stderr


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("download_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_url_is_pinned_to_the_commit_that_holds_the_file():
    dd = load_script()
    assert dd.KULLM_COMMIT in dd.EVAL_URL and "/master/" not in dd.EVAL_URL
    assert len(dd.EVAL_SHA256) == 64


def test_eval_with_another_checksum_is_refused_and_nothing_written(tmp_path: Path, eval_server: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "data"), "--only", "eval"],
        capture_output=True,
        text=True,
        env={**os.environ, "KULLM_EVAL_URL": f"{eval_server}/eval.jsonl", "NO_PROXY": "127.0.0.1"},
        timeout=60,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is not the pinned de8441249185a283" in proc.stderr
    assert not (tmp_path / "data" / EVAL_REL).exists()


@pytest.mark.skipif(not SHARED_EVAL_SET.exists(), reason="needs ../shared/data/kullm (the real evaluation set)")
def test_the_real_eval_set_passes_its_pinned_checksum_and_is_kept_byte_for_byte(tmp_path: Path) -> None:
    body = SHARED_EVAL_SET.read_bytes()
    handler = type("Handler", (_Handler,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/eval.jsonl"
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--out", str(tmp_path / "data"), "--only", "eval"],
            capture_output=True,
            text=True,
            env={**os.environ, "KULLM_EVAL_URL": url, "NO_PROXY": "127.0.0.1"},
            timeout=60,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    assert "wrote 252 rows" in proc.stdout
    assert (tmp_path / "data" / EVAL_REL).read_bytes() == body


def test_a_v2_file_that_does_not_match_its_lock_is_refused(tmp_path: Path) -> None:
    dd = load_script()
    f = tmp_path / "kullm-v2.jsonl"
    f.write_text('{"id": "a", "instruction": "질문", "input": "", "output": "답"}\n', encoding="utf-8")
    good = {"repo": dd.KULLM_V2_REPO, "revision": "0" * 40, "sha256": dd.sha256_of(f)}
    dd.check_pinned(f, good)  # passes, file kept
    assert f.exists()
    with pytest.raises(dd.FetchError, match="the lock pins"):
        dd.check_pinned(f, {**good, "sha256": "f" * 64})
    assert not f.exists()
    lock = tmp_path / "kullm-v2.lock.json"
    lock.write_text('{"repo": "x"}', encoding="utf-8")
    with pytest.raises(dd.FetchError, match="not a valid lock file"):
        dd.read_lock(lock)
    lock.write_text(json.dumps(good), encoding="utf-8")
    assert dd.read_lock(lock)["revision"] == "0" * 40
