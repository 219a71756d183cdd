"""Runs that collide and numbers that mean nothing: one process per run folder (a second is refused naming the
first's PID), an output folder that cannot be written, settings outside their range, and a loss that diverges.
Each refusal is one line, before any model loads; a diverged run stops non-zero and keeps its checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from console_scripts import one_line_error, run_script

from kullm.config import SCHEMA, ConfigError, compose, validate
from kullm.runlock import LOCK_NAME, RunLocked, hold

SMOKE = ["experiment=smoke", "logger=csv", "callbacks.samples.num=0"]


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder`` (as a running kullm-eval or kullm-train does)."""
    code = f"from kullm.runlock import hold; f = hold({str(folder)!r}); print('held', flush=True); input()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# --- one run per folder -------------------------------------------------------------------------------------------


def test_a_training_into_a_run_folder_in_use_is_refused_before_writing_into_it(tmp_path):
    run = tmp_path / "outputs" / "train" / "x"
    first = holder(run)
    try:
        proc = run_script("kullm-train", *SMOKE, "run_name=x", cwd=tmp_path, timeout=120)
        assert one_line_error(proc, "kullm-train") == (
            f"kullm-train: {run} is in use by another run (PID {first.pid}); wait for it to end, or give this one "
            "another folder"
        )
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # no .hydra, no log, no checkpoint
    finally:
        first.kill()
        first.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_second_training_in_a_run_folder_in_use_is_refused_naming_the_first(tmp_path):
    """``kullm-train run_name=X`` twice at once: the second stops in one line and writes nothing into the folder;
    once the first is gone (killed), the folder is free again."""
    run = tmp_path / "outputs" / "train" / "x"
    args = [*SMOKE, "run_name=x", "trainer.max_epochs=200", "callbacks.checkpoint.every_n_train_steps=2",
            f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "kullm.train", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "last.ckpt").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never saved a checkpoint"
            time.sleep(0.2)
        hydra_files = sorted((run / ".hydra").iterdir())
        stamps = [p.stat().st_mtime_ns for p in hydra_files]
        second = run_script("kullm-train", *args, cwd=tmp_path, timeout=200)
        line = one_line_error(second, "kullm-train")
        assert line == (
            f"kullm-train: {run} is in use by another run (PID {first.pid}); wait for it to end, or give this one "
            "another folder"
        )
        assert [p.stat().st_mtime_ns for p in hydra_files] == stamps  # the first run's config is untouched
        assert not (run / "checkpoints" / "last-v1.ckpt").exists()
        with pytest.raises(RunLocked, match=rf"\(PID {first.pid}\)"):
            hold(run)
    finally:
        first.kill()
        first.wait(60)
    hold(run).close()  # the OS released the killed run's lock: a stale lock file blocks nothing


def test_a_second_evaluation_of_an_output_dir_in_use_is_refused_before_any_request(tmp_path):
    out = tmp_path / "eval"
    resp = tmp_path / "responses.jsonl"
    resp.write_text(json.dumps({"id": "a", "instruction": "질문", "input": "", "response": "답"}) + "\n")
    first = holder(out)
    try:
        proc = run_script("kullm-eval", f"responses={resp}", f"output_dir={out}", "judge.base_url=http://127.0.0.1:9/v1",
                          "references=null", cwd=tmp_path, timeout=120)  # fmt: skip
        assert one_line_error(proc, "kullm-eval") == (
            f"kullm-eval: {out} is in use by another run (PID {first.pid}); wait for it to end, or give this one "
            "another folder"
        )
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no judgments, no .hydra
    finally:
        first.kill()
        first.wait(30)
    hold(out).close()


def test_only_the_launching_process_takes_the_lock(tmp_path, monkeypatch):
    """DDP/FSDP ranks other than 0 (Lightning's launcher sets LOCAL_RANK; torchrun RANK; SLURM SLURM_PROCID; other
    nodes NODE_RANK) work in rank 0's folder: they must not be refused by its lock."""
    held = hold(tmp_path)
    try:
        for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID", "NODE_RANK"):
            with monkeypatch.context() as m:
                m.setenv(name, "1")
                assert hold(tmp_path) is None
            with monkeypatch.context() as m:
                m.setenv(name, "0")
                with pytest.raises(RunLocked):
                    hold(tmp_path)
    finally:
        held.close()


def test_a_lock_file_planted_as_a_link_is_never_written_through(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(target)
    with pytest.raises(OSError):
        hold(run)
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize(("prog", "key"), [("kullm-train", "hydra.run.dir"), ("kullm-eval", "output_dir")])
def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, prog, key):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_script(prog, *SMOKE[:1] if prog == "kullm-train" else ["responses=r.jsonl"], f"{key}={blocker}/run",
                      cwd=tmp_path, timeout=120)  # fmt: skip
    assert one_line_error(proc, prog) == f"{prog}: cannot write to the output folder {blocker}/run: Not a directory"


# --- settings outside their range ---------------------------------------------------------------------------------


BAD = [
    ("train", "optim.lr=-1e-4", "optim.lr=-0.0001: must lie in [0, inf)"),
    ("train", "optim.lr=nan", "optim.lr=nan: must lie in [0, inf)"),
    ("train", "optim.lr=inf", "optim.lr=inf: must lie in [0, inf)"),
    ("train", "lora.lora_dropout=1.0", "lora.lora_dropout=1.0: must lie in [0, 1)"),
    ("train", "lora.lora_dropout=-0.1", "lora.lora_dropout=-0.1: must lie in [0, 1)"),
    ("train", "optim.warmup_ratio=1.5", "optim.warmup_ratio=1.5: must lie in [0, 1]"),
    ("train", "optim.warmup_ratio=-0.1", "optim.warmup_ratio=-0.1: must lie in [0, 1]"),
    ("train", "trainer.max_steps=0", "trainer.max_steps=0: trains nothing; give a positive number, or -1 for"),
    ("train", "trainer.max_epochs=0", "trainer.max_epochs=0: trains nothing; give a positive number, or -1 for"),
    ("generate", "generation.top_p=0", "generation.top_p=0: must lie in (0, 1]"),
    ("generate", "generation.top_p=1.5", "generation.top_p=1.5: must lie in (0, 1]"),
    ("eval", "bootstrap.samples=0", "bootstrap.samples=0: must be at least 1"),
    ("eval", "bootstrap.confidence=1", "bootstrap.confidence=1: must lie in (0, 1)"),
    ("eval", "bootstrap.confidence=0", "bootstrap.confidence=0: must lie in (0, 1)"),
    ("eval", "judge.timeout=nan", "judge.timeout=nan: must be at least 0.001"),
]
GOOD = [("train", "optim.lr=0"), ("train", "lora.lora_dropout=0"), ("train", "optim.warmup_ratio=1"),
        ("train", "trainer.max_steps=-1"), ("train", "trainer.max_epochs=-1"), ("generate", "generation.top_p=1"),
        ("eval", "bootstrap.samples=1"), ("eval", "bootstrap.confidence=0.5")]  # fmt: skip


def composed(name: str, *overrides: str):
    base = {"train": ["experiment=smoke", "output_dir=/tmp/unused"], "eval": ["output_dir=/tmp/unused"]}
    return compose(name, [*base.get(name, []), *overrides])


@pytest.mark.parametrize(("name", "override", "message"), BAD, ids=[b[1] for b in BAD])
def test_a_value_outside_its_range_is_refused_naming_the_range(name, override, message):
    with pytest.raises(ConfigError) as e:
        validate(composed(name, override))
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(("name", "override"), GOOD, ids=[g[1] for g in GOOD])
def test_the_edges_of_each_range_that_make_sense_are_accepted(name, override):
    validate(composed(name, override))


@pytest.fixture(scope="module")
def configs():
    return {name: composed(name) for name in ("train", "generate", "eval", "merge")}


def test_true_where_a_whole_number_is_expected_is_refused_for_every_integer_knob(configs):
    """``batch_size=true`` (YAML's boolean, and bool is an int in Python) for each integer knob of each CLI."""
    from omegaconf import OmegaConf

    absent, checked = object(), []
    for key, want in SCHEMA.items():
        if want is not int:
            continue
        for name, cfg in configs.items():
            if OmegaConf.select(cfg, key, default=absent) is absent:
                continue
            with pytest.raises(ConfigError, match=rf"^{key}=True: expected int, got bool$"):
                validate(composed(name, f"{key}=true"))
            checked.append(key)
    assert {"batch_size", "micro_batch_size", "lora.r", "trainer.max_steps", "data.cutoff_len", "limit",
            "bootstrap.samples", "generation.max_new_tokens", "judge.concurrency"} <= set(checked)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prog", "args", "message"),
    [
        ("kullm-train", [*SMOKE, "optim.lr=nan"], "kullm-train: optim.lr=nan: must lie in [0, inf)"),
        ("kullm-train", [*SMOKE, "trainer.max_steps=0"], "kullm-train: trainer.max_steps=0: trains nothing"),
        ("kullm-train", [*SMOKE, "batch_size=true"], "kullm-train: batch_size=True: expected int, got bool"),
        ("kullm-eval", ["responses=r.jsonl", "bootstrap.confidence=1.0", "output_dir=o"],
         "kullm-eval: bootstrap.confidence=1.0: must lie in (0, 1)"),
    ],
)  # fmt: skip
def test_the_clis_refuse_out_of_range_values_in_one_line_before_loading_a_model(tmp_path, prog, args, message):
    proc = run_script(prog, *args, cwd=tmp_path, timeout=120)
    assert one_line_error(proc, prog).startswith(message)
    assert "warmed up" not in proc.stdout + proc.stderr and "Loading weights" not in proc.stderr


# --- a loss that diverges -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_diverging_run_stops_non_zero_before_the_bad_step_and_keeps_its_checkpoints(tmp_path):
    """lr 1e30: the weights blow up after the first real step and the next loss is not finite. The run stops before
    that step's update (no NaN reaches the weights or any checkpoint), exits 1 in one line naming the step and the
    last checkpoint, and writes no final adapter."""
    run = tmp_path / "run"
    proc = run_script("kullm-train", *SMOKE, "optim.lr=1e30", "trainer.max_steps=8", "trainer.limit_val_batches=0",
                      "callbacks.checkpoint.monitor=null", "callbacks.checkpoint.every_n_train_steps=1",
                      f"hydra.run.dir={run}", f"data.cache_dir={tmp_path}/c", cwd=tmp_path, timeout=280)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if "diverged" in x]
    assert line == proc.stderr.strip().splitlines()[-1]  # the last word
    assert line.startswith("kullm-train: training diverged at optimizer step "), line
    step = int(line.split(" at optimizer step ")[1].split(":")[0])
    assert "loss nan" in line or "loss inf" in line
    assert line.endswith(f"; last checkpoint: {run}/checkpoints/last.ckpt")
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < last["global_step"] == step - 1  # nothing saved from the step that diverged, or after it
    assert all(bool(torch.isfinite(v).all()) for v in last["state_dict"].values())
    assert not (run / "adapter").exists() and "finished" not in proc.stderr


def test_a_non_finite_loss_or_gradient_norm_stops_training_unless_a_grad_scaler_skips_the_step():
    from helpers import module_on

    from kullm.training.checkpointing import Diverged

    module = module_on()
    module._check_finite(2.5, 1.0)
    for loss, norm in ((math.nan, 1.0), (math.inf, 1.0), (2.5, math.nan), (2.5, math.inf)):
        with pytest.raises(Diverged, match=r"^training diverged at optimizer step 1: loss .*, gradient norm "):
            module._check_finite(loss, norm)
    module.trainer.precision_plugin.scaler = torch.amp.GradScaler("cpu")  # fp16: inf gradients are skipped steps
    module._check_finite(2.5, math.inf)
    with pytest.raises(Diverged):
        module._check_finite(math.nan, 1.0)
