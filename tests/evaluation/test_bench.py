"""kullm-bench on the tiny model: lm-eval's numbers through kullm equal the ``lm_eval`` CLI's, an adapter (not
merged) scores as its merged folder, purity, the comparison table and chart, and the one-line errors."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from console_scripts import one_line_error, run_script
from helpers import merge_cfg
from omegaconf import OmegaConf

from kullm.config import compose
from kullm.evaluation.bench_report import compare, read_results
from kullm.evaluation.harness import (
    BenchError,
    expand,
    lm_eval_result,
    load_suite,
    parse_metrics,
    suite_entries,
)

TASK = "kullm_test_mc"
WORDS = ["사과", "바다", "하늘", "학교", "음악", "기차", "도서관", "커피", "겨울", "강아지", "연필", "구름"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_task(folder: Path, n: int = 30) -> Path:
    """A local lm-eval multiple-choice task: its YAML and the JSON file of its questions (lm-eval reads local data
    through the ``json`` dataset builder)."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        choices = rng.sample(WORDS, 4)
        rows.append({"question": f"{i}번: '{choices[i % 4]}'와 같은 낱말은?", "choices": choices, "label": i % 4})
    data = folder / "questions.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    yaml = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}\n답:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    (folder / f"{TASK}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(yaml)), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def setup(adapter, tmp_path_factory) -> dict[str, Path]:
    """The session's adapter, its merged folder and the local task (module-wide; tests only read them)."""
    from kullm.inference.merging import merge

    root = tmp_path_factory.mktemp("bench")
    merged = merge(merge_cfg(adapter, root / "merged"))
    return {"adapter": adapter, "merged": merged, "tasks": write_task(root / "tasks"), "root": root}


def bench(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_script("kullm-bench", *args, cwd=cwd, env=OFFLINE, timeout=timeout)


def lm_eval_cli(folder: Path, tasks: Path, out: Path, cwd: Path) -> dict:
    """The ``lm_eval`` CLI's results row for the local task on a model folder (the same settings as kullm-bench's)."""
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or shutil.which("lm_eval")
    assert lm_eval, "lm_eval is not installed"
    proc = subprocess.run(
        [lm_eval, "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", TASK, "--include_path",
         str(tasks), "--batch_size", "4", "--device", "cpu", "--seed", "1234", "--output_path", str(out)],
        cwd=cwd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(out.rglob("results_*.json"))
    assert found, proc.stderr[-2000:]
    return json.loads(found[-1].read_text())["results"][TASK]


@pytest.mark.slow
def test_bench_equals_lm_eval_cli_and_adapter_equals_merged(setup, tmp_path):
    """The acceptance test: kullm-bench on the merged folder gives the lm_eval CLI's numbers; the adapter, applied
    to its base without merging, gives the same; the results folders record what produced them; and the comparison
    of the two folders has a row per model with intervals, and a chart."""
    common = [f"tasks=[{TASK}]", f"include_path={setup['tasks']}", "batch_size=4", "device=cpu", "seed=1234"]
    proc = bench(f"base={setup['merged']}", *common, f"output_dir={tmp_path / 'merged'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = bench(f"adapter={setup['adapter']}", *common, f"output_dir={tmp_path / 'adapter'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = lm_eval_cli(setup["merged"], setup["tasks"], tmp_path / "cli", tmp_path)

    merged, adapted = read_results(tmp_path / "merged"), read_results(tmp_path / "adapter")
    mine = merged["results"][TASK]
    for metric in ("acc", "acc_norm"):
        assert mine["metrics"][metric] == cli[f"{metric},none"]
        assert mine["stderr"][metric] == pytest.approx(cli[f"{metric}_stderr,none"])
        assert adapted["results"][TASK]["metrics"][metric] == pytest.approx(mine["metrics"][metric], abs=1e-9)
    lo, hi = mine["ci"]["acc"]
    assert lo < mine["metrics"]["acc"] < hi
    assert mine["n"] == 30 and mine["meta"]["n_shot"] == 0 and mine["meta"]["version"] == 1.0
    assert mine["meta"]["settings"]["apply_chat_template"] is False
    assert merged["versions"]["lm_eval"] and merged["versions"]["kullm"]
    assert merged["model"]["adapter"] is None and merged["model"]["hashes"]["model"].startswith("sha256:")
    assert adapted["model"]["adapter"] == str(setup["adapter"].resolve())
    assert adapted["model"]["hashes"]["adapter"].startswith("sha256:") and adapted["model"]["hashes"]["model"]
    assert (tmp_path / "merged" / "results.md").read_text().count(TASK) >= 2
    assert "acc_norm" in (tmp_path / "merged" / "results.csv").read_text()

    proc = bench(f"compare=[{tmp_path / 'merged'},{tmp_path / 'adapter'}]", f"output_dir={tmp_path / 'cmp'}",
                 cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| merged |", "| adapter"))]
    assert len(rows) >= 2 and all(f"{mine['metrics']['acc']:.4f} [" in row for row in rows[:2]), table
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_purity_suite_generates_and_reports_shares(setup, tmp_path):
    proc = bench(f"adapter={setup['adapter']}", "suite=purity", "limit=3", "generation.max_new_tokens=8",
                 f"output_dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_results(tmp_path)["results"]["purity"]
    answers = [json.loads(line) for line in (tmp_path / "purity" / "answers.jsonl").read_text().splitlines()]
    assert result["n"] == len(answers) == 3
    assert result["metrics"]["korean"] == pytest.approx(sum(a["korean"] for a in answers) / 3)
    shares = [result["metrics"][s] for s in ("hangul", "cjk", "latin", "other")]
    assert all(0 <= s <= 1 for s in shares) and sum(shares) in (pytest.approx(1.0), 0.0)
    assert result["meta"]["prompts_hash"].startswith("sha256:") and "lingua" in result["meta"]["detector"]


def test_unknown_task_is_one_line_before_any_model_loads(tmp_path):
    start = time.monotonic()
    proc = bench("tasks=[kobest_boolqq]", "base=/nonexistent/model", cwd=tmp_path)
    line = one_line_error(proc, "kullm-bench")
    assert "kobest_boolqq" in line and "kobest_boolq'" in line  # the name, and the nearest known one
    assert "Loading" not in proc.stderr and time.monotonic() - start < 60


def test_adapter_whose_base_is_missing_is_one_line(setup, tmp_path):
    broken = shutil.copytree(setup["adapter"], tmp_path / "moved-adapter")
    config = broken / "kullm_config.yaml"
    cfg = OmegaConf.load(config)
    cfg.model.name_or_path = str(tmp_path / "gone" / "base-model")
    config.write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    proc = bench(f"adapter={broken}", "suite=purity", cwd=tmp_path)
    line = one_line_error(proc, "kullm-bench")
    assert "gone/base-model" in line and "kullm_config.yaml" in line


def test_compare_of_a_folder_without_results_is_one_line(tmp_path):
    proc = bench(f"compare=[{tmp_path}]", cwd=tmp_path)
    assert "results.json" in one_line_error(proc, "kullm-bench")


def test_suites_expand_their_references():
    ko = expand(load_suite("ko")["tasks"], ["ko"])
    kinds = {e["kind"] for e in ko}
    assert kinds == {"lm_eval", "judge", "purity"}
    names = {e.get("task") or e["name"] for e in ko}
    assert {"kmmlu", "haerae", "kobest", "click", "hrm8k", "kormedmcqa", "purity"} <= names
    assert next(e for e in ko if e.get("task") == "kmmlu")["num_fewshot"] == 5
    quick = expand(load_suite("ko_quick")["tasks"], ["ko_quick"])
    assert next(e for e in quick if e["kind"] == "purity")["limit"] == 16  # the reference's key over the suite's
    with pytest.raises(BenchError, match="ko_quickk.*did you mean 'ko_quick'"):
        load_suite("ko_quickk")
    with pytest.raises(BenchError, match="includes itself"):
        expand([{"suite": "ko"}], ["ko"])


def test_command_line_settings_apply_to_every_entry(tmp_path):
    cfg = compose("bench", ["suite=ko_quick", "limit=5", "apply_chat_template=true"])
    entries = suite_entries(cfg)
    assert all(e["limit"] == 5 for e in entries)
    assert all(e["apply_chat_template"] is True for e in entries if e["kind"] == "lm_eval")
    cfg = compose("bench", ["tasks=[kobest_wic,haerae]"])
    assert [(e["kind"], e["name"]) for e in suite_entries(cfg)] == [("lm_eval", "kobest_wic"), ("lm_eval", "haerae")]


def test_lm_eval_rows_become_metrics_with_intervals():
    row = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 0.25,
           "exact_match_stderr,strict-match": "N/A"}  # fmt: skip
    metrics, stderr, ci = parse_metrics(row, z=2.0)
    assert metrics == {"acc": 0.5, "exact_match,strict-match": 0.25}
    assert stderr == {"acc": 0.1} and ci == {"acc": [pytest.approx(0.3), pytest.approx(0.7)]}
    out = {
        "results": {"g": {"acc,none": 0.5, "acc_stderr,none": 0.1}, "a": {"acc,none": 0.4}, "b": {"acc,none": 0.6}},
        "group_subtasks": {"g": ["a", "b"]},
        "n-samples": {"a": {"effective": 10}, "b": {"effective": 20}},
        "versions": {"a": 1.0},
    }
    result = lm_eval_result("g", "g", out, {}, 0.95)
    assert result["n"] == 30 and set(result["subtasks"]) == {"a", "b"} and result["main"] == "acc"
    with pytest.raises(BenchError, match="no results"):
        lm_eval_result("x", "x", out, {}, 0.95)


def test_comparison_flags_different_settings(tmp_path):
    for name, acc, limit in (("base", 0.25, 10), ("tuned", 0.5, 20)):
        doc = {
            "model": {"name": name, "path": f"/m/{name}", "adapter": None, "base": f"/m/{name}", "hashes": {}},
            "settings": {"limit": limit},
            "results": {"t": {"kind": "lm_eval", "main": "acc", "metrics": {"acc": acc}, "ci": {"acc": [0, 1]}}},
        }
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
    paths = compare([tmp_path / "base", tmp_path / "tuned"], tmp_path / "cmp")
    table = paths["md"].read_text()
    assert "| base | 0.2500 [0.0000, 1.0000] |" in table and "| tuned | 0.5000" in table
    assert "different settings" in table
    assert "tuned,t,lm_eval,acc,0.5" in paths["csv"].read_text()


def test_adapter_is_applied_not_merged_and_changes_the_model(setup):
    """kullm-bench scores the PeftModel itself (LoRA layers live, unmerged), loaded the way the CLI loads it; a
    folder holding adapter_config.json given as base= is the adapter too."""
    import torch
    from peft import PeftModel

    from kullm.evaluation.bench_model import load_bench_model

    cfg = compose("bench", [f"base={setup['adapter']}", "device=cpu"])
    bm = load_bench_model(cfg)
    assert isinstance(bm.model, PeftModel) and bm.adapter == str(setup["adapter"].resolve())
    lora = [m for m in bm.model.modules() if hasattr(m, "merged")]
    assert lora and not any(m.merged for m in lora)
    ids = torch.tensor([bm.tokenizer("고려대학교", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        on = bm.model(input_ids=ids).logits
        with bm.model.disable_adapter():
            off = bm.model(input_ids=ids).logits
    assert (on - off).abs().max() > 1e-3  # the adapter's B is non-zero: it changes what lm-eval would score
    assert bm.generator({"max_new_tokens": 4}).generate(["안녕"])[0] is not None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_logs_bench_metrics_and_optuna_maximises_one(setup, tmp_path):
    """callbacks.bench: bench/<task> after each validation (the CSV logger's metrics) and at the end (result.json,
    the sweep summary), and sweep_metric=bench/<task> is what an Optuna search maximises."""
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    overrides = json.dumps([f"include_path={setup['tasks']}", f"tasks=[{TASK}]", "batch_size=4"])
    proc = run_script(
        "kullm-train", "-m", "experiment=smoke", "logger=csv", "callbacks.samples.num=0", "trainer.max_steps=2",
        "val_every_n_steps=2", f"data.cache_dir={tmp_path}/cache", "hparams_search=lora_optuna",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=maximize", f"hydra.sweep.dir={sweep}",
        "callbacks.bench=ko_quick", "callbacks.bench_every=1", f"callbacks.bench_overrides={overrides}",
        f"sweep_metric=bench/{TASK}", cwd=tmp_path, env=OFFLINE, timeout=850,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="lora", storage=f"sqlite:///{sweep}/optuna.db")
    assert study.direction.name == "MAXIMIZE" and [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    for trial in study.trials:
        result = json.loads((sweep / str(trial.number) / "result.json").read_text())
        assert 0 <= result["bench"][f"bench/{TASK}"] <= 1
        assert trial.value == pytest.approx(result["bench"][f"bench/{TASK}"])
        bench = read_results(sweep / str(trial.number) / "bench" / "final")["results"][TASK]
        assert bench["n"] == 20 and bench["metrics"]["acc"] == pytest.approx(trial.value)  # bench_limit: 20
        logged = next((sweep / str(trial.number)).rglob("metrics.csv")).read_text()
        assert f"bench/{TASK}" in logged.splitlines()[0]
    import csv

    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["bench"].startswith(f"bench/{TASK}=") for r in rows)
    assert "## Benchmarks (callbacks.bench)" in (sweep / "sweep_summary.md").read_text()


def test_an_unknown_bench_task_stops_training_before_it_starts(tmp_path):
    proc = run_script(
        "kullm-train", "experiment=smoke", "logger=csv", "callbacks.bench=ko_quick",
        'callbacks.bench_overrides=["tasks=[kobest_boolqq]"]', f"data.cache_dir={tmp_path}/cache",
        cwd=tmp_path, env=OFFLINE, timeout=300,
    )  # fmt: skip
    assert "kobest_boolqq" in one_line_error(proc, "kullm-train")
    assert "train (optimizer steps)" not in proc.stderr
