"""scripts/download_data.py: clear one-line failures offline, and a real (local) HTTP fetch of the eval set."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EVAL_ROWS).encode("utf-8")
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
    proc = run_script(tmp_path, "--only", "eval", KULLM_EVAL_URL=url)
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
    proc = run_script(tmp_path, "--only", "eval", "--force", KULLM_EVAL_URL=url)
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(EVAL_ROWS)


def test_eval_http_error_fails_clearly(tmp_path: Path, eval_server: str) -> None:
    url = f"{eval_server}/missing.jsonl"
    proc = run_script(tmp_path, "--only", "eval", KULLM_EVAL_URL=url)
    assert_clear_failure(proc, url)
    assert "404" in proc.stderr
