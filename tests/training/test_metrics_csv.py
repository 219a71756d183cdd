"""One run folder holds the whole metrics curve as plain text: with W&B too, and across interrupted attempts."""

import csv
from collections import Counter
from pathlib import Path

import pytest
from console_scripts import run_script

from kullm.training.loggers import MetricsCSV


def curve(run: Path, key: str) -> dict[int, float]:
    """``step → value`` of one metric in ``run/csv/metrics.csv``; fails on a step logged twice."""
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]
    twice = [s for s, n in Counter(s for s, _ in rows).items() if n > 1]
    assert not twice, f"{key} logged twice at steps {twice}"
    return dict(rows)


def test_a_resumed_attempt_keeps_the_earlier_rows_and_replaces_the_steps_it_trains_again(tmp_path):
    first = MetricsCSV(tmp_path)  # interrupted after step 5; its last checkpoint was at step 3
    for step in range(6):
        first.log_metrics({"train/loss": 10.0 - step, "epoch": 0}, step)
    first.log_metrics({"val/loss": 9.0, "epoch": 0}, 4)
    first.finalize("interrupted")
    second = MetricsCSV(tmp_path)  # resumed from step 3: steps 4 and 5 are trained (and validated) again
    for step in range(4, 8):
        second.log_metrics({"train/loss": 1.0 * step, "epoch": 0}, step)
    second.save()
    second.log_metrics({"val/loss": 2.0, "epoch": 0}, 4)  # a metric seen first in a later flush
    second.finalize("success")
    assert curve(tmp_path, "train/loss") == {0: 10, 1: 9, 2: 8, 3: 7, 4: 4, 5: 5, 6: 6, 7: 7}
    assert curve(tmp_path, "val/loss") == {4: 2.0}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_interrupted_run_resumed_keeps_its_whole_curve_in_metrics_csv_beside_wandb(tmp_path):
    """The default logger (W&B; disabled in the tests) writes ``csv/metrics.csv`` too; the same command with more
    steps resumes the run folder, and the file holds the steps before and after, each once."""
    common = ["experiment=smoke", "run_name=r", "callbacks.samples.num=0", "trainer.log_every_n_steps=1",
              "val_every_n_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
              f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
    first = run_script("kullm-train", *common, "trainer.max_steps=4", cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script("kullm-train", *common, "trainer.max_steps=6", cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from this run folder's last checkpoint" in second.stdout + second.stderr
    run = tmp_path / "outputs" / "train" / "r"
    assert sorted(curve(run, "train/loss")) == [0, 1, 2, 3, 4, 5]
    assert sorted(curve(run, "val/loss")) == [1, 3, 5]
