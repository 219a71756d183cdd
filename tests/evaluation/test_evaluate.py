"""``kullm-eval`` end to end against a real local chat-completions server: numbers, resume, kills, faults."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from chat_server import CRITERIA, ChatServer, default_scores, random_faults
from helpers import eval_cfg, eval_set_file, make_adapter
from omegaconf import OmegaConf

from kullm.config import ROOT, compose
from kullm.data.records import read_records
from kullm.evaluation import pipeline as ev

EVAL_SET = eval_set_file()
MAXES = {name: hi for name, _, hi in CRITERIA}
MINS = {name: lo for name, lo, _ in CRITERIA}


def scaled(name: str, mean: float) -> float:
    return (mean - MINS[name]) / (MAXES[name] - MINS[name]) * 100


@pytest.fixture(scope="module")
def eval_records():
    records, _ = read_records(EVAL_SET)
    assert len(records) == 252
    return records


def write_responses(path: Path, records, answer=lambda r: f"응답 {r.id}") -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            row = {"id": r.id, "instruction": r.instruction, "input": r.input, "response": answer(r)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def judgments(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected_means(keys) -> dict[str, float]:
    scores = [default_scores(k) for k in keys]
    return {name: sum(s[name] for s in scores) / len(scores) for name in MAXES}


def test_end_to_end_252_numbers_and_tables(tmp_path, eval_records):
    resp = write_responses(tmp_path / "kullm-v2.jsonl", eval_records)
    out = tmp_path / "out"
    with ChatServer() as s:
        summary = ev.evaluate(eval_cfg(s, out, f"responses={resp}"))
        assert sorted(s.counts.values()) == [1] * 252
        again = ev.evaluate(eval_cfg(s, out, f"responses={resp}"))  # resume: everything judged, nothing asked
        assert sum(s.counts.values()) == 252
    run = summary["runs"]["kullm-v2"]
    assert (run["total"], run["judged"], run["failed"], run["not_judged"]) == (252, 252, 0, 0)
    assert run["notes"] == [] and run["relative"] is None
    means = expected_means(f"응답 {r.id}" for r in eval_records)
    assert run["means"] == pytest.approx(means)
    overall = sum(scaled(n, means[n]) for n in MAXES) / len(MAXES)
    assert run["overall"] == pytest.approx(overall)
    assert again["runs"]["kullm-v2"]["means"] == run["means"]

    lines = judgments(out / "kullm-v2.judgments.jsonl")
    assert sorted(j["id"] for j in lines) == sorted(r.id for r in eval_records)
    first = next(j for j in lines if j["id"] == "user_oriented_task_0")
    assert first["scores"] == default_scores("응답 user_oriented_task_0") and first["attempts"] == 1
    assert (first["judge"], first["model"], len(first["prompt_hash"])) == ("openai", "gpt-4o-2024-08-06", 12)

    with (out / "report.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["criterion"] for r in rows] == list(MAXES) + ["overall"]
    for r in rows[:-1]:
        assert float(r["mean"]) == pytest.approx(means[r["criterion"]])
        assert float(r["scaled"]) == pytest.approx(scaled(r["criterion"], means[r["criterion"]]))
        assert float(r["ci_low"]) < float(r["mean"]) < float(r["ci_high"]) and int(r["n"]) == 252
    assert float(rows[-1]["mean"]) == pytest.approx(overall)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert f"| kullm-v2 | 252 | 0 | 0 | {means['이해 가능성']:.2f} [" in md
    assert f"| {overall:.1f} [" in md and "WARNING" not in md

    import matplotlib.image

    img = matplotlib.image.imread(out / "report.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["runs"]["kullm-v2"]["judged"] == 252


def test_side_by_side_runs_and_relative_score(tmp_path, eval_records):
    recs = eval_records[:20]
    a = write_responses(tmp_path / "gpt4.jsonl", recs, lambda r: f"A {r.id}")
    b = write_responses(tmp_path / "kullm.jsonl", recs, lambda r: f"B {r.id}")
    top = {name: hi for name, hi in MAXES.items()}
    scores = lambda key: top if key.startswith("A") else default_scores(key)  # noqa: E731
    with ChatServer(scores=scores) as s:
        summary = ev.evaluate(eval_cfg(s, tmp_path / "o", f"responses=[{a},{b}]", "reference=gpt4"))
    runs = summary["runs"]
    assert runs["gpt4"]["overall"] == pytest.approx(100.0) and runs["gpt4"]["relative"] == pytest.approx(100.0)
    means = expected_means(f"B {r.id}" for r in recs)
    overall = sum(scaled(n, means[n]) for n in MAXES) / len(MAXES)
    assert runs["kullm"]["overall"] == pytest.approx(overall) and runs["kullm"]["relative"] == pytest.approx(overall)
    with (tmp_path / "o" / "report.csv").open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["criterion"] == "overall"]
    assert [(r["run"], round(float(r["relative"]), 6)) for r in rows] == [("gpt4", 100.0), ("kullm", round(overall, 6))]
    assert "relative to gpt4 (%)" in (tmp_path / "o" / "report.md").read_text(encoding="utf-8")


def test_injected_crash_then_rerun_judges_every_id_once(tmp_path, eval_records, monkeypatch):
    resp = write_responses(tmp_path / "resp.jsonl", eval_records)
    out = tmp_path / "out"
    real_write, written = ev.AppendLog.write, []

    def crashing_write(self, obj):
        if len(written) == 40:
            raise RuntimeError("injected crash")
        written.append(obj["id"])
        real_write(self, obj)

    with ChatServer() as s:
        monkeypatch.setattr(ev.AppendLog, "write", crashing_write)
        with pytest.raises(RuntimeError, match="injected crash"):
            ev.evaluate(eval_cfg(s, out, f"responses={resp}", "judge.concurrency=4"))
        assert [j["id"] for j in judgments(out / "resp.judgments.jsonl")] == written
        monkeypatch.setattr(ev.AppendLog, "write", real_write)
        asked_before = sum(s.counts.values())
        summary = ev.evaluate(eval_cfg(s, out, f"responses={resp}", "judge.concurrency=4"))
        ids = [j["id"] for j in judgments(out / "resp.judgments.jsonl")]
        assert sorted(ids) == sorted(r.id for r in eval_records)  # every id, once
        assert all(s.counts[f"응답 {i}"] == 1 for i in written)  # finished ones are never asked again
        assert sum(s.counts.values()) - asked_before == 252 - 40
    assert summary["runs"]["resp"]["judged"] == 252


def run_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kullm.evaluate", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_after(proc: subprocess.Popen, path: Path, n: int, timeout: float = 60.0) -> int:
    """SIGKILL ``proc`` once ``path`` holds at least ``n`` lines; return how many it held at the kill."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before the kill: {proc.stdout.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return path.read_bytes().count(b"\n")


def cli_args(s: ChatServer, resp: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"responses={resp}",
        f"judge.base_url={s.url}",
        f"output_dir={out}",
        f"references={EVAL_SET}",
        "progress=false",
        "judge.backoff_base=0.01",
        "judge.backoff_max=0.05",
        *extra,
    ]


def test_sigkill_mid_run_then_same_command_completes(tmp_path, eval_records):
    resp = write_responses(tmp_path / "resp.jsonl", eval_records)
    out = tmp_path / "out"
    path = out / "resp.judgments.jsonl"
    with ChatServer(delay_s=0.02) as s:
        args = cli_args(s, resp, out, "judge.concurrency=4")
        held = kill_after(run_cli(*args), path, 60)
        assert 60 <= held < 252
        done = run_cli(*args)
        log_text, _ = done.communicate(timeout=120)
        assert done.returncode == 0, log_text
        ids = [j["id"] for j in judgments(path)]
        assert sorted(ids) == sorted(r.id for r in eval_records)
        assert sum(s.counts.values()) <= 252 + 4  # at most the in-flight requests were asked twice
    assert (out / "report.md").exists() and (out / ".hydra" / "config.yaml").exists()
    assert "| resp | 252 | 0 | 0 |" in (out / "report.md").read_text(encoding="utf-8")


def test_half_written_line_is_cut_and_duplicates_keep_the_first(tmp_path, eval_records, caplog):
    recs = eval_records[:5]
    resp = write_responses(tmp_path / "resp.jsonl", recs)
    out = tmp_path / "out"
    path = out / "resp.judgments.jsonl"
    with ChatServer() as s:
        ev.evaluate(eval_cfg(s, out, f"responses={resp}", "limit=1"))
        (first,) = judgments(path)
        dup = {**first, "scores": {n: MAXES[n] for n in MAXES}}
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(dup, ensure_ascii=False) + "\n" + json.dumps(first)[:50])  # a kill mid-write
        caplog.set_level(logging.WARNING)
        summary = ev.evaluate(eval_cfg(s, out, f"responses={resp}"))
        assert s.counts[f"응답 {recs[0].id}"] == 1 and sum(s.counts.values()) == 5
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and all(json.loads(x) for x in lines)  # the partial line is gone
    assert "cutting a half-written last line" in caplog.text and "duplicate judgment" in caplog.text
    assert summary["runs"]["resp"]["means"] == pytest.approx(expected_means(f"응답 {r.id}" for r in recs))


def test_judgments_from_another_prompt_are_not_mixed(tmp_path, eval_records):
    resp = write_responses(tmp_path / "resp.jsonl", eval_records[:4])
    with ChatServer() as s:
        ev.evaluate(eval_cfg(s, tmp_path / "o", f"responses={resp}", "limit=2"))
        with pytest.raises(ValueError, match="pass another output_dir"):
            ev.evaluate(eval_cfg(s, tmp_path / "o", f"responses={resp}", "judge_prompt=kullm_fixed"))
        assert sum(s.counts.values()) == 2


def test_reference_outputs_are_flagged_loudly(tmp_path, eval_records, caplog):
    resp = write_responses(tmp_path / "refs.jsonl", eval_records[:10], lambda r: r.output)
    caplog.set_level(logging.WARNING)
    with ChatServer() as s:
        summary = ev.evaluate(eval_cfg(s, tmp_path / "o", f"responses={resp}"))
    msg = "10 of 10 responses in"
    assert msg in caplog.text and "equal the eval set's reference outputs" in caplog.text
    assert any(msg in n for n in summary["runs"]["refs"]["notes"])
    assert f"> **WARNING (refs)**: {msg}" in (tmp_path / "o" / "report.md").read_text(encoding="utf-8")


def test_bad_rows_are_reported_and_empty_answers_judged(tmp_path, eval_records):
    recs = eval_records[:4]
    rows = [
        json.dumps(
            {"id": r.id, "instruction": r.instruction, "input": r.input, "response": f"응답 {r.id}"}, ensure_ascii=False
        )
        for r in recs
    ]
    rows[1] = json.dumps({"id": "empty", "instruction": "x", "input": "", "response": ""})
    rows.insert(2, '{"id": "broken", "instruction": ')
    rows.append(json.dumps({"id": "noinst", "response": "y"}))
    resp = tmp_path / "resp.jsonl"
    resp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with ChatServer() as s:
        summary = ev.evaluate(eval_cfg(s, tmp_path / "o", f"responses={resp}"))
        assert s.counts[""] == 1  # the empty answer was judged
    run = summary["runs"]["resp"]
    assert run["total"] == 4 and run["judged"] == 4
    assert [n.split(" (")[0] for n in run["notes"]] == [
        f"{resp}:3: <row>: malformed_json",
        f"{resp}:6: instruction: missing_field",
    ]
    rejects = [json.loads(x) for x in (tmp_path / "o" / "resp.rejects.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rejects] == [f"{resp}:3", f"{resp}:6"]


def test_parse_failures_and_failed_requests_are_reported_never_zero(tmp_path, eval_records):
    recs = eval_records[:30]
    resp = write_responses(tmp_path / "resp.jsonl", recs)
    bad, down = [f"응답 {recs[3].id}", f"응답 {recs[7].id}"], f"응답 {recs[11].id}"
    faults = lambda key, n: "garbage" if key in bad else "500" if key == down else "ok"  # noqa: E731
    out = tmp_path / "o"
    with ChatServer(faults=faults) as s:
        args = [f"responses={resp}", "max_parse_retries=1", "judge.max_retries=1"]
        summary = ev.evaluate(eval_cfg(s, out, *args))
        assert [s.counts[k] for k in bad] == [2, 2] and s.counts[down] == 2
    run = summary["runs"]["resp"]
    assert (run["judged"], run["failed"], run["not_judged"]) == (27, 2, 1)
    assert list(run["pending_errors"]) == [recs[11].id]
    ok_keys = [f"응답 {r.id}" for k, r in enumerate(recs) if k not in (3, 7, 11)]
    assert run["means"] == pytest.approx(expected_means(ok_keys))  # failures are not scored as 0
    failed = [j for j in judgments(out / "resp.judgments.jsonl") if j["status"] == "failed"]
    assert sorted(j["id"] for j in failed) == sorted([recs[3].id, recs[7].id])
    assert all(j["raw"] == "I cannot evaluate this response." and j["attempts"] == 2 for j in failed)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "2 judgments unparseable after retries" in md and "1 ids not judged" in md
    with ChatServer() as s:  # the server recovers: the failed request is asked again, the parse failures are final
        summary = ev.evaluate(eval_cfg(s, out, *args))
        assert dict(s.counts) == {down: 1}
    assert (summary["runs"]["resp"]["judged"], summary["runs"]["resp"]["not_judged"]) == (28, 0)


def test_wandb_offline_run_has_the_table_and_no_secret(tmp_path, eval_records, monkeypatch):
    """A real (offline) W&B run: the report table is in it; a key in the config or the environment is not."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-envkey-should-not-leak")
    monkeypatch.setenv("WANDB_MODE", "offline")
    resp = write_responses(tmp_path / "resp.jsonl", eval_records[:6])
    out = tmp_path / "o"
    with ChatServer() as s:
        ev.evaluate(
            eval_cfg(s, out, f"responses={resp}", "wandb.enabled=true", "+judge.api_key=sk-cfgkey-should-not-leak")
        )
    (run,) = out.glob("wandb/offline-run-*")
    (table,) = run.glob("files/media/table/eval/report_*.table.json")
    data = json.loads(table.read_text(encoding="utf-8"))
    assert data["columns"][:3] == ["run", "criterion", "label"] and len(data["data"]) == 7
    blob = b"".join(p.read_bytes() for p in run.rglob("*") if p.is_file())
    assert b"sk-envkey-should-not-leak" not in blob and b"sk-cfgkey-should-not-leak" not in blob
    assert b"<redacted>" in blob  # the config was logged, with the key hidden


def test_adapter_mode_generates_first(tmp_path, eval_records, monkeypatch):
    """The glue only (generation itself is tested with kullm-generate): the responses file is made once."""
    calls = []

    def generate_file(cfg):
        calls.append(cfg)
        return write_responses(Path(cfg["output_file"]), eval_records[:3])

    monkeypatch.setitem(sys.modules, "kullm.inference.files", types.SimpleNamespace(generate_file=generate_file))
    monkeypatch.setattr(
        ev,
        "_compose_generate",
        lambda overrides: OmegaConf.create({"generation": {}, **dict(o.lstrip("+").split("=", 1) for o in overrides)}),
    )
    adapter = tmp_path / "run1" / "adapter"
    with ChatServer() as s:
        for _ in range(2):
            summary = ev.evaluate(eval_cfg(s, tmp_path / "o", f"adapter={adapter}", f"eval_set={EVAL_SET}"))
        assert len(calls) == 1
        assert calls[0]["adapter"] == str(adapter) and calls[0]["input_file"] == str(EVAL_SET)
        assert calls[0]["generation"] == eval_cfg(s, tmp_path / "o").generation  # kullm-eval's generation.* settings
        assert summary["runs"]["run1-adapter"]["judged"] == 3
        assert (tmp_path / "o" / "run1-adapter.responses.jsonl").exists()
        with pytest.raises(ValueError, match="exactly one of"):
            ev.evaluate(eval_cfg(s, tmp_path / "o"))


TRANSPORT = {"429", "500", "503", "slow", "truncated", "badjson", "drop"}


def simulate(faults, key: str, max_retries: int, max_parse_retries: int) -> tuple[int, str]:
    """Requests made for ``key`` and its outcome (ok / failed / pending), by the documented retry rules."""
    n = 0
    for _ in range(max_parse_retries + 1):
        for _ in range(max_retries + 1):
            n += 1
            kind = faults(key, n)
            if kind not in TRANSPORT:
                break
        else:
            return n, "pending"
        if kind not in ("garbage", "outofrange"):
            return n, "ok"
    return n, "failed"


@pytest.mark.slow
def test_soak_high_fault_rate_every_id_judged_or_reported_once(tmp_path, eval_records):
    resp = write_responses(tmp_path / "resp.jsonl", eval_records)
    out = tmp_path / "o"
    kinds = ("429", "500", "503", "slow", "truncated", "badjson", "garbage", "drop", "outofrange")
    args = [
        f"responses={resp}",
        "judge.timeout=2",  # wide of a loaded CI box's slowest honest reply, and of the server's "slow" (5 s)
        "judge.max_retries=2",
        "max_parse_retries=1",
        "judge.concurrency=16",
        "judge.logprobs=true",
    ]
    faults = random_faults(0.6, seed=1, kinds=kinds)
    with ChatServer(faults=faults, slow_s=5.0) as s:
        summary = ev.evaluate(eval_cfg(s, out, *args))
        counts = dict(s.counts)
    run = summary["runs"]["resp"]
    lines = judgments(out / "resp.judgments.jsonl")
    ids = [j["id"] for j in lines]
    assert len(ids) == len(set(ids))  # none twice
    assert set(ids) | set(run["pending_errors"]) == {r.id for r in eval_records}  # every id judged or reported
    assert not set(ids) & set(run["pending_errors"])
    assert run["judged"] + run["failed"] + run["not_judged"] == 252 and run["failed"] > 0 and run["not_judged"] > 0
    # the exact outcome and request count of every id, from the fault plan and the retry rules
    expect = {
        f"응답 {r.id}": simulate(faults, f"응답 {r.id}", max_retries=2, max_parse_retries=1) for r in eval_records
    }
    assert counts == {k: n for k, (n, _) in expect.items()} and sum(counts.values()) > 450
    status = {j["id"]: j["status"] for j in lines} | {i: "pending" for i in run["pending_errors"]}
    assert status == {r.id: expect[f"응답 {r.id}"][1] for r in eval_records}
    ok = [j for j in lines if j["status"] == "ok"]
    assert all(j["scores"] == default_scores(f"응답 {j['id']}") for j in ok)  # a fault never changes a score
    with ChatServer() as s:
        summary = ev.evaluate(eval_cfg(s, out, *args))
        assert sum(s.counts.values()) == run["not_judged"]
    ids = [j["id"] for j in judgments(out / "resp.judgments.jsonl")]
    assert sorted(ids) == sorted(r.id for r in eval_records)
    assert summary["runs"]["resp"]["not_judged"] == 0


@pytest.mark.slow
def test_repeated_kills_under_faults_then_completion(tmp_path, eval_records):
    resp = write_responses(tmp_path / "resp.jsonl", eval_records)
    out = tmp_path / "o"
    path = out / "resp.judgments.jsonl"
    faults = random_faults(0.4, seed=2, kinds=("429", "500", "truncated", "drop", "garbage"))
    with ChatServer(faults=faults, delay_s=0.02) as s:
        args = cli_args(s, resp, out, "judge.concurrency=8", "max_parse_retries=3", "judge.max_retries=8")
        held = 0
        for target in (50, 110, 170):
            held = kill_after(run_cli(*args), path, target)
            assert held >= target
        done = run_cli(*args)
        text, _ = done.communicate(timeout=120)
        assert done.returncode == 0, text
    ids = [j["id"] for j in judgments(path)]
    assert sorted(ids) == sorted(r.id for r in eval_records)


@pytest.mark.slow
def test_adapter_mode_with_real_generation(tmp_path, eval_records):
    """checkpoint -> table in one command: kullm-generate on a tiny LoRA adapter, then the judge."""
    adapter = make_adapter(tmp_path / "ckpt" / "adapter")
    eval_set = tmp_path / "eval.jsonl"  # the first 3 items of the eval set, flat layout
    eval_set.write_text("".join(json.dumps(r.__dict__, ensure_ascii=False) + "\n" for r in eval_records[:3]))
    gen = 'generate_overrides=["generation=greedy","generation.max_new_tokens=8"]'
    out = tmp_path / "o"
    with ChatServer() as s:
        summary = ev.evaluate(eval_cfg(s, out, f"adapter={adapter}", f"eval_set={eval_set}", gen))
        responses = out / "ckpt-adapter.responses.jsonl"
        rows = [json.loads(x) for x in responses.read_text(encoding="utf-8").splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(r.id for r in eval_records[:3])
        assert sorted(s.counts) == sorted(r["response"] for r in rows)  # the generated answers were judged
        mtime = responses.stat().st_mtime_ns
        again = ev.evaluate(eval_cfg(s, out, f"adapter={adapter}", f"eval_set={eval_set}", gen))
        assert responses.stat().st_mtime_ns == mtime and sum(s.counts.values()) == 3  # nothing redone
    assert summary["runs"]["ckpt-adapter"]["judged"] == 3 == again["runs"]["ckpt-adapter"]["judged"]


@pytest.mark.parametrize("layout", ["flat", "instances"])
def test_kullm_format_responses_with_output_are_judged(tmp_path, eval_records, layout):
    """KULLM's own eval script reads the answer from ``output`` (flat, or ``instances[0].output``)."""
    recs = eval_records[:3]
    with (tmp_path / "kullm.jsonl").open("w", encoding="utf-8") as f:
        for r in recs:
            if layout == "flat":
                row = {"id": r.id, "instruction": r.instruction, "input": r.input, "output": f"응답 {r.id}"}
            else:
                row = {
                    "id": r.id,
                    "instruction": r.instruction,
                    "instances": [{"input": r.input, "output": f"응답 {r.id}"}],
                }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with ChatServer() as s:
        summary = ev.evaluate(eval_cfg(s, tmp_path / "o", f"responses={tmp_path / 'kullm.jsonl'}"))
    run = summary["runs"]["kullm"]
    assert (run["total"], run["judged"], run["notes"]) == (3, 3, [])
    assert run["means"] == pytest.approx(expected_means(f"응답 {r.id}" for r in recs))


@pytest.mark.parametrize("name", ["../../../x", "/tmp/abs", ".hidden", "a/b", "a..b"])
def test_run_names_cannot_write_outside_output_dir(tmp_path, name):
    resp = tmp_path / "r.jsonl"
    resp.write_text(json.dumps({"id": "a", "instruction": "q", "response": "r"}) + "\n", encoding="utf-8")
    cfg = compose("eval", [f"output_dir={tmp_path}/o"])
    cfg.responses = {name: str(resp)}
    with pytest.raises(ValueError, match="names files inside output_dir"):
        ev.evaluate(cfg)
    assert not [p for p in tmp_path.rglob("*.judgments.jsonl")]


def test_derived_run_names_are_plain_file_names():
    assert ev.run_names(["../responses.jsonl", "/a/b c/out.jsonl", "x/.y.jsonl"]) == ["-responses", "out", "y"]


def test_multi_turn_responses_are_judged_with_their_conversation(tmp_path):
    """kullm-generate's conversation rows (history + response) and a conversation whose last assistant turn is the
    answer; bad conversation rows are named with file:line."""
    chat = [json.loads(x) for x in (ROOT / "data" / "sample_chat" / "messages.jsonl").read_text().splitlines()]
    multi = [c for c in chat if sum(m["role"] == "user" for m in c["messages"]) > 1][:3]
    rows = [{"id": c["id"], "messages": c["messages"][:-1], "response": f"응답 {c['id']}",
             "reference": c["messages"][-1]["content"], "generation": {}} for c in multi]  # fmt: skip
    rows.append({"id": "whole", "messages": multi[0]["messages"]})  # judged: its own last assistant turn
    bad = [{"id": "unanswered", "messages": multi[0]["messages"][:-1]},
           {"id": "twice", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "response": "c"}]  # fmt: skip
    resp = tmp_path / "chat.jsonl"
    resp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + bad), encoding="utf-8")
    with ChatServer() as s:
        summary = ev.evaluate(eval_cfg(s, tmp_path / "o", f"responses={resp}"))
        users = {r["messages"][1]["content"].split("Response:\n")[1].split("\n\n\nResult")[0]: r["messages"][1]
                 for r in s.requests}  # fmt: skip
    run = summary["runs"]["chat"]
    assert (run["total"], run["judged"], run["failed"]) == (4, 4, 0)
    answers = [f"응답 {c['id']}" for c in multi] + [multi[0]["messages"][-1]["content"]]
    assert run["means"] == pytest.approx(expected_means(answers))
    first = multi[0]["messages"]
    turns = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in first[:-2])
    assert users[answers[0]]["content"].startswith(f"Instruction:\n{first[-2]['content']}\n\nInput:\n{turns}\n\n")
    assert users[answers[3]]["content"] == users[answers[0]]["content"].replace(answers[0], answers[3])
    assert [n.split(" (")[0] for n in run["notes"]] == [
        f"{resp}:5: response: missing_field",
        f"{resp}:6: messages[1]: alternation",
    ]


def rewrite(path: Path, edit) -> None:
    """Apply ``edit(rows)`` to a responses JSONL in place (what a user does between two runs)."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    edit(rows)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_an_edited_response_instruction_or_input_is_judged_again_and_nothing_else(tmp_path, eval_records, caplog):
    recs = eval_records[:6]
    resp = write_responses(tmp_path / "resp.jsonl", recs)
    out = tmp_path / "out"

    def edit(rows):
        rows[0]["response"] = "고친 응답"
        rows[1]["instruction"] += " (고침)"
        rows[2]["input"] += " 추가 입력"

    with ChatServer() as s:
        ev.evaluate(eval_cfg(s, out, f"responses={resp}"))
        rewrite(resp, edit)
        caplog.set_level(logging.WARNING)
        summary = ev.evaluate(eval_cfg(s, out, f"responses={resp}"))
        again = ev.evaluate(eval_cfg(s, out, f"responses={resp}"))  # the new judgments are current: nothing asked
        asked = dict(s.counts)
    assert asked == {"고친 응답": 1, **{f"응답 {r.id}": 2 if r in recs[1:3] else 1 for r in recs}}
    run = summary["runs"]["resp"]
    note = f"3 responses changed since they were judged: judged again ({', '.join(r.id for r in recs[:3])})"
    assert run["notes"] == [note] and note in caplog.text
    assert (run["total"], run["judged"]) == (6, 6)
    assert run["means"] == pytest.approx(expected_means(["고친 응답", *(f"응답 {r.id}" for r in recs[1:])]))
    assert again["runs"]["resp"]["notes"] == [] and again["runs"]["resp"]["means"] == run["means"]


def test_judgments_written_before_keys_are_kept_with_a_note(tmp_path, eval_records):
    """An older kullm did not record what it judged: its judgments are taken as they are (no request, no spend),
    and the report says so and how to judge edited responses again."""
    recs = eval_records[:3]
    resp = write_responses(tmp_path / "resp.jsonl", recs)
    out = tmp_path / "out"
    path = out / "resp.judgments.jsonl"
    with ChatServer() as s:
        first = ev.evaluate(eval_cfg(s, out, f"responses={resp}"))
        path.write_text("".join(json.dumps({k: v for k, v in j.items() if k != "key"}, ensure_ascii=False) + "\n"
                                for j in judgments(path)), encoding="utf-8")  # fmt: skip
        rewrite(resp, lambda rows: rows[0].update(response="고친 응답"))
        summary = ev.evaluate(eval_cfg(s, out, f"responses={resp}"))
        assert sum(s.counts.values()) == 3
    run = summary["runs"]["resp"]
    assert run["notes"] == [
        "3 judgments in resp.judgments.jsonl come from an older kullm that did not record what was judged: kept as "
        "they are (delete the file to judge edited responses again)"
    ]
    assert run["means"] == first["runs"]["resp"]["means"]


def test_a_smaller_limit_than_before_reports_only_its_ids_and_asks_nothing(tmp_path, eval_records):
    recs = eval_records[:5]
    resp = write_responses(tmp_path / "resp.jsonl", recs)
    out = tmp_path / "out"
    with ChatServer() as s:
        ev.evaluate(eval_cfg(s, out, f"responses={resp}", "limit=4"))
        small = ev.evaluate(eval_cfg(s, out, f"responses={resp}", "limit=2"))
        assert sum(s.counts.values()) == 4
        report = (out / "report.md").read_text(encoding="utf-8")
        larger = ev.evaluate(eval_cfg(s, out, f"responses={resp}", "limit=5"))
        assert sum(s.counts.values()) == 5 and s.counts[f"응답 {recs[4].id}"] == 1  # only the one never judged
    run = small["runs"]["resp"]
    assert (run["total"], run["judged"], run["failed"], run["not_judged"]) == (2, 2, 0, 0)
    assert run["means"] == pytest.approx(expected_means(f"응답 {r.id}" for r in recs[:2]))
    assert "| resp | 2 | 0 | 0 |" in report
    assert (larger["runs"]["resp"]["total"], larger["runs"]["resp"]["judged"]) == (5, 5)
