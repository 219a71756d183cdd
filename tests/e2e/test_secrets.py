"""No credential is written anywhere a run leaves files, nor printed: planted secrets, every file scanned."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chat_server import ChatServer
from console_scripts import run_script
from helpers import make_adapter

TOKEN, PASSWORD, KEY = "hf_PLANTEDtoken9137", "PLANTEDpass4242", "sk-PLANTEDkey5151"
SECRETS = [f"+hub.hf_token={TOKEN}", f"+hub.password={PASSWORD}"]


def leaks(folder: Path) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in (TOKEN, PASSWORD, KEY) if s.encode() in data]
    return found


def run(module: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", f"kullm.{module}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    for s in (TOKEN, PASSWORD, KEY):
        assert s not in proc.stdout + proc.stderr, f"{s} printed by kullm-{module}"
    return proc


@pytest.mark.slow
def test_a_training_run_leaves_no_secret_in_any_file(tmp_path):
    out = tmp_path / "run"
    proc = run(
        "train", "experiment=smoke", "logger=wandb", "trainer.max_steps=2", "callbacks.samples.num=1",
        f"data.cache_dir={tmp_path}/cache", f"hydra.run.dir={out}", *SECRETS,
        cwd=tmp_path, env={"WANDB_MODE": "offline"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "adapter/kullm_config.yaml"} <= files
    assert any(f.startswith("wandb/offline-run-") and f.endswith(".wandb") for f in files)
    assert leaks(out) == []
    assert "<redacted>" in (out / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")


def test_cfg_job_prints_no_secret(tmp_path):
    for module, extra in (("train", ["experiment=smoke"]), ("generate", []), ("evaluate", []), ("prepare", [])):
        proc = run(module, *extra, *SECRETS, "--cfg", "job", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "hf_token: <redacted>" in proc.stdout and "password: <redacted>" in proc.stdout


def test_generate_and_eval_runs_leave_no_secret(tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    gen = tmp_path / "gen"
    proc = run(
        "generate", f"adapter={adapter}", "prompt=안녕", "generation=greedy", "generation.max_new_tokens=4",
        f"hydra.run.dir={gen}", *SECRETS, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert leaks(gen) == [] and (gen / ".hydra" / "overrides.yaml").is_file()

    rows = [{"id": f"q{i}", "instruction": f"질문 {i}", "input": "", "response": "답"} for i in range(3)]
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ev = tmp_path / "eval"
    with ChatServer(faults=lambda key, n: "echo400" if n == 1 else "echo") as s:  # echoes the Authorization header
        proc = run(
            "evaluate", f"responses={resp}", f"judge.base_url={s.url}", "judge.backoff_base=0.01", "progress=false",
            "references=null", f"output_dir={ev}", *SECRETS, cwd=tmp_path, env={"OPENAI_API_KEY": KEY},
        )  # fmt: skip
        assert s.headers[0]["Authorization"] == f"Bearer {KEY}"  # the key was really sent
    assert proc.returncode == 0, proc.stderr[-3000:]
    (judgments,) = ev.glob("*.judgments.jsonl")
    judged = [json.loads(x) for x in judgments.read_text(encoding="utf-8").splitlines()]
    assert len(judged) == 2 and all("Bearer <redacted>" in j["raw"] for j in judged)
    (pending,) = (
        json.loads((ev / "summary.json").read_text(encoding="utf-8"))["runs"].popitem()[1]["pending_errors"].values()
    )
    assert "HTTP 400" in pending and "Bearer <redacted>" in pending  # the echoed error body, scrubbed
    assert leaks(ev) == []


def test_a_judge_url_with_a_password_and_a_query_key_leaves_no_trace_and_reaches_the_right_endpoint(tmp_path):
    rows = [{"id": f"q{i}", "instruction": f"질문 {i}", "input": "", "response": "답"} for i in range(2)]
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ev = tmp_path / "eval"
    with ChatServer() as s:
        base = s.url.replace("http://", f"http://judge-user:{PASSWORD}@") + f"?api-key={KEY}&api-version=2024-06-01"
        proc = run_script(
            "kullm-eval", f"responses={resp}", f"judge.base_url='{base}'", "progress=false", "references=null",
            f"output_dir={ev}", cwd=tmp_path, timeout=300,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s.paths == [f"/v1/chat/completions?api-key={KEY}&api-version=2024-06-01"] * 2
    for secret in (PASSWORD, KEY):
        assert secret not in proc.stdout + proc.stderr
    assert leaks(ev) == []
    log = (ev / "evaluate.log").read_text(encoding="utf-8")
    assert "HTTP Request" not in log  # no line per request
    overrides = (ev / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")
    assert "http://<redacted>@127.0.0.1:" in overrides and "api-key=<redacted>&api-version=2024-06-01" in overrides
    private = [ev / ".hydra" / n for n in ("config.yaml", "hydra.yaml", "overrides.yaml")] + [ev / "evaluate.log"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in private} == {p.name: "0o600" for p in private}
