"""Sweeps: each job's result.json, the sweep summary, the Optuna search and the submitit launcher."""

import csv
import json
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from kullm.config import JobFailed
from kullm.training.sweep import SweepSummary, read_result, summarize, summary_line, write_summary


def fake_job(sweep: Path, name: str, overrides: list[str], result: dict | None) -> Path:
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if result is not None:
        (folder / "result.json").write_text(json.dumps({"overrides": overrides, **result}))
    return folder


def test_summary_ranks_finished_jobs_by_val_loss_and_lists_failures_with_their_error(tmp_path):
    common = ["experiment=smoke"]
    fake_job(tmp_path, "0", [*common, "optim.lr=1e-3"], {"job": 0, "status": "finished", "val_loss": 2.5, "steps": 4})
    fake_job(tmp_path, "1", [*common, "optim.lr=2e-3"], {"job": 1, "status": "failed", "error": "kullm-train: boom"})
    fake_job(tmp_path, "2", [*common, "optim.lr=3e-3"], {"job": 2, "status": "finished", "val_loss": 1.25})
    fake_job(tmp_path, "10", [*common, "optim.lr=4e-3"], None)  # killed before it wrote anything
    fake_job(tmp_path, "3", [*common, "optim.lr=5e-3"], {"job": 3, "status": "finished", "val_loss": None})
    rows = summarize(tmp_path)
    assert [(r["job"], r["status"]) for r in rows] == [
        (2, "finished"),
        (0, "finished"),
        (3, "finished"),
        (1, "failed"),
        ("10", "no result (killed?)"),
    ]
    assert rows[0]["overrides"] == "optim.lr=3e-3" and rows[0]["common"] == "experiment=smoke"
    csv_path, md_path = write_summary(tmp_path, rows)
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [r["rank"] for r in table] == ["1", "2", "3", "4", "5"]
    assert table[0]["val_loss"] == "1.25" and table[3]["error"] == "kullm-train: boom" and table[4]["val_loss"] == ""
    md = md_path.read_text()
    assert "Best: job 2 (`optim.lr=3e-3`), val/loss 1.2500." in md
    assert "- job 1 (`optim.lr=2e-3`): kullm-train: boom" in md
    assert summary_line(md_path, rows) == (
        f"kullm: sweep summary {md_path} (5 jobs, 2 not finished); best: job 2 (optim.lr=3e-3) val/loss 1.2500"
    )


def test_a_failed_job_records_its_error_on_one_line_without_secrets(tmp_path):
    folder = tmp_path / "sweep" / "4"
    config = OmegaConf.create({"output_dir": str(folder), "judge": {"api_key": "sk-SECRET123"}})
    hydra_cfg = OmegaConf.create(
        {"hydra": {"job": {"num": 4}, "mode": "MULTIRUN", "sweep": {"dir": str(tmp_path / "sweep")}}}
    )
    from hydra.types import RunMode

    hydra_cfg.hydra.mode = RunMode.MULTIRUN
    callback = SweepSummary()
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- optim.lr=1e-3\n")
    (folder / "result.json").write_text('{"status": "finished"}')  # left by an earlier attempt in this folder
    callback.on_job_start(config)
    assert not (folder / "result.json").exists()
    error = JobFailed("kullm-train: the judge refused key sk-SECRET123\n  (HTTP 401)")
    ret = JobReturn(overrides=["optim.lr=1e-3"], hydra_cfg=hydra_cfg, status=JobStatus.FAILED, _return_value=error)
    callback.on_job_end(config, ret)
    result = read_result(folder)
    assert result["status"] == "failed" and result["job"] == 4 and result["overrides"] == ["optim.lr=1e-3"]
    assert result["error"] == "kullm-train: the judge refused key <redacted> (HTTP 401)"
    ret = JobReturn(overrides=[], hydra_cfg=hydra_cfg, status=JobStatus.FAILED, _return_value=KeyError("x"))
    callback.on_job_end(config, ret)
    assert read_result(folder)["error"] == "KeyError: 'x'"
    assert (tmp_path / "sweep" / "sweep_summary.md").is_file()  # refreshed after each job of a multirun
