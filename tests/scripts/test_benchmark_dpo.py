"""``python -m benchmarks.dpo``: its workload, and short runs of kullm's DPO and TRL's DPOTrainer end to end (each
variant's first step must read log 2: the policy equals the reference before the first update)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.dpo import pair_workload  # noqa: E402

PAIRS = ROOT / "data" / "sample_pref" / "pairs.jsonl"


def run_bench(tmp_path, *variants: str) -> tuple[str, dict[str, dict]]:
    """A 2-step, 1-repeat run of ``variants`` into ``tmp_path/BENCHMARKS.md``: the file, and each variant's result."""
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# B\n\n<!-- bench:head -->\nsft\n<!-- /bench:head -->\n\n## Reading the numbers\nnotes\n")
    work = tmp_path / "work"
    env = dict(os.environ)
    if os.environ.get("KULLM_TEST_CACHE"):
        env["KULLM_CACHE"] = os.environ["KULLM_TEST_CACHE"]  # the tiny tokenizer, built once
    cmd = [sys.executable, "-m", "benchmarks.dpo", "--data", str(PAIRS), "--variants", ",".join(variants),
           "--steps", "2", "--repeats", "1", "--out", str(out), "--work", str(work)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["variant"]: r for r in json.loads((work / "results.json").read_text())}
    return out.read_text(), results


def test_the_workload_repeats_the_pairs_with_distinct_prompts(tmp_path):
    out = tmp_path / "pairs.jsonl"
    n = pair_workload([PAIRS], out, 90)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert n == len(rows) == 120  # 40 bundled pairs, three copies
    assert len({r["prompt"] for r in rows}) == len({r["id"] for r in rows}) == 120
    assert rows[40]["prompt"] == rows[0]["prompt"] + " (2)" and rows[40]["chosen"] == rows[0]["chosen"]


def test_conversation_pairs_are_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^bench: .*chat_pairs\.jsonl.*conversation pairs are not benchmarked"):
        pair_workload([ROOT / "data" / "sample_pref" / "chat_pairs.jsonl"], tmp_path / "p.jsonl", 10)


@pytest.mark.slow
def test_kullm_dpo_runs_and_its_first_step_loss_is_log_2(tmp_path):
    text, results = run_bench(tmp_path, "kullm_dpo")
    res = results["kullm_dpo"]
    assert res["global_step"] == 2 and res["steps"] == 2
    assert res["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res["pairs"] == 4 and res["pairs_s"] > 0 and res["trained_tokens"] > 4 * 2  # one timed step of 4 pairs
    assert text.startswith("# B\n\n<!-- bench:head -->\nsft\n<!-- /bench:head -->\n") and text.endswith("notes\n")
    section = text[text.index("<!-- bench:dpo-head -->") : text.index("<!-- /bench:dpo-head -->")]
    assert "| kullm_dpo | " in section and "0.693147" in section


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL not installed (the bench extra)")
def test_trl_dpo_trains_the_same_objective_side_by_side(tmp_path):
    text, results = run_bench(tmp_path, "kullm_dpo", "trl_dpo")
    for variant in ("kullm_dpo", "trl_dpo"):
        assert results[variant]["first_loss"] == pytest.approx(math.log(2), abs=1e-6), variant
        assert results[variant]["pairs"] == 4 and results[variant]["peak_rss_mib"] > 0
    section = text[text.index("<!-- bench:dpo-head -->") : text.index("<!-- /bench:dpo-head -->")]
    trl_row = next(line for line in section.splitlines() if line.startswith("| trl_dpo |"))
    assert "| 1.00 (1.00–1.00) | 1.00 (1.00–1.00) |" in trl_row  # the ratios are to TRL itself
    assert "pairs/s over TRL:" in section
